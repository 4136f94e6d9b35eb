"""Run directories and Orbax checkpoints.

RUN/
  config.yaml         resolved TrainConfig
  bert_config.json    the encoder's BertConfig (HF fields + bert-jax options)
  vocab.txt           the tokenizer vocabulary (a run is self-contained)
  checkpoints/<step>/ latest training states (params, optimizer state, step, data position); atomic saves
  best/<step>/        params of the best dev `overall` so far
  metrics.jsonl       one JSON object per evaluation

Orbax writes every checkpoint to a temporary directory and renames it when complete, so a crash or
SIGKILL during a save leaves the previous checkpoint as the latest loadable one.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
import yaml

from bert_jax import BertConfig, Params
from train.config import TrainConfig
from train.heads import HeadConfig
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


def write_run_files(run: Path, cfg: TrainConfig, spec: ModelSpec, vocab_file: Path) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    (run / "bert_config.json").write_text(json.dumps(dataclasses.asdict(spec.bert), indent=2) + "\n")
    if not (run / "vocab.txt").exists():
        (run / "vocab.txt").write_bytes(Path(vocab_file).read_bytes())


def read_run_config(run: str | Path) -> tuple[TrainConfig, ModelSpec]:
    run = Path(run)
    if not run.is_dir():
        raise RunError(f"{run}: run directory not found")
    for name in ("config.yaml", "bert_config.json"):
        if not (run / name).is_file():
            raise RunError(f"{run}: not a bert-jax run directory ({name} missing)")
    try:
        cfg = TrainConfig.from_dict(yaml.safe_load((run / "config.yaml").read_text()))
        bert = BertConfig(**json.loads((run / "bert_config.json").read_text()))
    except (ValueError, TypeError, yaml.YAMLError) as e:
        raise RunError(f"{run}: unreadable run config ({e})") from None
    return cfg, ModelSpec(bert=bert, heads=cfg.heads)


class Checkpointer:
    """Latest training state (for --resume) and best-dev params, in one run directory."""

    def __init__(self, run: str | Path, keep: int = 2, read_only: bool = False):
        self.run = Path(run)
        self.latest = _manager(self.run / "checkpoints", keep, read_only=read_only)
        self.best = _manager(self.run / "best", 1, best=True, read_only=read_only)

    def save_state(self, state: TrainState, position: dict[str, Any]) -> None:
        step = int(state.step)
        self.latest.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state._asdict()), position=ocp.args.JsonSave(position)), force=True)
        self.latest.wait_until_finished()

    def save_best(self, step: int, params: Params, metrics: dict[str, float]) -> None:
        """Replace the kept best params (the caller decides that `metrics["overall"]` is a new best)."""
        self.best.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)),
                       metrics={"overall": float(metrics["overall"])}, force=True)
        self.best.wait_until_finished()

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def restore_state(self, target: TrainState, step: int | None = None) -> tuple[TrainState, dict[str, Any]]:
        step = self.latest.latest_step() if step is None else step
        if step is None:
            raise RunError(f"{self.run}: no checkpoint to resume from")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target._asdict())
        try:
            out = self.latest.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), position=ocp.args.JsonRestore()))
        except Exception as e:  # truncated / foreign checkpoint
            raise RunError(f"{self.run / 'checkpoints' / str(step)}: cannot restore checkpoint ({type(e).__name__}: {e})") from None
        return TrainState(**out["state"]), out["position"]

    def close(self) -> None:
        self.latest.close()
        self.best.close()


def load_params(run: str | Path) -> tuple[TrainConfig, ModelSpec, Params]:
    """Best-dev params of a run (else its latest training state's params)."""
    cfg, spec = read_run_config(run)
    run = Path(run)
    for sub, key in (("best", "params"), ("checkpoints", "state")):
        if not (run / sub).is_dir():
            continue
        mngr = _manager(run / sub, 1, read_only=True)
        step = mngr.latest_step()
        if step is None:
            continue
        try:
            out = mngr.restore(step, args=ocp.args.Composite(**{key: ocp.args.StandardRestore()}))
        except Exception as e:
            raise RunError(f"{run / sub / str(step)}: cannot restore checkpoint ({type(e).__name__}: {e})") from None
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
