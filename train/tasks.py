"""The task registry: everything that makes a task a task, in one definition per task.

A `Task` gives its data files and columns, its label type and range, whether it is one sentence or a pair, the
head kinds it accepts, and — from its `kind` — its loss, its predictions and its dev metric; plus its share of
the overall score and its leaderboard column. Every other module (data loading, heads, losses, metrics,
evaluation, prediction files, the CLI's choices, ensembles) reads from `TASKS`. A new task is one
`register_task(Task(...))`; `tests/test_task_registry.py` registers a toy pair-regression task in the test file
and trains, evaluates, predicts and ensembles it with no change anywhere else.

Kinds:
  "classes"    : logits ``[batch, num_classes]``, softmax cross-entropy, accuracy of the argmax
  "binary"     : one logit ``[batch]``, sigmoid BCE, accuracy of ``logit > 0``
  "regression" : one score ``[batch]`` on the label scale, MSE, Pearson r (scipy)
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Literal

import jax
import numpy as np
from scipy import stats

from train import losses
from train.registry import Registry

TaskKind = Literal["classes", "binary", "regression"]
# pair-task head kinds (train/heads.py): which kinds of task accept them
PAIR_HEADS: dict[str, tuple[TaskKind, ...]] = {
    "pair": ("binary", "regression"),  # linear over [u, v, |u-v|, u*v]
    "cross": ("binary", "regression"),  # one [CLS] a [SEP] b [SEP] sequence, linear over its embedding
    "cosine": ("binary", "regression"),  # binary: scale*cos+bias (a logit); regression: cos mapped onto the label range
    "cosine_relu": ("regression",),  # hi * max(cos, 0)
    "cosine_mse": ("binary",),  # the report's "Cosine + MSE": score cos - 1/2 (> 0: positive), loss MSE of cos vs 0/1
}
# Head kinds whose loss is not their task kind's: (scores, labels, valid) -> scalar
HEAD_LOSSES: dict[str, Callable[[jax.Array, jax.Array, jax.Array], jax.Array]] = {
    "cosine_mse": lambda scores, labels, valid: losses.mean_squared_error(scores + 0.5, labels, valid),
}


@dataclasses.dataclass(frozen=True)
class Task:
    """One task. `file`: the data file name with ``{split}`` (split "test" reads ``test-student``); columns
    ``id``, ``sentence`` (or ``sentence1``/``sentence2`` when `pair`) and `label_column`, whose values must lie in
    `label_range` (integers unless `kind` is "regression"). `heads`: the head kinds a pair task accepts, the
    first the default (a single-sentence task has the one kind "single"). `overall`: its term of the overall
    score, from its metric (None: not part of it). `evaluated`: scored by `train` / `evaluate` by default.
    `leaderboard_column`: the column of its ``<name>-<split>-output.csv`` file."""

    name: str
    file: str
    label_column: str
    kind: TaskKind
    label_range: tuple[float, float]
    pair: bool
    num_classes: int = 0
    heads: tuple[str, ...] = ("single",)
    overall: Callable[[float], float] | None = None
    evaluated: bool = True
    leaderboard_column: str = "Predicted"

    def __post_init__(self) -> None:
        if self.kind not in ("classes", "binary", "regression"):
            raise ValueError(f"task {self.name!r}: kind must be classes, binary or regression, got {self.kind!r}")
        if (self.kind == "classes") != (self.num_classes >= 2):
            raise ValueError(f"task {self.name!r}: a 'classes' task needs num_classes >= 2 (and only it)")
        if self.pair == (self.heads == ("single",)):
            raise ValueError(f"task {self.name!r}: a pair task lists its pair head kinds, a single-sentence task none")
        bad = [h for h in self.heads if h != "single" and self.kind not in PAIR_HEADS.get(h, ())]
        if bad:
            raise ValueError(f"task {self.name!r}: head kind(s) {bad} do not fit a {self.kind} task")
        if "{split}" not in self.file:
            raise ValueError(f"task {self.name!r}: file {self.file!r} has no '{{split}}'")

    @property
    def label_dtype(self) -> type:
        return np.int32 if self.kind == "classes" else np.float32

    @property
    def integral(self) -> bool:
        return self.kind != "regression"

    def loss(self, scores: jax.Array, labels: jax.Array, valid: jax.Array, head: str | None = None) -> jax.Array:
        """Scalar mean loss over the valid rows (by the task's kind, or by the head kind's `HEAD_LOSSES` entry)."""
        if head in HEAD_LOSSES:
            return HEAD_LOSSES[head](scores, labels, valid)
        fn = {"classes": losses.cross_entropy, "binary": losses.binary_cross_entropy,
              "regression": losses.mean_squared_error}[self.kind]
        return fn(scores, labels, valid)

    def predictions(self, scores: np.ndarray) -> np.ndarray:
        """Scores -> predictions: class ids ("classes"), 0/1 ("binary"), floats ("regression")."""
        scores = np.asarray(scores)
        if self.kind == "classes":
            return scores.argmax(-1)
        if self.kind == "binary":
            return (scores > 0).astype(np.int64)
        return scores.astype(np.float64)

    def metric(self, scores: np.ndarray, labels: np.ndarray) -> float:
        """Accuracy ("classes", "binary") or Pearson r ("regression"; 0 for a constant prediction)."""
        pred = self.predictions(scores)
        if self.kind == "regression":
            if np.std(pred) == 0 or np.std(labels) == 0:
                return 0.0
            return float(stats.pearsonr(pred, np.asarray(labels, np.float64)).statistic)
        return float(np.mean(pred == np.asarray(labels).astype(np.int64)))


TASKS: Registry[Task] = Registry("task", lambda name, known: f"unknown task {name!r}; known tasks: {', '.join(known)}")
register_task = TASKS.register


def unregister_task(name: str) -> None:
    """Remove a registered task (tests that register a temporary one)."""
    TASKS.pop(name)


get_task = TASKS.lookup  # the registered task `name`; an unknown name is a ValueError listing the known ones


def evaluated_tasks() -> tuple[str, ...]:
    """The tasks `train` and `evaluate` score by default, in registry order."""
    return tuple(t for t, task in TASKS.items() if task.evaluated)


def overall_tasks() -> tuple[str, ...]:
    return tuple(t for t, task in TASKS.items() if task.overall is not None)


def overall_score(metrics: dict[str, float]) -> float | None:
    """The mean of the overall terms of every task that has one, when all of them are in `metrics`;
    for the built-in tasks (sst + para + (sts + 1) / 2) / 3."""
    names = overall_tasks()
    if not names or any(t not in metrics for t in names):
        return None
    return sum(TASKS[t].overall(metrics[t]) for t in names) / len(names)


def _same(x: float) -> float:
    return x


def _unit_interval(r: float) -> float:
    return (r + 1.0) / 2.0


# The CS224N multitask data. Registration order fixes each task's seed component (train.data._task_index).
register_task(Task("sst", "ids-sst-{split}.csv", "sentiment", "classes", (0, 4), pair=False, num_classes=5,
                   overall=_same, leaderboard_column="Predicted_Sentiment"))
register_task(Task("cfimdb", "ids-cfimdb-{split}.csv", "sentiment", "classes", (0, 1), pair=False, num_classes=2,
                   evaluated=False, leaderboard_column="Predicted_Sentiment"))
register_task(Task("para", "quora-{split}.csv", "is_duplicate", "binary", (0, 1), pair=True,
                   heads=("pair", "cosine", "cosine_mse", "cross"), overall=_same, leaderboard_column="Predicted_Is_Paraphrase"))
register_task(Task("sts", "sts-{split}.csv", "similarity", "regression", (0.0, 5.0), pair=True,
                   heads=("pair", "cosine", "cosine_relu", "cross"), overall=_unit_interval,
                   leaderboard_column="Predicted_Similiary"))  # sic: the starter's spelling
