"""`bert-jax` command line: one sub-command per job. Side effects (files, printing) live here."""

from __future__ import annotations

import argparse
import json
import sys


def _parity(args: argparse.Namespace) -> int:
    from bert_jax.parity import compare

    diffs = compare(args.checkpoint, batch=args.batch, seq=args.seq, seed=args.seed)
    worst = max(diffs.values())
    ok = worst <= args.tol
    print(json.dumps({"checkpoint": args.checkpoint, **diffs, "tolerance": args.tol, "ok": ok}))
    return 0 if ok else 1


def _train(args: argparse.Namespace) -> int:
    """Exit codes: 0 done; 2 user error (one line, no traceback); 3 non-finite loss (the last good checkpoint
    is kept); 128+signum (130 SIGINT, 143 SIGTERM) interrupted: the state was checkpointed mid-epoch, the
    process exited cleanly, and `--resume` continues exactly (a non-zero code so that scripts and job
    schedulers do not mistake an interrupted run for a finished one)."""
    import signal
    from pathlib import Path

    from tqdm import tqdm

    from train.config import resolve_config
    from train.trainer import NonFiniteLoss, train

    config = args.config
    if config is None:  # --resume continues with the run's own config unless one is given
        own = Path(args.out) / "config.yaml"
        config = str(own) if args.resume and own.is_file() else "report"
    cfg = resolve_config(config, args.overrides, seed=args.seed, max_steps=args.steps, checkpoint=args.checkpoint)
    from train.sharding import from_args, is_main_process

    dp = from_args(args)  # --mesh / multi-host (jax.distributed) before any JAX computation
    if dp is not None:
        dp.check_batch_size(cfg.batch_size)
    stop = {"sig": None}

    def on_signal(signum, _frame):
        stop["sig"] = signum

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    bar = None

    def log(e: dict) -> None:
        nonlocal bar
        if e["event"] == "start":
            if e["skipped"]:
                print(e["skipped"], file=sys.stderr)
            print(f"train sizes {e['train_sizes']}; {e['steps_per_epoch']} steps/epoch, {e['total_steps']} steps", file=sys.stderr)
            bar = tqdm(total=e["total_steps"], initial=e["start_step"], desc="train", dynamic_ncols=True,
                       disable=args.quiet or not is_main_process(), mininterval=1.0)
        elif e["event"] == "step":
            bar.update(e["step"] - bar.n)
            bar.set_postfix(loss=f"{e['loss']:.3f}", steps_s=f"{e['steps_per_s']:.2f}")
        elif e["event"] == "eval":
            shown = {k: round(v, 4) for k, v in e.items() if isinstance(v, float)}
            tqdm.write(f"dev @ step {e['step']} (epoch {e['epoch']}): {json.dumps(shown)}{'  [best]' if e['best'] else ''}", file=sys.stderr)

    try:
        result = train(cfg, args.data_dir, args.out, resume=args.resume, log=log, should_stop=lambda: stop["sig"] is not None,
                       dp=dp)
    except NonFiniteLoss as e:
        print(f"bert-jax train: error: {e}", file=sys.stderr)
        return 3
    finally:
        if bar is not None:
            bar.close()
        for s, h in previous.items():
            signal.signal(s, h)
    print(json.dumps(result))
    if result["stopped"]:
        print(f"bert-jax train: interrupted by signal {stop['sig']}; checkpoint saved at step {result['step']}, "
              f"continue with --resume", file=sys.stderr)
        return 128 + int(stop["sig"])
    return 0


def _load_run_for_eval(run: str, args: argparse.Namespace | None = None):
    from train.checkpoint import load_params
    from train.sharding import from_args
    from train.step import make_eval_fn

    dp = from_args(args) if args is not None else None  # --mesh / multi-host, before any JAX computation
    cfg, spec, params = load_params(run)
    if dp is not None:
        params = dp.put(params)
    return cfg, spec, params, make_eval_fn(spec, dp)


def _evaluate(args: argparse.Namespace) -> int:
    import bert_jax
    from train.data import resolve_data_dir
    from train.trainer import EVAL_TASKS, evaluate, load_encoded

    cfg, spec, params, eval_fn = _load_run_for_eval(args.run, args)
    tok = bert_jax.load_tokenizer(args.run)
    encs, raw = load_encoded(resolve_data_dir(args.data_dir), EVAL_TASKS, args.split, tok, cfg.max_len)
    metrics, _ = evaluate(eval_fn, params, encs, cfg.eval_batch_size, cfg.buckets)
    print(json.dumps({"run": args.run, "split": args.split, **metrics}))
    return 0


