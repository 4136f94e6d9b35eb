"""The training driver: data -> jitted steps -> dev evaluation -> checkpoints.

Side effects are limited to the run directory (through `train.checkpoint`); printing and progress bars
are the caller's, through the `log` callback which receives event dicts:
  {"event": "start", "total_steps", "steps_per_epoch", "start_step", "skipped": str}
  {"event": "programs", "ready", "seconds", "compile_s", "xla_compiles", "compile_cache_hits", "stored_programs"}
                                       (the programs loaded or compiled before the first step, `prepare_programs`)
  {"event": "step", "step", "epoch", "loss", "loss_<task>", "steps_per_s"}     (every `log_every` steps)
  {"event": "eval", "step", "epoch", "<task>": metric, "overall", "best": bool}
  {"event": "stopped", "reason", "step"}
  {"event": "overwrite", "run", "deleting": [names], "keeping": [names]}   (before `overwrite` deletes)
  {"event": "note", "message"}                                            (e.g. a stale run lock taken over)

Reliability (tests/test_reliability.py injects each fault):
- the training state is checkpointed at every epoch end and when `should_stop()` turns true (SIGINT /
  SIGTERM in the CLI); the checkpoint holds params, optimizer state, step and the data position
  (epoch, step in epoch, steps per epoch, train sizes, best dev overall), and a resumed run replays the
  remaining steps exactly: it ends bitwise equal (on CPU) to an uninterrupted run with the same seed.
- `--resume` refuses a config or training data that differ from the run's (except RESUMABLE_CHANGES;
  the data are compared by per-task example counts and a sha256 fingerprint of the encoded token ids and
  labels, stored in the checkpoint's position), another checkpoint or a tokenizer whose files differ from
  the run's, and rewinds metrics.jsonl to the checkpoint's step, so redone evaluations are not duplicated.
- the run directory is owned (train/rundir.py): `--out` must be new, empty or a bert-jax run (then
  `--resume` or `overwrite`), and an exclusive lock (RUN/.lock) keeps a second writer out.
- data are validated before the first step: a task whose train or dev file has no usable row is an error
  naming the file, and a token id outside the checkpoint's vocab_size an error naming vocab and config.
- at every epoch end the training state is saved *before* the dev evaluation, so a failed evaluation never
  loses trained steps; a run resumed from such a checkpoint redoes the evaluation if it was not recorded.
- a non-finite loss or gradient norm (checked at every metrics flush, and always before a save) or
  non-finite params (checked before every save) raise `NonFiniteLoss`: nothing is saved after the
  fault, so the last good checkpoint stays the latest.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

import bert_jax
from bert_jax import Params
from bert_jax.tokenizer import tokenizer_files
from train import data as D
from train.compilation import CompileEvents, StoredProgram, frozen_heap
from train.checkpoint import (METRICS, Checkpointer, DevScores, RunError, append_metrics, has_steps, read_metrics,
                              read_run_config, write_run_files)
from train.rundir import RunLock, check_out_dir, check_tokenizer, clear_run, data_fingerprint
from train.config import TrainConfig
from train.loop import Loop, StepInfo, StepMetrics, StepRate, data_position, eval_due, first_non_finite, watched
from train.metrics import summarize, task_metric
from train.tensorboard import TensorBoard, close_hooks, event_hooks
from train.sharding import DataParallel, is_main_process
from train.tasks import evaluated_tasks
from train.optim import ema_params
from train.step import TrainState, init_model, init_state, make_eval_fn, make_train_step, optimizer, optimizer_key



# Config fields a resumed run may change: they alter neither the checkpointed state nor the data order.
# (Not "checkpoint": a resumed run keeps its pretrained checkpoint, and its tokenizer, see rundir.check_tokenizer.)
RESUMABLE_CHANGES = frozenset({"data.max_steps", "data.epochs", "keep_checkpoints", "data.eval_batch_size", "data.eval_buckets", "eval_every",
                               "model.attention_impl", "model.remat", "model.scan_layers", "step_impl"})


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN/inf loss; the run stopped without saving the bad state."""


