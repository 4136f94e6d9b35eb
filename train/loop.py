"""The training loop shared by a single run (`train.trainer`) and a population (`train.population`).

The loop only steps through the schedule and calls hooks; what happens at which interval (pulling
metrics to the host and logging them, checkpointing, evaluating) is a hook, added by the caller as with
Levanter's `Trainer.add_hook`:

    loop = Loop(sched, total, should_stop)
    loop.add_hook(log_metrics, every=20)        # after every 20th step
    loop.add_hook(save_and_evaluate, epoch_end=True)  # at every epoch end, the run's end and a stop
    state, step, stopped = loop.run(step_fn, state, start)

Restoring or initializing the state is the caller's, before `run`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Iterable

import numpy as np

from train.data import Schedule


@dataclasses.dataclass(frozen=True)
class StepInfo:
    """What a hook sees: `step` global steps are done, the last of them in epoch `epoch`."""

    step: int
    epoch: int
    state: Any  # the training state after `step` steps
    metrics: Any  # the last step's metrics, on the device (None at a stop before any step of this call)
    stopped: bool = False  # epoch-end hooks: the loop stops at `step` (a signal), mid-epoch
    boundary: bool = False  # epoch-end hooks: `step` ends an epoch or the run (when dev evaluation is due)


@dataclasses.dataclass(frozen=True)
class _Hook:
    fn: Callable[[StepInfo], None]
    every: int  # after every `every`-th step; 0: at epoch ends only


class Loop:
    """Steps `step_fn` over `sched`'s batches of global steps `start .. total - 1`, polling `should_stop()`
    before each step, and calls the hooks (see the module docstring)."""

    def __init__(self, sched: Schedule, total: int, should_stop: Callable[[], bool] = lambda: False):
        self.sched, self.total, self.should_stop = sched, total, should_stop
        self._hooks: list[_Hook] = []

    def add_hook(self, fn: Callable[[StepInfo], None], every: int | None = None, epoch_end: bool = False) -> None:
        """Call `fn` after every `every`-th step (global step count divisible by `every`), or, with
        `epoch_end=True`, once after the last step of every epoch, of the run, and at a stop (in the order
        the hooks were added)."""
        if epoch_end == (every is not None):
            raise ValueError("a hook runs either every N steps or at epoch ends")
        if every is not None and every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self._hooks.append(_Hook(fn, 0 if epoch_end else every))

    def _call(self, info: StepInfo, epoch_end: bool) -> None:
        for h in self._hooks:
            if (h.every == 0) == epoch_end and (epoch_end or info.step % h.every == 0):
                h.fn(info)

    def run(self, step_fn: Callable[[Any, int, dict], tuple[Any, Any]], state: Any, start: int) -> tuple[Any, int, bool]:
        """`state, metrics = step_fn(state, g, batches)` for each global step `g`; returns
        `(state, steps done, stopped)`."""
        per_epoch, step, metrics = self.sched.steps_per_epoch, start, None
        for g, batches in self.sched.batches(start, self.total):
            if self.should_stop():
                self._call(StepInfo(step, max(step - 1, 0) // per_epoch, state, metrics, stopped=True), epoch_end=True)
                return state, step, True
            state, metrics = step_fn(state, g, batches)
            step = g + 1
            info = StepInfo(step, g // per_epoch, state, metrics)
            self._call(info, epoch_end=False)
            if step % per_epoch == 0 or step >= self.total:
                self._call(dataclasses.replace(info, boundary=True), epoch_end=True)
        return state, step, False


class StepMetrics:
    """Per-step device metrics, kept until `pull` fetches them to the host in one go (so the loop never
    waits on the device between pulls)."""

    def __init__(self) -> None:
        self._pending: list[tuple[int, Any]] = []

    def add(self, info: StepInfo) -> None:
        """A hook for every step."""
        self._pending.append((info.step, info.metrics))

    def pull(self) -> list[tuple[int, dict[str, Any]]]:
        """`(step, {name: float or [K] list})` of the steps since the last pull. A non-finite watched value
        (`loss*`, `grad_norm`) is the caller's to report: see `first_non_finite`."""
        out = [(s, {k: np.asarray(v).tolist() for k, v in m.items()}) for s, m in self._pending]
        self._pending.clear()
        return out


def watched(metrics: dict[str, Any]) -> dict[str, Any]:
    """The metrics a non-finite value of which stops training: the losses and the gradient norm."""
    return {k: v for k, v in metrics.items() if k.startswith("loss") or k == "grad_norm"}


def first_non_finite(host: Iterable[tuple[int, dict[str, Any]]]) -> tuple[int, dict[str, Any]] | None:
    """The first pulled `(step, metrics)` with a non-finite watched value (scalars or per-member lists)."""
    for s, m in host:
        if not all(math.isfinite(x) for v in watched(m).values() for x in np.ravel(v)):
            return s, m
    return None


def eval_due(step: int, steps_per_epoch: int, total: int, eval_every: int) -> bool:
    """Whether the dev evaluation runs after global step `step`: at the end of every `eval_every`-th epoch and
    always at the end of the run (`total` steps)."""
    return step >= total or (step > 0 and step % steps_per_epoch == 0 and (step // steps_per_epoch) % eval_every == 0)


class StepRate:
    """Training steps per second between successive `tick`s (the step log's `steps_per_s`)."""

    def __init__(self, start_step: int) -> None:
        self.t, self.step = time.perf_counter(), start_step

    def tick(self, step: int) -> float:
        now = time.perf_counter()
        rate = (step - self.step) / max(now - self.t, 1e-9)
        self.t, self.step = now, step
        return rate


def data_position(step: int, steps_per_epoch: int, best_overall: float, train_sizes: dict, fingerprint: dict) -> dict:
    """The data position saved with a checkpoint (what `--resume` continues from and checks)."""
    return {"epoch": step // steps_per_epoch, "step_in_epoch": step % steps_per_epoch, "best_overall": best_overall,
            "steps_per_epoch": steps_per_epoch, "train_sizes": train_sizes, "train_fingerprint": fingerprint}
