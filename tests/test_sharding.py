"""Data-parallel training over a `data` device mesh (train/sharding.py), on simulated CPU devices.

The pytest process has already started jax with one CPU device, so the sharded runs happen in
subprocesses whose device count is set before jax starts (XLA_FLAGS=--xla_force_host_platform_device_count),
all launched at once by a module fixture (XLA compiles are single-threaded: two cores, two at a time):

- tests/sharding_worker.py, 8 devices, one process: 3 steps of sum, of PCGrad and of PCGrad with
  FSDP-sharded params (hidden dropout 0.1, uneven `valid` rows, lr 1e-3) on one device and over a
  `data=8` mesh; the parameters must agree to 1e-5 while having moved by far more than that. A per-shard
  (instead of global) masked mean, a missing gradient all-reduce or a sharding-dependent dropout mask
  would each break the agreement.
- the same worker as two processes x 4 devices through `jax.distributed` (coordinator on 127.0.0.1),
  PCGrad: same parameters as the single-device reference.
- the CLI: `bert-jax train --mesh data=8` (combine=mean) vs the single-device `bert-jax train`, same
  final parameters; `bert-jax evaluate --mesh data=8` of the sharded run vs the single-device run's dev
  metrics; a batch size that the mesh does not divide is a one-line exit-2 error.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import FAST_XLA  # LLVM optimisation only: the same HLO on every device count
from train import sharding

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("sharding_worker.py")
TOL = 1e-5


def _env(devices: int | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in sharding.ENV.values() and k != "XLA_FLAGS"}
    env["XLA_FLAGS"] = FAST_XLA + (f" --xla_force_host_platform_device_count={devices}" if devices else "")
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "scripts.cli", *args]


class _Proc:
    """A subprocess started now; its output goes to files (no pipe can fill up and stall it)."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], logs: Path):
        self.name, self.t0 = name, time.perf_counter()
        self.files = [open(logs / f"{name.replace(' ', '_')}.{s}", "w+") for s in ("out", "err")]
        self.p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self.files[0], stderr=self.files[1], text=True)
        self.out = self.err = None

    def wait(self, timeout: float = 600) -> "_Proc":
        if self.out is None:
            try:
                self.p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
            self.seconds = time.perf_counter() - self.t0
            for f in self.files:
                f.seek(0)
            self.out, self.err = (f.read() for f in self.files)
            for f in self.files:
                f.close()
        return self

    def ok(self) -> "_Proc":
        self.wait()
        assert self.p.returncode == 0, f"{self.name} exited {self.p.returncode}:\n{self.err[-3000:]}"
        return self


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_bert_dir, tiny_vocab_bert_dir, tiny_data_dir):
    tmp = tmp_path_factory.mktemp("sharding")
    port = _free_port()
    worker = [sys.executable, str(WORKER), "--bert", str(tiny_bert_dir)]
    train = ["train", "--data-dir", str(tiny_data_dir), "--config", "tiny", "--checkpoint", str(tiny_vocab_bert_dir),
             "--quiet", "batch_size=8", "buckets=[32]", "lr=1e-3", "combine=mean"]
    procs = {
        "single": _Proc("8-device worker", worker + ["--out", str(tmp / "single.npz"), "--devices", "8", "--mesh", "8",
                                                     "--combos", "sum,pcgrad,pcgrad+fsdp", "--reference"], _env(), tmp),
        **{f"multi{i}": _Proc(f"distributed worker {i}", worker + [
            "--out", str(tmp / "multi.npz"), "--devices", "4", "--mesh", "8", "--combos", "pcgrad",
            "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)], _env(), tmp) for i in (0, 1)},
        "cli1": _Proc("bert-jax train (1 device)", _cli(train + ["--out", str(tmp / "run1")]), _env(1), tmp),
        "cli8": _Proc("bert-jax train --mesh data=8", _cli(train + ["--out", str(tmp / "run8"), "--mesh", "data=8"]), _env(8), tmp),
        "bad": _Proc("bert-jax train --mesh data=3", _cli(train + ["--out", str(tmp / "run3"), "--mesh", "data=3"]), _env(8), tmp),
    }
    yield tmp, procs
    for p in procs.values():
        if p.p.poll() is None:
            p.p.kill()
        p.wait()


def _tree(npz: dict, prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix):]: v for k, v in npz.items() if k.startswith(prefix)}


def _assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray], tol: float = TOL) -> float:
    assert a.keys() == b.keys() and len(a) > 0
    worst = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
    assert worst <= tol, f"max |difference| {worst:.3g} > {tol}"
    return worst


# ------------------------------------------------------------------------------------------- in-process


def test_parse_mesh():
    assert sharding.parse_mesh("data=8") == 8
    import jax

    assert sharding.parse_mesh("data=all") == jax.device_count()
    for bad in ("8", "model=2", "data=0", "data=x", "data"):
        with pytest.raises(ValueError, match="--mesh"):
            sharding.parse_mesh(bad)