@jax.jit
def _all_finite_jit(tree) -> jax.Array:
    """True iff every floating-point leaf of `tree` is finite (one fused reduction)."""
    leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.stack(leaves).all() if leaves else jnp.array(True)


_all_finite = StoredProgram(_all_finite_jit, "all_finite")  # a second run loads it without tracing


def _check_resume_config(run: Path, cfg: TrainConfig) -> None:
    """A resumed run must continue the same training: only RESUMABLE_CHANGES may differ from RUN/config.yaml."""
    if not (run / "config.yaml").is_file():
        return
    saved = read_run_config(run)[0].flat()  # a run written with flat keys (before the sections) compares the same
    now = cfg.flat()
    diff = [k for k in saved if k not in RESUMABLE_CHANGES and saved[k] != now.get(k)]
    if diff:
        shown = "; ".join(f"{k}: {saved[k]!r} in the run, {now.get(k)!r} now" for k in diff[:4])
        flags = "--config / --checkpoint" if "checkpoint" in diff else "--config"
        raise RunError(f"{run}: --resume with a different config ({shown}); "
                       f"omit {flags} to resume with the run's own, or train into a new --out")


def _rewind_metrics(path: Path, step: int, write: bool = True) -> dict[str, Any]:
    """Keep the evaluation records of steps <= `step` in metrics.jsonl (a resumed run redoes later ones;
    a kill mid-append may have left a torn last line). Returns the last kept record ({} if none).
    `write=False` (not the main process) only reads."""
    if not path.exists():
        return {}
    kept = [r for r in read_metrics(path) if isinstance(r.get("step"), int) and r["step"] <= step]
    if not write:
        return kept[-1] if kept else {}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)
    return kept[-1] if kept else {}




def load_encoded(data_dir: Path | None, tasks: tuple[str, ...], split: str, tokenizer, max_len: int,
                 limit: int | None = None, cross: tuple[str, ...] = (), path: str | Path | None = None
                 ) -> tuple[dict[str, D.Encoded], list[D.TaskData]]:
    """Load + tokenize `split` of each task (first `limit` examples when given); the pair tasks in `cross`
    (`HeadConfig.cross_tasks`) as cross-encoded sequences. `path`: read this file instead (one task's format, e.g.
    `evaluate --input`)."""
    out, raw = {}, []
    for t in tasks:
        td = D.load_task(data_dir, t, split, path=path)
        if len(td) == 0:  # checked before any step: a task without data fails now, naming its file
            why = (f"all {len(td.skipped)} data rows are malformed, e.g. line {td.skipped[0].line}: {td.skipped[0].reason}"
                   if td.skipped else "nothing after the header row")
            raise D.DataError(f"{td.path}: no usable row in the {split} file of task {t!r} ({why}); fix the file")
        raw.append(td)
        if limit is not None and len(td) > limit:
            td = dataclasses.replace(td, ids=td.ids[:limit], sentences1=td.sentences1[:limit],
                                     sentences2=None if td.sentences2 is None else td.sentences2[:limit],
                                     labels=None if td.labels is None else td.labels[:limit])
        out[t] = D.encode_task(td, tokenizer, max_len, cross=t in cross)
    return out, raw


def check_token_ids(encs: dict[str, D.Encoded], vocab_size: int, vocab: Path, config: Path) -> None:
    """Every token id must index the encoder's embedding table: an id >= `vocab_size` means the vocabulary
    (`vocab`) does not belong to the model (`config`); reported before any step, not as a non-finite loss."""
    for t, e in encs.items():
        for seqs in (e.tokens1, e.tokens2):
            if not seqs:
                continue
            top = int(np.concatenate(seqs).max(initial=0))
            if top >= vocab_size:
                raise RunError(f"{vocab}: the tokenizer gives token id {top} (task {t}), but {config} has vocab_size "
                               f"{vocab_size}: this vocabulary does not belong to the model; use the checkpoint's "
                               f"own vocab.txt")


