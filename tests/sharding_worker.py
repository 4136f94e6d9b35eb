"""Helper process for tests/test_sharding.py (not a test module): a few multitask train steps of a
tiny BERT on one device and data-parallel over a `data` mesh, in a process whose device count is set
*before* jax starts (``--devices`` -> ``XLA_FLAGS=--xla_force_host_platform_device_count``).

    python tests/sharding_worker.py --bert DIR --out OUT.npz --devices 8 --mesh 8 --combos sum,pcgrad [--reference]
    # one process of a two-process jax.distributed run (each with --devices 4, --mesh 8):
    python tests/sharding_worker.py ... --coordinator 127.0.0.1:PORT --num-processes 2 --process-id I

Writes (process 0 only) OUT.npz with `<combo>/dp/<param path>` (and with --reference `<combine>/ref/...`,
one per combine, and `init/...`) and OUT.json with diagnostics of the sharded steps (shardings actually used).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

STEPS = 3
B, L = 8, 16
TASKS = ("sst", "para", "sts")
# Uneven valid rows: with 8 shards of one row, a per-shard mean (instead of the global masked mean)
# would weight rows differently and give different gradients.
VALID = {"sst": [1, 1, 1, 0, 1, 0, 0, 0], "para": [1] * 8, "sts": [1, 0, 1, 1, 1, 1, 0, 1]}


def batches(vocab: int) -> list[dict]:
    import numpy as np

    rng = np.random.default_rng(0)
    out = []
    for _ in range(STEPS):
        step = {}
        for t in TASKS:
            lens = rng.integers(4, L + 1, B)
            mask = (np.arange(L)[None, :] < lens[:, None]).astype(np.int32)
            ids = lambda: (rng.integers(5, vocab, (B, L)) * mask).astype(np.int32)
            valid = np.asarray(VALID[t], np.float32)
            if t == "sst":
                step[t] = {"input_ids": ids(), "attention_mask": mask, "labels": rng.integers(0, 5, B).astype(np.int32), "valid": valid}
            else:
                labels = rng.integers(0, 2, B) if t == "para" else rng.uniform(0, 5, B)
                step[t] = {"input_ids_1": ids(), "attention_mask_1": mask, "input_ids_2": ids(), "attention_mask_2": mask,
                           "labels": labels.astype(np.float32), "valid": valid}
        out.append(step)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bert", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--mesh", type=int, default=8)
    ap.add_argument("--combos", default="sum,pcgrad")  # sum | mean | pcgrad, suffix "+fsdp" for sharded params
    ap.add_argument("--reference", action="store_true", help="also run each combo on one device (no mesh)")
    ap.add_argument("--coordinator")
    ap.add_argument("--num-processes", type=int)
    ap.add_argument("--process-id", type=int)
    args = ap.parse_args()
    keep = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join(keep + [f"--xla_force_host_platform_device_count={args.devices}"])
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    from train import sharding
    from train.config import TrainConfig
    from train.step import init_model, init_state, make_train_step, optimizer

    if args.coordinator:
        sharding.init_distributed(args.coordinator, args.num_processes, args.process_id)
    data = None
    saved: dict[str, np.ndarray] = {}
    diag: dict[str, dict] = {"process_count": jax.process_count(), "device_count": jax.device_count(),
                             "local_device_count": jax.local_device_count()}

    refs_done: set[str] = set()

    def flat(prefix: str, tree) -> None:
        for path, leaf in jax.tree.leaves_with_path(tree):
            saved[prefix + jax.tree_util.keystr(path)] = np.asarray(leaf)

    for combo in args.combos.split(","):
        combine, _, extra = combo.partition("+")
        cfg = TrainConfig.from_dict(dict(checkpoint=args.bert, combine=combine, lr=1e-3, hidden_dropout=0.1))
        spec, params = init_model(cfg, jax.random.key(0))
        host_params = jax.tree.map(np.asarray, params)
        data = data or batches(spec.bert.vocab_size)
        tx = optimizer(cfg, total_steps=STEPS)
        key = jax.random.key(1)
        if args.reference and combine not in refs_done:
            refs_done.add(combine)
            step = make_train_step(spec, tx, cfg.tasks, cfg.combine)
            state = init_state(jax.tree.map(jax.numpy.asarray, host_params), tx)
            for b in data:
                state, _ = step(state, b, key)
            flat(f"{combine}/ref", state.params)
            flat("init", host_params)
        dp = sharding.data_parallel(args.mesh, shard_params=extra == "fsdp", min_shard_size=256)
        state = dp.put(init_state(jax.tree.map(jax.numpy.asarray, host_params), tx))
        step = make_train_step(spec, tx, cfg.tasks, cfg.combine, dp=dp)
        losses = []
        for b in data:
            state, m = step(state, b, key)
            losses.append(float(m["loss"]))
        fn = step.jitted["fn"]
        lowered = fn.lower(state, {t: dp.put_batch(bt) for t, bt in data[0].items()}, dp.put(key, dp.replicated))
        compiled = lowered.compile()  # cached: the step above compiled it
        hlo = compiled.as_text()
        _, batch_sh, _ = compiled.input_shardings[0]
        ids = dp.put_batch(data[0]["sst"])["input_ids"]
        n_sharded = sum(1 for x in jax.tree.leaves(state.params) if not x.sharding.is_fully_replicated)
        mu_sharded = sum(1 for x in jax.tree.leaves(state.opt_state) if hasattr(x, "sharding") and not x.sharding.is_fully_replicated)
        diag[combo] = {
            "batch_spec": str(batch_sh["sst"]["input_ids"].spec),
            "shard_rows": sorted({s.data.shape[0] for s in ids.addressable_shards}),
            "n_addressable_shards": len(ids.addressable_shards),
            "param_leaves": len(jax.tree.leaves(state.params)),
            "param_leaves_sharded": n_sharded,
            "opt_leaves_sharded": mu_sharded,
            "metrics_replicated": bool(m["loss"].sharding.is_fully_replicated),
            "losses": losses,
            "hlo_all_reduce": "all-reduce" in hlo,
            "hlo_all_gather": "all-gather" in hlo,
        }
        host = jax.tree.map(lambda x: np.asarray(jax.device_get(x)) if x.is_fully_addressable or x.is_fully_replicated
                            else np.asarray(multihost_utils.process_allgather(x, tiled=True)), state.params)
        flat(f"{combo}/dp", host)
    if jax.process_index() == 0:
        np.savez(args.out, **saved)
        Path(args.out).with_suffix(".json").write_text(json.dumps(diag))
    return 0


if __name__ == "__main__":
    sys.exit(main())
