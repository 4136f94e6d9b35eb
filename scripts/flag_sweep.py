"""XLA CPU flag / PRNG / allocator sweep of the JAX train step (issue: why the lead over PyTorch differs by CPU).

    python -m scripts.flag_sweep [--seq 64] [--batch 16] [--reps 5]

Each setting runs in a fresh process (XLA_FLAGS and JAX_DEFAULT_PRNG_IMPL are read when jax starts): the
`cpu-recipe` model's fused train step (summed losses) on synthetic batches (`bench --what step`'s), compiled,
one warm-up step, then `--reps` timed steps; prints one JSON line per setting (median and min seconds per step).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

SETTINGS: list[tuple[str, dict[str, str]]] = [
    ("default (malloc tuned)", {}),
    ("malloc untuned", {"SWEEP_NO_MALLOC": "1"}),
    ("xnnpack", {"XLA_FLAGS": "--xla_cpu_use_xnnpack=true"}),
    ("onednn", {"XLA_FLAGS": "--xla_cpu_use_onednn=true"}),
    ("fast math", {"XLA_FLAGS": "--xla_cpu_enable_fast_math=true"}),
    ("vector width 512", {"XLA_FLAGS": "--xla_cpu_prefer_vector_width=512"}),
    ("rbg PRNG", {"JAX_DEFAULT_PRNG_IMPL": "rbg"}),
    ("no dropout", {"SWEEP_OVERRIDES": "hidden_dropout=0 attention_dropout=0"}),
]


def _child(batch: int, seq: int, reps: int) -> None:
    from scripts.host import prepare_process

    prepare_process(malloc=not os.environ.get("SWEEP_NO_MALLOC"))
    import numpy as np

    from scripts.bench_cmd import JaxArm, synthetic_batches
    from train.config import resolve_config

    cfg = resolve_config("cpu-recipe", ["step_impl=fused"] + os.environ.get("SWEEP_OVERRIDES", "").split(),
                         batch_size=batch, tasks=["sst", "para", "sts"])
    arm = JaxArm(cfg, 0)
    batches = synthetic_batches(arm.spec.bert.vocab_size, batch, seq, 0)
    t0 = time.perf_counter()
    arm(batches)
    first = time.perf_counter() - t0
    arm(batches)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        arm(batches)
        ts.append(time.perf_counter() - t0)
    print(json.dumps({"first_call_s": round(first, 1), "median_s": round(float(np.median(ts)), 3),
                      "min_s": round(min(ts), 3)}))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(args.batch, args.seq, args.reps)
        return 0
    from scripts.bench_cmd import cpu_model

    print(json.dumps({"cpu": cpu_model(), "batch": args.batch, "seq": args.seq, "reps": args.reps}))
    for name, env in SETTINGS:
        out = subprocess.run([sys.executable, "-m", "scripts.flag_sweep", "--child", "--batch", str(args.batch),
                              "--seq", str(args.seq), "--reps", str(args.reps)],
                             env={**os.environ, **env}, capture_output=True, text=True, check=True)
        print(json.dumps({"setting": name, **env, **json.loads(out.stdout.strip().splitlines()[-1])}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
