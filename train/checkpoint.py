"""Run directories and Orbax checkpoints.

RUN/
  config.yaml         resolved TrainConfig
  bert_config.json    the encoder's BertConfig (HF fields + bert-jax options)
  vocab.txt           the tokenizer vocabulary (a run is self-contained)
  tokenizer_config.json  the tokenizer's casing (do_lower_case, ...); special_tokens_map.json / tokenizer.json
                      when the checkpoint has them: evaluate / predict tokenize exactly as training did
  checkpoints/<step>/ latest training states (params, optimizer state, step, data position); atomic saves
  best/<step>/        params of the best dev `overall` so far
  dev_scores.npz      that best evaluation's per-example dev scores (`save_best`, read by `read_dev_scores`)
  metrics.jsonl       one JSON object per evaluation

Orbax writes every checkpoint to a temporary directory (`<step>.orbax-checkpoint-tmp`) and renames it
when complete, so a crash or SIGKILL during a save leaves the previous checkpoint as the latest loadable
one; a leftover temporary directory is never listed as a step and is deleted by the next writable
`Checkpointer`. The small run files are written atomically too (temporary file + rename). Every error
about a missing, truncated or foreign run directory is a one-line `RunError` naming the path, and so is
a failed save (a full disk: `_guarded`), with the TensorStore / asyncio echoes of the failure silenced.
"""

from __future__ import annotations

import dataclasses
import gc
import io
import json
import logging
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import yaml

import bert_jax
from bert_jax import BertConfig, Params
from train.config import TrainConfig
from train.heads import init_heads
from train.step import ModelSpec, TrainState


class RunError(ValueError):
    """A run directory that is missing, incomplete or not a bert-jax run."""


def _manager(directory: Path, keep: int, best: bool = False, read_only: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        best_fn=(lambda m: m["overall"]) if best else None,
        best_mode="max",
        keep_checkpoints_without_metrics=not best,
        enable_async_checkpointing=False,
        read_only=read_only,
        cleanup_tmp_directories=not read_only,
    )
    return ocp.CheckpointManager(directory.absolute(), options=options)


def _one_line(e: BaseException, limit: int = 300) -> str:
    """`Type: first line of the message`, cut to `limit` characters (orbax/TensorStore errors span pages)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _write_atomic(path: Path, data: bytes) -> None:
    """Write `path` via a temporary file + rename, so a kill mid-write never leaves it truncated."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_run_files(run: Path, cfg: TrainConfig, spec: ModelSpec, vocab_file: Path) -> None:
    """config.yaml, bert_config.json and the tokenizer files (`bert_jax.tokenizer.tokenizer_files` of the
    directory holding `vocab_file`: a checkpoint or another run), always rewritten (never a stale vocab.txt)."""
    from bert_jax.tokenizer import tokenizer_files

    tok_files = tokenizer_files(Path(vocab_file).parent)
    run.mkdir(parents=True, exist_ok=True)
    _write_atomic(run / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())
    _write_atomic(run / "bert_config.json", (json.dumps(dataclasses.asdict(spec.bert), indent=2) + "\n").encode())
    for name, data in tok_files.items():
        _write_atomic(run / name, data)


def has_steps(directory: Path) -> bool:
    """Whether `directory` holds a finalized checkpoint (`<step>/`; temporary directories do not count)."""
    return directory.is_dir() and any(p.name.isdigit() and p.is_dir() for p in directory.iterdir())


def expected_params(spec: ModelSpec) -> Params:
    """The abstract (shape/dtype) param tree of `spec`'s model: `{"bert": ..., "heads": ...}`."""
    return jax.eval_shape(lambda k: {"bert": bert_jax.init_params(spec.bert, k),
                                     "heads": init_heads(spec.heads, spec.bert.hidden_size, k)}, jax.random.key(0))


def _stored_tree(path: Path) -> Any:
    """The tree metadata (leaf shapes) of an orbax StandardSave item directory, without reading arrays."""
    try:
        with ocp.StandardCheckpointer() as c:
            return c.metadata(path.absolute()).item_metadata
    except Exception as e:  # truncated / foreign checkpoint
        raise RunError(f"{path.parent}: cannot read checkpoint ({_one_line(e)})") from None


def _quiet_abandoned_reads(unraisable: Any) -> None:
    """`sys.unraisablehook` that drops the echoes of a failed orbax restore and passes on the rest.

    When one array of a checkpoint cannot be read (truncated / corrupt files), orbax's event loop ends
    with the error while TensorStore still completes the other reads: each completion then fails on the
    closed loop ("Event loop is closed", from `call_soon_threadsafe`, in a TensorStore thread), and each
    abandoned read coroutine fails again when finalized, possibly at interpreter exit. Each would print a
    traceback with a page of TensorStore spec after the one-line `RunError` that already reports the
    failure. Anything else goes to the hook installed before.
    """
    exc, obj = unraisable.exc_value, unraisable.object
    frames = [f.f_code.co_name for f, _ in traceback.walk_tb(unraisable.exc_traceback)]
    closed_loop = isinstance(exc, RuntimeError) and "call_soon_threadsafe" in frames
    code = getattr(obj, "cr_code", None)  # an abandoned coroutine's code object
    if closed_loop or (code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename):
        return
    _previous_hook(unraisable)