def predict_scores(eval_fn, params: Params, enc: D.Encoded, batch_size: int, buckets) -> np.ndarray:
    """Scores for every example of `enc`, in order: [N, 5] (sst), [N, 2] (cfimdb), [N] (para, sts).

    Batches group examples of similar length (`D.length_order`: less padding); scores come back in file order."""
    order = D.length_order(enc)
    outs = [eval_fn(params, enc.task, b) for b in D.eval_batches(enc, batch_size, buckets, order)]  # async dispatch
    sorted_scores = np.concatenate([np.asarray(o) for o in outs])[: len(enc)]
    scores = np.empty_like(sorted_scores)
    scores[order] = sorted_scores
    return scores


def scored_tasks(heads: tuple[str, ...], extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The dev tasks a model with `heads` is scored on: the registry's evaluated tasks it has a head for, then
    `extra` (e.g. its trained tasks that are not evaluated by default, such as cfimdb)."""
    return tuple(dict.fromkeys([t for t in evaluated_tasks() if t in heads] + list(extra)))


def schedule(cfg: TrainConfig, train_sets: dict[str, D.Encoded], subsets: dict[str, np.ndarray]) -> D.Schedule:
    """`cfg`'s step schedule over the training subsets (see `train.data.Schedule`)."""
    return D.Schedule(train_sets, subsets, cfg.batch_sizes, cfg.order_seed, cfg.data.epoch_policy, cfg.data.buckets,
                      cfg.data.align_buckets, cfg.data.length_window)


def evaluate(eval_fn, params: Params, encs: dict[str, D.Encoded], batch_size: int, buckets) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    scores = {t: predict_scores(eval_fn, params, e, batch_size, buckets) for t, e in encs.items()}
    metrics = {t: task_metric(t, s, encs[t].labels) for t, s in scores.items() if encs[t].has_labels}
    return summarize(metrics), scores


def prepare_programs(step_fn, eval_fn, state: TrainState, data: "RunData", start: int, rng: jax.Array,
                     eval_batch_size: int, buckets) -> int:
    """Load (or compile) the programs of every training step from `start` and of the dev evaluation before the first
    step: the per-task programs of the shapes `data.sched` will give (`Schedule.shape_examples`), the update, and one
    scorer per dev batch shape. Loaded this way they use an idle CPU, where a load at first use runs beside the
    previous step's computation (asynchronous dispatch) and both take longer. Returns how many are ready; a step or
    scorer without `prepare` (the fused step, several devices) or with the store off compiles at first use."""
    ready = 0
    if hasattr(step_fn, "prepare"):
        ready += step_fn.prepare(state, data.sched.shape_examples(start, data.total), rng)
    if hasattr(eval_fn, "prepare"):
        for task, enc in data.dev.items():
            shapes = set()
            for b in D.eval_batches(enc, eval_batch_size, buckets, D.length_order(enc)):
                shape = tuple((k, v.shape) for k, v in sorted(b.items()))
                if shape not in shapes:
                    shapes.add(shape)
                    ready += eval_fn.prepare(state.params, task, b) is not None
    return ready


def dev_metrics(eval_fn, state: TrainState, encs: dict[str, D.Encoded], batch_size: int,
                buckets) -> tuple[Params, dict[str, float], dict[str, np.ndarray]]:
    """The run's model, its dev metrics and its per-example dev scores. With a moving average of the weights in
    the optimizer state (`optim.ema_decay`) the model is that average, and the raw weights' metrics are added as
    `raw_<key>` (the same run's A/B); else the model is the weights."""
    ema = ema_params(state.opt_state)
    if ema is None:
        return state.params, *evaluate(eval_fn, state.params, encs, batch_size, buckets)
    raw = evaluate(eval_fn, state.params, encs, batch_size, buckets)[0]
    metrics, scores = evaluate(eval_fn, ema, encs, batch_size, buckets)
    return ema, {**metrics, **{f"raw_{k}": v for k, v in raw.items()}}, scores


def dev_scores(cfg: TrainConfig, encs: dict[str, D.Encoded], scores: dict[str, np.ndarray]) -> DevScores:
    """What `Checkpointer.save_best` records of a best evaluation (`ensemble --recorded-scores` reads it)."""
    return DevScores({t: encs[t].ids for t in scores}, scores, cfg.data.dev_limit)


def _subset(n: int, limit: int | None, seed: int) -> np.ndarray:
    """The training examples of a task: all, or a seeded random `limit` of them."""
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng((seed, 7)).permutation(n)[:limit])