def _predict(args: argparse.Namespace) -> int:
    from pathlib import Path

    import numpy as np

    import bert_jax
    from train import data as D
    from train.predict import write_leaderboard_file
    from train.sharding import is_main_process
    from train.trainer import EVAL_TASKS, predict_scores

    cfg, spec, params, eval_fn = _load_run_for_eval(args.run, args)
    tok = bert_jax.load_tokenizer(args.run)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.input and not args.task:
        raise UserError("--input needs --task")
    tasks = (args.task,) if args.task else EVAL_TASKS
    data_dir = None if args.input else D.resolve_data_dir(args.data_dir)
    saved = {}
    for t in tasks:
        td = D.load_task(data_dir, t, args.split, path=args.input)
        if td.skipped:
            print(D.summarize_skipped([td]), file=sys.stderr)
        enc = D.encode_task(td, tok, cfg.max_len)
        scores = predict_scores(eval_fn, params, enc, cfg.eval_batch_size, cfg.buckets)
        saved[f"{t}_scores"], saved[f"{t}_ids"] = scores, np.asarray(enc.ids)
        if is_main_process():  # multi-host: every process has the scores, one writes
            path = write_leaderboard_file(out, t, args.split, enc.ids, scores)
            print(f"wrote {path} ({len(enc.ids)} rows)", file=sys.stderr)
    if args.scores and is_main_process():
        np.savez(args.scores, **saved)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bert-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("parity", help="max abs difference of bert_jax vs transformers' BertModel")
    p.add_argument("--checkpoint", default="embedded", help="'embedded' or a local HF BERT directory")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tol", type=float, default=1e-4)
    p.set_defaults(func=_parity)

    p = sub.add_parser("train", help="multitask fine-tuning (round-robin SST / Quora / STS)")
    p.add_argument("--data-dir", default=None, help="CS224N data directory (else $BERT_JAX_DATA, else ./data)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--config", default=None, help="preset name or YAML file (presets: see train/config.py); "
                   "default: report, or with --resume the run's own config.yaml")
    p.add_argument("--steps", type=int, default=None, help="stop after N steps in total")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--checkpoint", default=None, help="'embedded' or a local HF BERT directory")
    p.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", help="config overrides key=value (e.g. lr=3e-5 combine=pcgrad heads.sts_head=cosine)")
    add_mesh_args(p)
    p.set_defaults(func=_train)

    p = sub.add_parser("evaluate", help="metrics of a run on a split, as JSON")
    p.add_argument("run")
    p.add_argument("--split", default="dev", choices=["train", "dev"])
    p.add_argument("--data-dir", default=None)
    add_mesh_args(p)
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("predict", help="CS224N leaderboard files of a run")
    p.add_argument("run")
    p.add_argument("--split", default="dev", choices=["dev", "test"])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--task", choices=["sst", "para", "sts", "cfimdb"], default=None, help="only this task")
    p.add_argument("--input", default=None, help="predict this file (of --task's format) instead of the split's")
    p.add_argument("--scores", default=None, help="also save raw per-task scores and ids to this .npz")
    add_mesh_args(p)
    p.set_defaults(func=_predict)

    # Sub-commands that live in their own modules: each has `register(subparsers)`.
    import importlib
    import importlib.util

    for name in _COMMAND_MODULES:
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name).register(sub)
    return parser


def add_mesh_args(parser: argparse.ArgumentParser, distributed: bool = True) -> None:
    """`--mesh data=N`, `--shard-params` and the multi-host flags; the handler calls
    `train.sharding.from_args(args)` first (before any JAX computation) to get a `DataParallel` or None."""
    g = parser.add_argument_group("parallelism (train/sharding.py)")
    g.add_argument("--mesh", default=None, metavar="data=N",
                   help="data parallelism over N devices ('all' = every device): batches split along mesh axis 'data'")
    g.add_argument("--shard-params", action="store_true",
                   help="with --mesh: shard large params and optimizer state along 'data' too (FSDP) instead of replicating")
    if distributed:
        g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                       help="multi-host: process 0's coordinator address (else $JAX_COORDINATOR_ADDRESS)")
        g.add_argument("--num-processes", type=int, default=None, help="multi-host: number of processes (else $JAX_NUM_PROCESSES)")
        g.add_argument("--process-id", type=int, default=None, help="multi-host: this process's id 0..N-1 (else $JAX_PROCESS_ID)")
        g.add_argument("--distributed", action="store_true",
                       help="multi-host: jax.distributed.initialize() with auto-detection (SLURM, Open MPI, TPU)")


_COMMAND_MODULES = ("scripts.ensemble_cmd", "scripts.bench_cmd", "scripts.experiments_cmd")


class UserError(Exception):
    """An error caused by the user's input: printed as one line, no traceback."""


def main(argv: list[str] | None = None) -> int:
    import logging

    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's informational warnings
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (UserError, FileNotFoundError, ValueError, OSError) as e:
        print(f"bert-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