_previous_hook = sys.unraisablehook


class _QuietOrbaxThreads(logging.Filter):
    """Drops the echoes of a failed orbax write while a save is guarded (and after it failed): orbax's
    `_SignalingThread.run() raised an exception` (a page of traceback per failed writer thread, logged to
    "absl") and asyncio's `... exception was never retrieved` for the abandoned write futures (logged to
    "asyncio" whenever the future is collected; a failed restore's abandoned read tasks log the same). The
    failure is reported once, by `_guarded` / `_restore`."""

    _ECHOES = ("_SignalingThread.run() raised an exception", "exception was never retrieved")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(echo in message for echo in self._ECHOES)


_QUIET_THREADS = _QuietOrbaxThreads()
_ECHO_LOGGERS = ("absl", "asyncio")


def _quiet_echoes() -> bool:
    """Put up the unraisable-exception filter and the orbax/asyncio log filter; True if the hook was
    installed now (not already up from an earlier failure)."""
    global _previous_hook
    installed = sys.unraisablehook is not _quiet_abandoned_reads
    if installed:
        _previous_hook, sys.unraisablehook = sys.unraisablehook, _quiet_abandoned_reads
    for name in _ECHO_LOGGERS:
        logging.getLogger(name).addFilter(_QUIET_THREADS)
    return installed


def _loud_echoes(installed: bool) -> None:
    """Take down what `_quiet_echoes` put up (after a save / restore that succeeded)."""
    if installed:
        sys.unraisablehook = _previous_hook
        for name in _ECHO_LOGGERS:
            logging.getLogger(name).removeFilter(_QUIET_THREADS)


def _guarded(what: str, where: Path, fn, hint: str = "") -> Any:
    """`fn()` (an orbax save), any failure (a full disk, a read-only or vanished directory) as a one-line
    `RunError`: `<where>: cannot save <what> (<first line of the error>)<hint>`.

    Like `_restore`: the unraisable-exception filter (TensorStore's "Event loop is closed" echoes) and a
    filter for orbax's thread-failure logs go up before the write and, after a failure, stay up for the
    rest of the process (the echoes continue in other threads and at interpreter exit).
    """
    installed = _quiet_echoes()
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001 - orbax/TensorStore raise bare Exceptions
        failure = _one_line(e)
        # TensorStore wraps the OS error (e.g. ENOSPC) deep in a long message: name it first
        code = re.search(r"os_error_code='?(\d+)", str(e))
        if code and not isinstance(e, OSError):
            failure = f"[Errno {code.group(1)}] {os.strerror(int(code.group(1)))}; {_one_line(e, 160)}"
    else:
        _loud_echoes(installed)
        return out
    gc.collect()  # finalize the abandoned write coroutines now, under the filter
    raise RunError(f"{where}: cannot save {what} ({failure}){hint}")


def _restore(mngr: ocp.CheckpointManager, step: int, args: ocp.args.Composite, where: Path) -> Any:
    """`mngr.restore(step, args)`, any failure (truncated / corrupt files) as a one-line `RunError`.

    The unraisable-exception and log filters (`_quiet_echoes`) go up before the read (the echoes of a
    failure start in other threads as soon as it happens) and stay up after a failure, for the rest of
    the process.
    """
    installed = _quiet_echoes()
    try:
        out = mngr.restore(step, args=args)
    except Exception as e:  # noqa: BLE001 - orbax/TensorStore raise bare Exceptions
        failure = _one_line(e)
    else:
        _loud_echoes(installed)
        return out
    gc.collect()  # finalize the abandoned read coroutines now
    raise RunError(f"{where}: cannot restore checkpoint ({failure})")


def _item(tree: Any, key: str) -> Any:
    """`tree[key]` of a stored tree's metadata (a mapping), else None."""
    try:
        return tree[key] if key in tree.keys() else None
    except (AttributeError, TypeError):
        return None


def _check_shapes(expected: Any, stored: Any, where: Path) -> None:
    """Raise a `RunError` naming the first leaf whose presence or shape differs (architecture mismatch)."""
    def shapes(tree):
        return {jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}

    if stored is None:
        raise RunError(f"{where}: not a readable bert-jax checkpoint (no parameter tree: missing or corrupt metadata)")
    want, got = shapes(expected), shapes(stored)
    for k in want:
        if k not in got:
            raise RunError(f"{where}: checkpoint does not match the run's architecture (parameter {k} missing)")
        if want[k] != got[k]:
            raise RunError(f"{where}: checkpoint does not match the run's architecture "
                           f"(parameter {k} has shape {got[k]}, the run's config needs {want[k]})")
    extra = sorted(set(got) - set(want))
    if extra:
        raise RunError(f"{where}: checkpoint does not match the run's architecture (unexpected parameter {extra[0]})")