@dataclasses.dataclass
class RunData:
    """A run's encoded data and step schedule (`load_run_data`)."""

    train: dict[str, D.Encoded]
    dev: dict[str, D.Encoded]
    skipped: str  # the malformed rows skipped, summarized ("" if none)
    sched: D.Schedule
    fingerprint: dict[str, str]  # task -> sha256 of its training subset (checked on --resume)
    total: int  # steps of the whole run

    def check_vocab(self, cfg: TrainConfig, vocab_size: int) -> None:
        ckpt_dir = bert_jax.resolve_checkpoint(cfg.checkpoint)
        for encs in (self.train, self.dev):
            check_token_ids(encs, vocab_size, ckpt_dir / "vocab.txt", ckpt_dir / "config.json")


def load_run_data(cfg: TrainConfig, data_dir: Path) -> RunData:
    """Load and tokenize `cfg`'s training and dev data; its training subsets and step schedule."""
    tokenizer = bert_jax.load_tokenizer(cfg.checkpoint)
    cross = cfg.heads.cross_tasks
    train_sets, raw_train = load_encoded(data_dir, cfg.tasks, "train", tokenizer, cfg.data.max_len, cross=cross)
    eval_tasks = scored_tasks(cfg.heads.heads, extra=cfg.tasks)
    dev_sets, raw_dev = load_encoded(data_dir, eval_tasks, "dev", tokenizer, cfg.data.max_len, cfg.data.dev_limit, cross=cross)
    subsets = {t: _subset(len(e), cfg.data.train_limit, cfg.order_seed) for t, e in train_sets.items()}
    sched = schedule(cfg, train_sets, subsets)
    per_epoch = sched.steps_per_epoch
    total = cfg.data.epochs * per_epoch if cfg.data.max_steps is None else min(cfg.data.max_steps, cfg.data.epochs * per_epoch)
    return RunData(train_sets, dev_sets, D.summarize_skipped(raw_train + raw_dev), sched,
                   {t: data_fingerprint(train_sets[t], subsets[t]) for t in sorted(train_sets)}, total)


def check_position(where: Path, position: dict[str, Any], sizes: dict[str, int], fingerprint: dict[str, str],
                   steps_per_epoch: int) -> None:
    """A checkpoint's data position must match the data and schedule of the run resuming it."""
    if position.get("train_sizes", sizes) != sizes:
        raise RunError(f"{where}: the training data changed since this checkpoint (examples per task "
                       f"{position['train_sizes']} then, {sizes} now); resume with the same data")
    then = position.get("train_fingerprint", fingerprint)
    changed = sorted(t for t in fingerprint if then.get(t, fingerprint[t]) != fingerprint[t])
    if changed:
        raise RunError(f"{where}: the training data changed since this checkpoint (task(s) {', '.join(changed)}: "
                       f"same number of examples, different content: sha256 {then[changed[0]][:12]}... then, "
                       f"{fingerprint[changed[0]][:12]}... now); resume with the same data and tokenizer, "
                       f"or train into a new --out")
    if position.get("steps_per_epoch", steps_per_epoch) != steps_per_epoch:
        raise RunError(f"{where}: checkpoint has {position['steps_per_epoch']} steps per epoch, "
                       f"the config gives {steps_per_epoch}; resume with the run's config")


