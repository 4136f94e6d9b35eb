"""TensorBoard logging of a run (tensorboardX; no TensorFlow): an event hook, on by default.

`train.trainer.train` and `train.population.train_population` pass every log event (see the trainer's
docstring) to their hooks as well as to `log`. This one writes, into `RUN/tensorboard/`:
  train/<name>   every step's loss, per-task losses and gradient norm (step events carry all steps since
                 the previous one in `per_step`), and train/steps_per_s;
  dev/<task>     the dev metrics and dev/overall at every evaluation.
`tensorboard --logdir RUN/tensorboard` (or a parent directory) shows them.

A hook is any callable taking an event dict, with an optional `close()`; see `event_hooks`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from train.tasks import TASKS

EventHook = Callable[[dict[str, Any]], None]


class TensorBoard:
    """Writes one run's events. `member`: the index of this run in a population (step events then carry
    per-member lists, and eval events name their member), else None."""

    def __init__(self, run: str | Path, member: int | None = None):
        self.run, self.member = Path(run), member
        from tensorboardX import SummaryWriter  # here, not at import: the GPU check's machine has no tensorboardX

        self.writer = SummaryWriter(str(self.run / "tensorboard"), flush_secs=30)

    def _value(self, v: Any) -> float:
        return float(v[self.member]) if self.member is not None else float(v)

    def __call__(self, e: dict[str, Any]) -> None:
        if e["event"] == "step":
            for step, metrics in e.get("per_step", [(e["step"], e)]):
                for k, v in metrics.items():
                    if k.startswith("loss") and k != "loss_members" or k == "grad_norm":
                        self.writer.add_scalar(f"train/{k}", self._value(v), step)
            self.writer.add_scalar("train/steps_per_s", float(e["steps_per_s"]), e["step"])
        elif e["event"] == "eval" and e.get("member", self.run.name) == self.run.name:
            for k in (*TASKS, "overall"):
                if isinstance(e.get(k), float):
                    self.writer.add_scalar(f"dev/{k}", e[k], e["step"])
            self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def event_hooks(log: EventHook, hooks: Sequence[EventHook]) -> EventHook:
    """One event callback: `log`, then every hook."""
    def emit(e: dict[str, Any]) -> None:
        log(e)
        for h in hooks:
            h(e)
    return emit


def close_hooks(hooks: Sequence[EventHook]) -> None:
    for h in hooks:
        close = getattr(h, "close", None)
        if close is not None:
            close()
