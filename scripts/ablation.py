"""The accuracy recipe's ablation: from `cpu-sum` to `cpu-recipe`, one change per row, each row a real training.

    python -m scripts.ablation --data-dir ../shared/data --out results/ablation --steps 300 [--rows 0,1,2]

Every row trains `--steps` steps (the same for all rows, so the rows compare the changes, not the lengths)
from the embedded checkpoint with seed 0, evaluates once on the full dev sets, and records SST / Para / STS /
overall, steps and wall time in OUT/ablation.json; finished rows are skipped when the command is run again.
OUT/ABLATION.md is the table (with the machine and load average). Changes accumulate: row k = row k-1 + one
change.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# (name, what changes, overrides on top of the previous row)
ROWS: list[tuple[str, str, list[str]]] = [
    ("cpu-sum", "the old `make train` preset: batch 8, linear pair heads, dropout 0.3, lr 5e-5 constant, <= 64 tokens", []),
    ("+cosine-sts", "STS head 5 relu(cos(u, v)) (the checkpoint's own similarity) instead of a linear pair head",
     ["heads.sts_head=cosine_relu"]),
    ("+dropout-0.1", "hidden dropout 0.1 instead of 0.3", ["hidden_dropout=0.1"]),
    ("+batch-16", "batch 16 per task, sequences <= 128 tokens (buckets 16/24/32/48/64/96/128)",
     ["batch_size=16", "max_len=128", "buckets=[16,24,32,48,64,96,128]"]),
    ("+warmup-linear", "warm-up over 2/15 of the steps (100 of 750), then linear decay to 0",
     ["warmup_steps={warmup}", "schedule=linear"]),
    ("+lr-1e-4-heads-10x", "peak lr 1e-4, heads at 10x the encoder's lr", ["lr=1e-4", "head_lr_scale=10"]),
    ("+length-groups", "length-grouped batches: fewer padded tokens per step",
     ["length_window=32", "step_impl=split"]),
    ("+sst-batch-32", "32 SST sentences per step, 16 pairs for paraphrase and STS (= `cpu-recipe`)",
     ["task_batch_size={{sst: 32}}"]),  # braces doubled: the overrides go through str.format
    ("cross-para (side)", "`cpu-recipe` with the paraphrase pair cross-encoded as one [CLS] a [SEP] b [SEP] sequence",
     ["heads.para_head=cross"]),
]


def row_overrides(k: int, steps: int) -> list[str]:
    warmup = max(1, round(steps * 100 / 750))
    return [o.format(warmup=warmup) for _, _, ov in ROWS[: k + 1] for o in ov]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rows", default=None, help="comma-separated row indices (default: all)")
    args = p.parse_args(argv)

    from scripts.bench_cmd import cpu_model
    from train.compilation import enable_cache
    from train.config import resolve_config
    from train.trainer import train

    enable_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    done_path = out / "ablation.json"
    done = json.loads(done_path.read_text()) if done_path.is_file() else {}
    rows = range(len(ROWS)) if args.rows is None else [int(r) for r in args.rows.split(",")]
    for k in rows:
        name = ROWS[k][0]
        if name in done:
            continue
        # one evaluation, at the end: epochs = 1 of `steps` steps
        overrides = row_overrides(k, args.steps) + [f"epoch_policy={args.steps}", "epochs=1", f"seed={args.seed}"]
        # every row runs the split step: the same math as the fused one (tests/test_split_step.py, <= 1e-6),
        # but its per-task programs compile far fewer shapes in a short run
        cfg = resolve_config("cpu-sum", ["step_impl=split"] + overrides)
        print(f"[ablation] row {k} {name}: {' '.join(overrides)}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        run = out / "runs" / name
        r = train(cfg, args.data_dir, run, resume=(run / "config.yaml").is_file())  # an interrupted row resumes
        done[name] = {k2: r[k2] for k2 in ("sst", "para", "sts", "overall", "step", "compile_s")} | {
            "wall_s": round(time.perf_counter() - t0, 1), "overrides": overrides, "load_avg": os.getloadavg()}
        done_path.write_text(json.dumps(done, indent=2))
    lines = [f"Ablation, `python -m scripts.ablation --steps {args.steps}`: checkpoint embedded (all-MiniLM-L6-v2), "
             f"data {args.data_dir}, seed {args.seed}, {args.steps} steps per row, full dev sets; {cpu_model()}.", "",
             "| row | change | SST | Para | STS | overall | steps | wall (min) | compile (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, what, _ in ROWS:
        if name in done:
            d = done[name]
            lines.append(f"| `{name}` | {what} | {d['sst']:.3f} | {d['para']:.3f} | {d['sts']:.3f} | {d['overall']:.3f} | "
                         f"{d['step']} | {d['wall_s'] / 60:.1f} | {d['compile_s']:.0f} |")
    (out / "ABLATION.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