def train(
    cfg: TrainConfig,
    data_dir: str | Path | None,
    run_dir: str | Path,
    resume: bool = False,
    log: Callable[[dict[str, Any]], None] = lambda e: None,
    should_stop: Callable[[], bool] = lambda: False,
    log_every: int = 20,
    fault: Callable[[int, dict], dict] | None = None,
    dp: DataParallel | None = None,
    overwrite: bool = False,
    tensorboard: bool = True,
) -> dict[str, Any]:
    """Train per `cfg`, writing `run_dir`. Returns the last dev metrics (plus `best_overall`, `step`).

    `should_stop()` is polled every step: when it turns true the state is checkpointed and training
    returns with `stopped=True` (used for SIGINT/SIGTERM). `fault(step, batches)` is a test hook that
    may rewrite a step's batches (fault injection). `dp` (train.sharding): data-parallel over its mesh;
    `cfg.data.batch_size` must be divisible by the mesh size. `run_dir` must be new, empty or a bert-jax run
    (then `resume`, or `overwrite`: its bert-jax files are deleted, announced by an "overwrite" event, once
    the new run's data and model have loaded); it is locked (RUN/.lock) for the whole call, by process 0.
    `tensorboard`: also write the log events to RUN/tensorboard (`train.tensorboard`).
    """
    run = Path(run_dir)
    if cfg.model.dtype == "auto":  # -> this machine's (or the resumed run's) dtype, before config.yaml is written
        resumed = resume and all((run / f).is_file() for f in ("config.yaml", "bert_config.json"))
        cfg = cfg.resolve_dtype(read_run_config(run)[0] if resumed else None)
    if not is_main_process():  # multi-host: process 0 owns and locks the directory
        return _train_run(cfg, data_dir, run, resume, log, should_stop, log_every, fault, dp, overwrite, False)
    with RunLock(run, note=lambda msg: log({"event": "note", "message": msg})):
        check_out_dir(run, resume, overwrite)
        return _train_run(cfg, data_dir, run, resume, log, should_stop, log_every, fault, dp, overwrite, tensorboard)


@dataclasses.dataclass
class _Start:
    """A run's starting point (`_restore_or_init`): its data, model, optimizer, and the state to train from."""

    data: RunData
    spec: Any  # train.step.ModelSpec
    tx: Any  # optax.GradientTransformation
    tx_key: str  # train.step.optimizer_key of tx: what it was built from
    state: Any  # train.step.TrainState (restored, or initialised from the pretrained checkpoint)
    ckpt: Checkpointer
    position: dict[str, Any]  # the data position the state was saved at (fresh: epoch 0, step 0)


def _restore_or_init(cfg: TrainConfig, data_dir: Path, run: Path, resume: bool, overwrite: bool,
                     dp: DataParallel | None, log: Callable[[dict[str, Any]], None]) -> _Start:
    """Load the data and the pretrained model, then restore RUN's last checkpoint (`resume`) or start fresh.
    Every check that can refuse the run happens before anything in RUN changes."""
    if not resume and not overwrite and (has_steps(run / "checkpoints") or has_steps(run / "best")):
        raise RunError(f"{run}: run directory already has checkpoints (use --resume, or a new --out)")
    if resume:
        _check_resume_config(run, cfg)
        check_tokenizer(run, tokenizer_files(cfg.checkpoint), cfg.checkpoint)
    data = load_run_data(cfg, data_dir)
    spec, params = init_model(cfg, jax.random.fold_in(jax.random.key(cfg.seed), 0))
    data.check_vocab(cfg, spec.bert.vocab_size)
    tx = optimizer(cfg, total_steps=data.total)
    state = init_state(params, tx, cfg.combine, len(cfg.tasks))
    if dp is not None:  # placed before any restore, so a resumed state is restored with these shardings
        for b in set(cfg.batch_sizes.values()):
            dp.check_batch_size(b)
        state = dp.put(state)
    if overwrite and is_main_process():  # everything has loaded: only now delete the old run's files (announced first)
        clear_run(run, lambda gone, kept: log({"event": "overwrite", "run": str(run), "deleting": gone, "keeping": kept}))
    run.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpointer(run, keep=cfg.keep_checkpoints)
    position = {"epoch": 0, "step_in_epoch": 0, "best_overall": -math.inf}
    if resume and ckpt.latest_step() is not None:
        try:
            state, position = ckpt.restore_state(state)
            check_position(run / "checkpoints" / str(int(state.step)), position, data.sched.sizes, data.fingerprint,
                           data.sched.steps_per_epoch)
        except BaseException:
            ckpt.close()
            raise
    return _Start(data, spec, tx, optimizer_key(cfg, data.total), state, ckpt, position)