def test_init_distributed_needs_all_three(monkeypatch):
    for v in sharding.ENV.values():
        monkeypatch.delenv(v, raising=False)
    assert sharding.init_distributed() is False  # nothing asked: single process, nothing initialised
    with pytest.raises(ValueError, match="--num-processes, --process-id"):
        sharding.init_distributed(coordinator="127.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    with pytest.raises(ValueError, match="--process-id") as e:
        sharding.init_distributed(coordinator="127.0.0.1:1234")
    assert "--num-processes" not in str(e.value)


def test_fsdp_specs_follow_shapes():
    from jax.sharding import PartitionSpec as P

    assert sharding.fsdp_spec((30522, 384), 4, 100) == P(None, "data")  # 30522 % 4 != 0: largest divisible dim
    assert sharding.fsdp_spec((384, 1536), 4, 100) == P(None, "data")
    assert sharding.fsdp_spec((1536, 384), 4, 100) == P("data", None)
    assert sharding.fsdp_spec((384,), 4, 100) == P("data")
    assert sharding.fsdp_spec((7, 5), 4, 100) == P()  # under min_shard_size: replicated
    assert sharding.fsdp_spec((101, 3), 4, 100) == P()  # no dimension divisible by 4
    assert sharding.fsdp_spec((), 4, 0) == P()
    assert sharding.fsdp_spec((1536, 384), 1, 100) == P()


# ------------------------------------------------------------------------------------------- sharded runs


def test_eight_devices_match_one_device(runs):
    tmp, procs = runs
    procs["single"].ok()
    npz = dict(np.load(tmp / "single.npz"))
    diag = json.loads((tmp / "single.json").read_text())
    assert diag["device_count"] == 8
    init = _tree(npz, "init")
    for combo in ("sum", "pcgrad"):
        ref, dp = _tree(npz, f"{combo}/ref"), _tree(npz, f"{combo}/dp")
        moved = max(float(np.max(np.abs(ref[k] - init[k]))) for k in ref)
        assert moved > 100 * TOL, f"{combo}: parameters barely moved ({moved:.3g}); the comparison would be vacuous"
        _assert_same(ref, dp)
        d = diag[combo]
        # the batch really was split: P('data'), one row on each of the 8 devices; params replicated
        assert d["batch_spec"] == "P('data',)" and d["shard_rows"] == [1] and d["n_addressable_shards"] == 8
        assert d["param_leaves_sharded"] == 0 and d["metrics_replicated"] and d["hlo_all_reduce"]
    # FSDP: same result with the large leaves (and their AdamW moments) split over the 8 devices
    _assert_same(_tree(npz, "pcgrad/ref"), _tree(npz, "pcgrad+fsdp/dp"))
    fsdp = diag["pcgrad+fsdp"]
    assert fsdp["param_leaves_sharded"] > 0 and fsdp["opt_leaves_sharded"] == 2 * fsdp["param_leaves_sharded"]
    assert fsdp["hlo_all_gather"] and fsdp["batch_spec"] == "P('data',)"


def test_two_processes_match_one_device(runs):
    tmp, procs = runs
    procs["single"].ok()
    procs["multi0"].ok(), procs["multi1"].ok()
    ref = dict(np.load(tmp / "single.npz"))
    npz = dict(np.load(tmp / "multi.npz"))
    diag = json.loads((tmp / "multi.json").read_text())
    assert (diag["process_count"], diag["device_count"], diag["local_device_count"]) == (2, 8, 4)
    _assert_same(_tree(ref, "pcgrad/ref"), _tree(npz, "pcgrad/dp"))
    d = diag["pcgrad"]
    assert d["shard_rows"] == [1] and d["n_addressable_shards"] == 4  # process 0 holds its 4 rows only
    assert d["param_leaves_sharded"] == 0 and d["metrics_replicated"] and d["hlo_all_reduce"]


def _load_params(run: Path) -> dict[str, np.ndarray]:
    """The best params of a run as numpy, restored onto this process's device whatever mesh saved them."""
    import jax
    import orbax.checkpoint as ocp

    item = max((run / "best").iterdir(), key=lambda p: int(p.name)) / "params"
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ocp.StandardCheckpointer() as c:
        meta = c.metadata(item.absolute()).item_metadata
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)
        tree = c.restore(item.absolute(), target)
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree.leaves_with_path(tree)}


def test_cli_train_and_evaluate_with_mesh(runs, tiny_data_dir):
    tmp, procs = runs
    procs["cli1"].ok(), procs["cli8"].ok()
    _assert_same(_load_params(tmp / "run1"), _load_params(tmp / "run8"))
    m1 = json.loads((tmp / "run1" / "metrics.jsonl").read_text().splitlines()[-1])
    m8 = json.loads((tmp / "run8" / "metrics.jsonl").read_text().splitlines()[-1])
    ev = subprocess.run(_cli(["evaluate", str(tmp / "run8"), "--data-dir", str(tiny_data_dir), "--mesh", "data=8"]),
                        cwd=REPO, env=_env(8), capture_output=True, text=True, timeout=600)
    assert ev.returncode == 0, ev.stderr[-3000:]
    e8 = json.loads(ev.stdout.strip().splitlines()[-1])
    # the tiny random model's dev scores are nearly constant (std ~1e-4), so a Pearson correlation moves
    # by ~1e-4 under 1e-8 score differences: compare metrics loosely, parameters (above) tightly
    for m in (m8, e8):
        for k in ("sst", "para", "sts", "overall"):
            assert abs(m[k] - m1[k]) < 2e-3, (k, m[k], m1[k])


def test_batch_size_not_divisible_by_mesh(runs):
    _, procs = runs
    p = procs["bad"].wait()
    assert p.p.returncode == 2, p.err[-2000:]
    assert "batch_size 8 is not divisible by the 3 devices of --mesh data=3" in p.err
    assert "Traceback" not in p.err