def read_run_config(run: str | Path) -> tuple[TrainConfig, ModelSpec]:
    run = Path(run)
    if not run.is_dir():
        raise RunError(f"{run}: run directory not found")
    for name in ("config.yaml", "bert_config.json"):
        if not (run / name).is_file():
            raise RunError(f"{run}: not a bert-jax run directory ({name} missing)")
    name = "config.yaml"
    try:
        cfg = TrainConfig.from_dict(yaml.safe_load((run / name).read_text()))
        name = "bert_config.json"
        bert = json.loads((run / name).read_text())
        if not isinstance(bert, dict):
            raise ValueError(f"expected a JSON object, got {type(bert).__name__}")
        bert = BertConfig(**bert)
    except (ValueError, TypeError, AttributeError, yaml.YAMLError) as e:
        raise RunError(f"{run}: unreadable run config ({name}: {_one_line(e)})") from None
    return cfg, ModelSpec(bert=bert, heads=cfg.heads)


def _stored_state(state: TrainState) -> dict[str, Any]:
    """What a checkpoint stores of `state`: its fields, without an empty `method_state` (a stateless combine
    method's; so checkpoints written before that slot existed restore unchanged)."""
    d = state._asdict()
    if not jax.tree.leaves(d["method_state"]):
        del d["method_state"]
    return d


class Checkpointer:
    """Latest training state (for --resume) and best-dev params, in one run directory."""

    def __init__(self, run: str | Path, keep: int = 2, read_only: bool = False):
        self.run = Path(run)
        self.latest = _manager(self.run / "checkpoints", keep, read_only=read_only)
        self.best = _manager(self.run / "best", 1, best=True, read_only=read_only)

    def save_state(self, state: TrainState, position: dict[str, Any]) -> None:
        """Save the training state at its step; a no-op when that step is already saved (same state)."""
        step = int(state.step)
        if step in self.latest.all_steps():
            return
        kept = self.latest.latest_step()

        def save() -> None:
            self.latest.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(_stored_state(state)), position=ocp.args.JsonSave(position)), force=True)
            self.latest.wait_until_finished()

        hint = (f"; the previous checkpoint ({self.run / 'checkpoints' / str(kept)}) is kept: free disk space (or fix "
                f"the cause), then continue with --resume" if kept is not None
                else "; no checkpoint was kept: free disk space (or fix the cause), then start again with --resume")
        _guarded("the training state", self.run / "checkpoints" / str(step), save, hint)

    def save_best(self, step: int, params: Params, metrics: dict[str, float],
                  scores: DevScores | None = None) -> None:
        """Replace the kept best params (the caller decides that `metrics["overall"]` is a new best), then
        write `scores` (that evaluation's per-example dev scores) as RUN/dev_scores.npz.

        A best already saved at `step` (a resumed run redoing the evaluation it was killed after) is replaced.
        A kill between the two writes leaves a dev_scores.npz of an older step, which `read_dev_scores` refuses.
        """
        if step in self.best.all_steps():
            self.best.delete(step)

        def save() -> None:
            self.best.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)),
                           metrics={"overall": float(metrics["overall"])}, force=True)
            self.best.wait_until_finished()

        _guarded("the best params", self.run / "best" / str(step), save,
                 f"; the training state of step {step} is saved: free disk space (or fix the cause), then continue "
                 f"with --resume")
        if scores is not None:
            _guarded("the best evaluation's dev scores", self.run / DEV_SCORES,
                     lambda: _write_atomic(self.run / DEV_SCORES, scores.to_npz(step)))

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def best_step(self) -> int | None:
        """Step of the kept best-dev params (None before the first evaluation)."""
        return self.best.latest_step()

    def restore_state(self, target: TrainState, step: int | None = None) -> tuple[TrainState, dict[str, Any]]:
        step = self.latest.latest_step() if step is None else step
        if step is None:
            raise RunError(f"{self.run}: no checkpoint to resume from")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _stored_state(target))
        where = self.run / "checkpoints" / str(step)
        stored = _stored_tree(where / "state")
        _check_shapes(abstract["params"], _item(stored, "params"), where)
        out = _restore(self.latest, step, ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), position=ocp.args.JsonRestore()), where)
        if not isinstance(out.get("position"), dict):
            raise RunError(f"{where}: checkpoint has no data position (not written by bert-jax train)")
        return TrainState(**{"method_state": target.method_state, **out["state"]}), out["position"]

    def close(self) -> None:
        self.latest.close()
        self.best.close()