class _EpochEnd:
    """The hooks a run calls at every epoch end (and at a stop), in this order: `log_steps` (flush the step
    metrics, refuse non-finite losses), `save` (checkpoint the training state), `evaluate` (dev metrics when due,
    the best checkpoint, metrics.jsonl). Holds what they share: the best dev overall and the last dev metrics."""

    def __init__(self, cfg: TrainConfig, run: Path, start: _Start, eval_fn, log: Callable[[dict[str, Any]], None],
                 t_start: float, compiles: CompileEvents, last_record: dict[str, Any]):
        self.cfg, self.run, self.ckpt, self.eval_fn, self.log = cfg, run, start.ckpt, eval_fn, log
        self.data, self.t_start, self.compiles = start.data, t_start, compiles
        self.per_epoch = start.data.sched.steps_per_epoch
        self.step_metrics, self.rate = StepMetrics(), StepRate(int(start.state.step))
        self.best = recorded_best(start.position["best_overall"], last_record, int(start.state.step))
        self.metrics: dict[str, Any] = {k: v for k, v in last_record.items() if k not in ("step", "epoch", "best")}

    def kept(self) -> str:
        last = self.ckpt.latest_step()
        if last is None:
            return "training stopped before its first checkpoint was written"
        return f"training stopped; the last good checkpoint (step {last}) in {self.run / 'checkpoints'} is kept"

    def check_finite(self, tree, what: str, step: int) -> None:
        """Never save non-finite values (they would become the latest / best checkpoint)."""
        if not bool(_all_finite(tree)):
            raise NonFiniteLoss(f"non-finite {what} at step {step}, not saved; " + self.kept())

    def log_steps(self, info: StepInfo) -> None:
        host = self.step_metrics.pull()
        bad = first_non_finite(host)
        if bad is not None:
            raise NonFiniteLoss(f"non-finite loss at step {bad[0]} ("
                                + ", ".join(f"{k}={v:.4g}" for k, v in watched(bad[1]).items()) + "); " + self.kept())
        if host:
            s, m = host[-1]
            self.log({"event": "step", "step": s, "epoch": s // self.per_epoch, **m, "steps_per_s": self.rate.tick(s),
                      "per_step": host})

    def save(self, info: StepInfo) -> None:
        self.check_finite(info.state, "training state", info.step)
        # saved before the evaluation: a failed (or killed) evaluation never loses the trained steps
        d = self.data
        self.ckpt.save_state(info.state, data_position(info.step, self.per_epoch, self.best, d.sched.sizes, d.fingerprint))

    def evaluate(self, info: StepInfo) -> None:
        if not info.boundary or not eval_due(info.step, self.per_epoch, self.data.total, self.cfg.eval_every):
            return
        params, self.metrics, scores = dev_metrics(self.eval_fn, info.state, self.data.dev,
                                                   self.cfg.data.eval_batch_size, self.cfg.data.scoring_buckets)
        is_best = self.metrics.get("overall", -math.inf) > self.best
        if is_best:
            self.best = self.metrics["overall"]
            self.check_finite(info.state, "training state", info.step)
            self.ckpt.save_best(info.step, params, self.metrics, dev_scores(self.cfg, self.data.dev, scores))
        record = {"step": info.step, "epoch": info.epoch, **self.metrics, "best": is_best,
                  "wall_s": round(time.perf_counter() - self.t_start, 1), **compile_record(self.compiles)}
        if is_main_process():  # multi-host: one writer
            append_metrics(self.run, record)
        self.log({"event": "eval", **record})


def recorded_best(best: float, last_record: dict[str, Any], step: int) -> float:
    """The best dev overall at restart. An epoch-end checkpoint is saved before its evaluation: fold in that
    evaluation when metrics.jsonl recorded it at `step` (else `eval_pending` redoes it before the first step)."""
    if last_record.get("step") == step and last_record.get("best") and isinstance(last_record.get("overall"), float):
        return max(best, last_record["overall"])
    return best


def eval_pending(last_record: dict[str, Any], step: int, per_epoch: int, total: int, eval_every: int) -> bool:
    """Whether a restarted run must redo the evaluation due at `step` (metrics.jsonl has no record of it)."""
    return last_record.get("step") != step and eval_due(step, per_epoch, total, eval_every)


