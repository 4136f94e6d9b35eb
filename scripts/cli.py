"""`bert-jax` command line: one sub-command per job. Side effects (files, printing) live here."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from typing import Callable, Iterator


def _strict(obj):
    """`obj` with every non-finite float (NaN, ±inf) as None, so that it prints as strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    return obj


def json_line(obj) -> str:
    """Strict JSON (RFC 8259) of `obj`: non-finite floats are written as null, never NaN / -Infinity."""
    return json.dumps(_strict(obj), allow_nan=False)


def _parity(args: argparse.Namespace) -> int:
    from bert_jax.parity import compare

    diffs = compare(args.checkpoint, batch=args.batch, seq=args.seq, seed=args.seed)
    worst = max(diffs.values())
    ok = worst <= args.tol
    print(json_line({"checkpoint": args.checkpoint, **diffs, "tolerance": args.tol, "ok": ok}))
    return 0 if ok else 1


class _Progress:
    """The training log on stderr, for a single run and a population alike: a tqdm bar of steps, a line per
    dev evaluation, notes. `start(e)` says what the run is (the line printed at its start event)."""

    def __init__(self, quiet: bool, start: Callable[[dict], str]):
        self.quiet, self.describe, self.bar = quiet, start, None

    def __call__(self, e: dict) -> None:
        from tqdm import tqdm

        from train.sharding import is_main_process

        if e["event"] == "start":
            if e["skipped"]:
                print(e["skipped"], file=sys.stderr)
            print(self.describe(e), file=sys.stderr)
            self.bar = tqdm(total=e["total_steps"], initial=e["start_step"], desc="train", dynamic_ncols=True,
                            disable=self.quiet or not is_main_process(), mininterval=1.0)
        elif e["event"] == "step":
            self.bar.update(e["step"] - self.bar.n)
            label = "mean_loss" if "loss_members" in e else "loss"  # a population's: the members' mean
            self.bar.set_postfix({label: f"{e['loss']:.3f}", "steps_s": f"{e['steps_per_s']:.2f}"})
        elif e["event"] == "programs" and e["ready"]:
            tqdm.write(f"programs: {e['ready']} ready before step 1 in {e['seconds']:.1f} s ({e['xla_compiles']} compiled, "
                       f"{e['stored_programs']} loaded from the executable store)", file=sys.stderr)
        elif e["event"] == "overwrite":
            kept = f"; keeping {', '.join(e['keeping'])}" if e["keeping"] else ""
            print(f"bert-jax train: --overwrite: deleting {', '.join(e['deleting'])} in {e['run']}{kept}", file=sys.stderr)
        elif e["event"] == "note":
            print(f"bert-jax train: note: {e['message']}", file=sys.stderr)
        elif e["event"] == "eval":
            shown = {k: round(e[k], 4) for k in (*_metric_names(), "overall") if isinstance(e.get(k), float)}
            where = e["member"] if "member" in e else f"(epoch {e['epoch']})"
            tqdm.write(f"dev @ step {e['step']} {where}: {json.dumps(shown)}{'  [best]' if e['best'] else ''}",
                       file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _metric_names() -> tuple[str, ...]:
    from train.tasks import TASKS

    return tuple(TASKS)


@contextlib.contextmanager
def _signals_stop() -> Iterator[dict]:
    """SIGINT / SIGTERM set `stop["sig"]` (the trainer polls it before every step, checkpoints and returns
    with `stopped`) instead of killing the process; the previous handlers are back on exit."""
    import signal

    stop = {"sig": None}
    previous = {s: signal.signal(s, lambda signum, _f: stop.update(sig=signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _train(args: argparse.Namespace) -> int:
    """Exit codes: 0 done; 2 user error (one line, no traceback); 3 non-finite loss (the last good checkpoint
    is kept); 128+signum (130 SIGINT, 143 SIGTERM) interrupted: the state was checkpointed mid-epoch, the
    process exited cleanly, and `--resume` continues exactly (a non-zero code so that scripts and job
    schedulers do not mistake an interrupted run for a finished one)."""
    from pathlib import Path

    from train.config import resolve_config
    from train.trainer import NonFiniteLoss, train

    config = args.config
    if config is None:  # --resume continues with the run's own config unless one is given
        own = Path(args.out) / "config.yaml"
        if args.population:  # a population's: its first member's (the members differ only in the population's fields)
            from train.population import member_name, parse_axes

            own = Path(args.out) / member_name(parse_axes(args.population)[0]) / "config.yaml"
        config = str(own) if args.resume and own.is_file() else "report"
    cfg = resolve_config(config, args.overrides, seed=args.seed, max_steps=args.steps, checkpoint=args.checkpoint)
    if args.framework == "torch":
        if args.population:
            raise ValueError("--population trains JAX populations; train the PyTorch baseline one run at a time")
        return _train_torch(cfg, args)
    from train.sharding import from_args, is_main_process

    dp = from_args(args)  # --mesh / multi-host (jax.distributed) before any JAX computation
    if dp is not None:
        for b in set(cfg.batch_sizes.values()):
            dp.check_batch_size(b)
    if args.population:
        if dp is not None:
            raise ValueError("--population trains on one device; drop --mesh")
        return _train_population(cfg, args)
    progress = _Progress(args.quiet, lambda e: f"train sizes {e['train_sizes']}; {e['steps_per_epoch']} steps/epoch, "
                                               f"{e['total_steps']} steps")
    with _signals_stop() as stop:
        try:
            result = train(cfg, args.data_dir, args.out, resume=args.resume, log=progress,
                           should_stop=lambda: stop["sig"] is not None, dp=dp, overwrite=args.overwrite,
                           tensorboard=not args.no_tensorboard)
        except NonFiniteLoss as e:
            print(f"bert-jax train: error: {e}", file=sys.stderr)
            return 3
        finally:
            progress.close()
    print(json_line(result))
    if not result["stopped"] and is_main_process():
        shown = ", ".join(f"{t} {result[t]:.4f}" for t in (*_metric_names(), "overall") if t in result)
        print(f"final dev metrics (step {result['step']}): {shown}\n"
              f"best dev overall {result['best_overall']:.4f}; best checkpoint: {result['best_checkpoint']}\n"
              f"wall {result['wall_s'] / 60:.1f} min; compiling {result['compile_s']:.1f} s "
              f"({result['xla_compiles']} XLA compiles, {result['compile_cache_hits']} loaded from the compile cache; "
              f"{result['stored_programs']} programs loaded from the executable store)",
              file=sys.stderr)
    if result["stopped"]:
        print(f"bert-jax train: interrupted by signal {stop['sig']}; checkpoint saved at step {result['step']}, "
              f"continue with --resume", file=sys.stderr)
        return 128 + int(stop["sig"])
    return 0


def _train_population(cfg, args: argparse.Namespace) -> int:
    """`train --population FIELD=V1,V2 ...`: the members train as one vmapped program (train/population.py), each
    into OUT/<member>; same exit codes as `train`."""
    from pathlib import Path

    from train.population import member_configs, member_name, parse_axes, train_population
    from train.trainer import NonFiniteLoss

    members = parse_axes(args.population)
    cfgs = member_configs(cfg, members)
    runs = [Path(args.out) / member_name(m) for m in members]
    progress = _Progress(args.quiet, lambda e: f"population of {len(runs)} in {args.out}: {', '.join(e['members'])}; "
                                               f"{e['steps_per_epoch']} steps/epoch, {e['total_steps']} steps")
    with _signals_stop() as stop:
        try:
            results = train_population(cfgs, runs, args.data_dir, resume=args.resume, log=progress,
                                       should_stop=lambda: stop["sig"] is not None, tensorboard=not args.no_tensorboard)
        except NonFiniteLoss as e:
            print(f"bert-jax train: error: {e}", file=sys.stderr)
            return 3
        finally:
            progress.close()
    for r in results:
        print(json_line(r))
    if stop["sig"] is not None:
        print(f"bert-jax train: interrupted by signal {stop['sig']}; checkpoints saved at step {results[0]['step']}, "
              f"continue with --resume", file=sys.stderr)
        return 128 + int(stop["sig"])
    for r in results:
        shown = ", ".join(f"{t} {r[t]:.4f}" for t in (*_metric_names(), "overall") if t in r)
        print(f"{r['member']}: final dev {shown}; best {r['best_overall']:.4f} at {r['best_checkpoint']}", file=sys.stderr)
    r = results[0]
    print(f"wall {r['wall_s'] / 60:.1f} min for {len(results)} members; compiling {r['compile_s']:.1f} s "
          f"({r['xla_compiles']} XLA compiles)", file=sys.stderr)
    return 0


def _train_torch(cfg, args: argparse.Namespace) -> int:
    """`train --framework torch`: the PyTorch baseline trains the same config on the same batches
    (scripts/torch_baseline.train_torch); final dev metrics to stdout and OUT/torch.json."""
    import platform
    import time
    from pathlib import Path

    import torch

    from scripts.torch_baseline import train_torch
    from train.data import resolve_data_dir

    out = Path(args.out)
    if (out / "torch.json").exists():
        raise UserError(f"{out / 'torch.json'} exists; choose a new --out")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    metrics = train_torch(cfg, resolve_data_dir(args.data_dir), log=lambda m: None if args.quiet else print(m, file=sys.stderr))
    record = {**metrics, "framework": "torch", "wall_s": round(time.perf_counter() - t0, 1), "torch": torch.__version__,
              "torch_threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
              "config": cfg.to_dict()}
    (out / "torch.json").write_text(json.dumps(record, indent=2))
    print(json.dumps({k: v for k, v in record.items() if k != "config"}))
    shown = ", ".join(f"{t} {metrics[t]:.4f}" for t in ("sst", "para", "sts", "overall") if t in metrics)
    print(f"final dev metrics (PyTorch baseline): {shown}; wall {record['wall_s'] / 60:.1f} min", file=sys.stderr)
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
    from pathlib import Path

    import bert_jax
    from train import data as D
    from train.tasks import get_task
    from train.trainer import check_token_ids, evaluate, load_encoded, scored_tasks

    if bool(args.input) != bool(args.task):
        raise UserError("--input FILE and --task TASK go together (a labelled file of that task's format)")
    cfg, spec, params, eval_fn = _load_run_for_eval(args.run, args)
    if args.task and args.task not in scored_tasks(cfg.heads.heads):
        raise UserError(f"{args.run} has no {args.task!r} head (its tasks: {', '.join(scored_tasks(cfg.heads.heads))})")
    tok = bert_jax.load_tokenizer(args.run)  # the run's own tokenizer files: the casing it trained with
    where: dict = {"split": args.split}
    if args.input:  # a labelled file outside the data directory (e.g. held-out pairs): rows with a bad label are skipped
        encs, (td,) = load_encoded(None, (args.task,), "dev", tok, cfg.data.max_len, cross=cfg.heads.cross_tasks,
                                   path=args.input)
        if td.labels is None:
            raise UserError(f"{args.input}: no label column {get_task(args.task).label_column!r} in the header, so "
                            f"nothing to score; `bert-jax predict --task {args.task} --input FILE` writes predictions")
        if td.skipped:
            print(D.summarize_skipped([td]), file=sys.stderr)
        where = {"input": args.input, "task": args.task, "rows": len(td), "skipped_rows": len(td.skipped)}
    else:
        encs, _ = load_encoded(D.resolve_data_dir(args.data_dir), scored_tasks(cfg.heads.heads), args.split, tok,
                               cfg.data.max_len, cross=cfg.heads.cross_tasks)
    check_token_ids(encs, spec.bert.vocab_size, Path(args.run) / "vocab.txt", Path(args.run) / "bert_config.json")
    metrics, _ = evaluate(eval_fn, params, encs, cfg.data.eval_batch_size, cfg.data.scoring_buckets)
    print(json_line({"run": args.run, **where, **metrics}))
    return 0


def _predict(args: argparse.Namespace) -> int:
    from pathlib import Path

    import numpy as np

    import bert_jax
    from train import data as D
    from train.predict import write_leaderboard_file
    from train.sharding import is_main_process
    from train.trainer import check_token_ids, predict_scores, scored_tasks

    if args.input and not args.task:
        raise UserError("--input needs --task")
    cfg, spec, params, eval_fn = _load_run_for_eval(args.run, args)
    tok = bert_jax.load_tokenizer(args.run)  # the run's own tokenizer files: the casing it trained with
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # --input FILE: the output is named after FILE, so it never replaces the split's own prediction file
    label = None
    if args.input:
        label = Path(args.input).stem
        label = f"{label}-input" if label in D.SPLITS else label
    tasks = (args.task,) if args.task else scored_tasks(cfg.heads.heads)
    data_dir = None if args.input else D.resolve_data_dir(args.data_dir)
    saved = {}
    for t in tasks:
        td = D.load_task(data_dir, t, args.split, path=args.input, read_labels=False)  # labels are not needed
        if td.skipped:
            print(D.summarize_skipped([td]), file=sys.stderr)
        enc = D.encode_task(td, tok, cfg.data.max_len, cross=t in cfg.heads.cross_tasks)
        check_token_ids({t: enc}, spec.bert.vocab_size, Path(args.run) / "vocab.txt", Path(args.run) / "bert_config.json")
        scores = predict_scores(eval_fn, params, enc, cfg.data.eval_batch_size, cfg.data.scoring_buckets)
        saved[f"{t}_scores"], saved[f"{t}_ids"] = scores, np.asarray(enc.ids)
        if is_main_process():  # multi-host: every process has the scores, one writes
            path = write_leaderboard_file(out, t, args.split, enc.ids, scores, label=label)
            print(f"wrote {path} ({len(enc.ids)} rows)", file=sys.stderr)
    if args.scores and is_main_process():
        np.savez(args.scores, **saved)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from train.tasks import TASKS

    parser = argparse.ArgumentParser(prog="bert-jax", description=__doc__)
    parser.add_argument("--compile-cache", default=None, metavar="DIR|off",
                        help="JAX persistent compilation cache (default: $BERT_JAX_COMPILE_CACHE, else "
                             "~/.cache/bert-jax/jax; 'off' disables it)")
    parser.add_argument("--no-malloc-tuning", action="store_true",
                        help="leave glibc malloc at its defaults (scripts.host: by default freed memory is kept for "
                             "reuse, which saves XLA's CPU steps ~15%% of their time in page faults)")
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
    p.add_argument("--overwrite", action="store_true",
                   help="--out holds a bert-jax run: start it over (its checkpoints, metrics and run files are "
                        "deleted, announced on stderr first; other files are kept)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--no-tensorboard", action="store_true", help="do not write RUN/tensorboard (TensorBoard event files of the losses and dev metrics)")
    p.add_argument("--framework", choices=["jax", "torch"], default="jax",
                   help="torch: the PyTorch baseline trains the same config on the same batches (final dev metrics "
                        "in OUT/torch.json)")
    p.add_argument("--population", action="append", metavar="FIELD=V1,V2,...",
                   help="train a population as one vmapped program: one member per combination of the given values "
                        "(repeat the flag per field; fields: lr, hidden_dropout, seed, combine), each into "
                        "OUT/<field><value>-...; e.g. --population lr=4e-5,8e-5 --population seed=0,1")
    p.add_argument("overrides", nargs="*", help="config overrides key=value (e.g. lr=3e-5 combine=pcgrad heads.sts_head=cosine)")
    add_mesh_args(p)
    p.set_defaults(func=_train)

    p = sub.add_parser("evaluate", help="metrics of a run on a split (or a labelled --input file), as JSON")
    p.add_argument("run")
    p.add_argument("--split", default="dev", choices=["train", "dev"])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--task", choices=list(TASKS), default=None, help="with --input: the task of FILE")
    p.add_argument("--input", default=None, metavar="FILE",
                   help="score this labelled file (of --task's format, e.g. held-out Quora pairs) instead of the split")
    add_mesh_args(p)
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("predict", help="CS224N leaderboard files of a run")
    p.add_argument("run")
    p.add_argument("--split", default="dev", choices=["dev", "test"])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--task", choices=list(TASKS), default=None, help="only this task")
    p.add_argument("--input", default=None, help="predict this file (of --task's format) instead of the split's; "
                   "writes <task>-<file name>-output.csv")
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


_COMMAND_MODULES = ("scripts.ensemble_cmd", "scripts.bench_cmd", "scripts.experiments_cmd", "scripts.gpu_check_cmd")


class UserError(Exception):
    """An error caused by the user's input: printed as one line, no traceback."""


def main(argv: list[str] | None = None) -> int:
    import logging

    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's informational warnings
    parser = build_parser()
    # key=value overrides may also follow flags (`train ... --quiet seed=0`): argparse leaves those unparsed
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(x.startswith("-") or "=" not in x for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides or []) + extra
    from scripts.host import prepare_process

    args.process = prepare_process(malloc=not (args.no_malloc_tuning or getattr(args, "bench_no_malloc_tuning", False)))
    try:
        if args.command != "parity":
            from train.compilation import enable_cache

            enable_cache(args.compile_cache)
        return args.func(args)
    except (UserError, FileNotFoundError, ValueError, OSError) as e:
        print(f"bert-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