DEV_SCORES = "dev_scores.npz"
METRICS = "metrics.jsonl"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The evaluation records of a `metrics.jsonl` (`RUN / METRICS`), in order; [] when the file is absent. A line
    that is not a JSON object (the torn last line of a kill mid-append) is skipped."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def append_metrics(run: Path, record: dict[str, Any]) -> None:
    """Append one evaluation record to RUN/metrics.jsonl."""
    with open(run / METRICS, "a") as f:
        f.write(json.dumps(record) + "\n")


@dataclasses.dataclass(frozen=True)
class DevScores:
    """One evaluation's per-example dev scores: `scores[task]` `[N]` / `[N, classes]` float32 in the order of
    `ids[task]` (the dev file's first `dev_limit` rows, or all of them when `dev_limit` is None)."""

    ids: dict[str, tuple[str, ...]]
    scores: dict[str, np.ndarray]
    dev_limit: int | None

    def to_npz(self, step: int) -> bytes:
        buf = io.BytesIO()
        arrays = {"step": np.int64(step), "dev_limit": np.int64(-1 if self.dev_limit is None else self.dev_limit),
                  "tasks": np.asarray(list(self.scores))}
        for t, s in self.scores.items():
            arrays[f"ids/{t}"] = np.asarray(self.ids[t])
            arrays[f"scores/{t}"] = np.asarray(s, np.float32)
        np.savez(buf, **arrays)
        return buf.getvalue()


def read_dev_scores(run: str | Path) -> DevScores:
    """The dev scores a run recorded at its best evaluation: those of the params `load_params` loads, with no
    evaluation. Raises `RunError` naming the run when it has none (trained without dev evaluation, or before
    they were recorded) or when they belong to another step than its kept best params."""
    run = Path(run)
    path = run / DEV_SCORES
    best = _manager(run / "best", 1, read_only=True) if (run / "best").is_dir() else None
    try:
        best_step = best.latest_step() if best is not None else None
    finally:
        if best is not None:
            best.close()
    if best_step is None or not path.is_file():
        raise RunError(f"{run}: no recorded best-dev scores ({DEV_SCORES} and best/<step>); evaluate the run instead")
    try:
        with np.load(path) as z:
            step, limit, tasks = int(z["step"]), int(z["dev_limit"]), [str(t) for t in z["tasks"]]
            out = DevScores({t: tuple(str(i) for i in z[f"ids/{t}"]) for t in tasks},
                            {t: z[f"scores/{t}"] for t in tasks}, None if limit < 0 else limit)
    except (OSError, KeyError, ValueError) as e:
        raise RunError(f"{path}: unreadable recorded dev scores ({_one_line(e)}); evaluate the run instead") from None
    if step != best_step:
        raise RunError(f"{path}: recorded at step {step}, but the kept best params are of step {best_step} (a save "
                       f"was interrupted); evaluate the run instead")
    return out


def load_params(run: str | Path) -> tuple[TrainConfig, ModelSpec, Params]:
    """Best-dev params of a run (else its latest training state's params)."""
    cfg, spec = read_run_config(run)
    run = Path(run)
    for sub, key in (("best", "params"), ("checkpoints", "state")):
        if not (run / sub).is_dir():
            continue
        mngr = _manager(run / sub, 1, read_only=True)
        try:
            step = mngr.latest_step()  # finalized steps only: a save killed midway is never listed
            if step is None:
                continue
            where = run / sub / str(step)
            full = _stored_tree(where / key)
            stored = _item(full, "params") if key == "state" else full
            _check_shapes(expected_params(spec), stored, where)
            # restore onto one local device, whatever mesh the run was trained on
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), full)
            out = _restore(mngr, step, ocp.args.Composite(**{key: ocp.args.StandardRestore(target)}), where)
        finally:
            mngr.close()
        params = out[key] if key == "params" else out[key]["params"]
        return cfg, spec, jax.tree.map(jax.numpy.asarray, params)
    raise RunError(f"{run}: no checkpoint found (expected {run / 'best'} or {run / 'checkpoints'})")


def save_params_run(run: str | Path, cfg: TrainConfig, spec: ModelSpec, params: Params, vocab_file: Path,
                    metrics: dict[str, float] | None = None) -> Path:
    """Write a params-only run directory (e.g. a model soup) usable by every command."""
    run = Path(run)
    write_run_files(run, cfg, spec, vocab_file)
    mngr = _manager(run / "best", 1, best=True)
    mngr.save(0, args=ocp.args.Composite(params=ocp.args.StandardSave(params)),
              metrics={"overall": float((metrics or {}).get("overall", 0.0))}, force=True)
    mngr.wait_until_finished()
    mngr.close()
    return run