# metrics.jsonl's compile fields <- CompileEvents.summary() keys
_COMPILE_FIELDS = {"compile_s": "total_s", "xla_compiles": "xla_compiles", "compile_cache_hits": "cache_hits",
                   "stored_programs": "store_hits"}
TIMING_KEYS = ("wall_s", *_COMPILE_FIELDS)  # not dev metrics


def compile_record(compiles: CompileEvents) -> dict[str, Any]:
    """This process's compile time so far (a resumed run counts from its restart), as metrics.jsonl records it."""
    c = compiles.summary()
    return {field: c[key] for field, key in _COMPILE_FIELDS.items()}


def _train_run(cfg: TrainConfig, data_dir: str | Path | None, run: Path, resume: bool,
               log: Callable[[dict[str, Any]], None], should_stop: Callable[[], bool], log_every: int,
               fault: Callable[[int, dict], dict] | None, dp: DataParallel | None, overwrite: bool,
               tensorboard: bool) -> dict[str, Any]:
    """`train`'s body, in a locked and checked run directory: restore-or-init, then the step loop with its hooks."""
    t_start = time.perf_counter()
    start = _restore_or_init(cfg, D.resolve_data_dir(data_dir), run, resume, overwrite, dp, log)
    data, ckpt, start_step = start.data, start.ckpt, int(start.state.step)
    # only now that the resume is known to be valid: a refused --resume leaves the run untouched
    write_run_files(run, cfg, start.spec, bert_jax.resolve_checkpoint(cfg.checkpoint) / "vocab.txt")
    last_record = _rewind_metrics(run / METRICS, start_step, write=is_main_process())
    hooks = [TensorBoard(run)] if tensorboard else []
    log = event_hooks(log, hooks)
    step_fn = make_train_step(start.spec, start.tx, cfg.tasks, cfg.combine, cfg.pcgrad_reduction, cfg.finetune, dp=dp,
                              impl=cfg.step_impl, tx_key=start.tx_key)
    dropout_key = jax.random.fold_in(jax.random.key(cfg.seed), 1)
    per_epoch = data.sched.steps_per_epoch
    log({"event": "start", "total_steps": data.total, "steps_per_epoch": per_epoch, "start_step": start_step,
         "skipped": data.skipped, "train_sizes": data.sched.sizes})
    compiles = CompileEvents()
    end = _EpochEnd(cfg, run, start, make_eval_fn(start.spec, dp), log, t_start, compiles, last_record)
    pending = eval_pending(last_record, start_step, per_epoch, data.total, cfg.eval_every)

    def one_step(state, g: int, batches: dict):
        return step_fn(state, fault(g, batches) if fault is not None else batches, dropout_key)

    loop = Loop(data.sched, data.total, should_stop)
    loop.add_hook(end.step_metrics.add, every=1)
    loop.add_hook(end.log_steps, every=log_every)
    for hook in (end.log_steps, end.save, end.evaluate):
        loop.add_hook(hook, epoch_end=True)
    # data, parameters and modules are loaded: the collector stays off them while programs trace
    try:
        with frozen_heap(), compiles:
            t0 = time.perf_counter()
            ready = prepare_programs(step_fn, end.eval_fn, start.state, data, start_step, dropout_key,
                                     cfg.data.eval_batch_size, cfg.data.scoring_buckets)
            log({"event": "programs", "ready": ready, "seconds": round(time.perf_counter() - t0, 1),
                 **compile_record(compiles)})
            if pending:
                end.evaluate(StepInfo(start_step, (start_step - 1) // per_epoch, start.state, None, boundary=True))
            state, global_step, stopped = loop.run(one_step, start.state, start_step)
        best_step = ckpt.best_step()
        if stopped:
            log({"event": "stopped", "reason": "signal", "step": global_step})
    finally:
        ckpt.close()
        close_hooks(hooks)
    dev = {k: v for k, v in end.metrics.items() if k not in TIMING_KEYS}
    return {**dev, "best_overall": end.best, "step": global_step, "stopped": stopped,
            "best_checkpoint": str(run / "best" / str(best_step)) if best_step is not None else None,
            "wall_s": round(time.perf_counter() - t_start, 1), **compile_record(compiles)}
