"""Dev metrics of the report: SST / CFIMDB accuracy, paraphrase accuracy, STS Pearson r (scipy), overall.

Each task's metric and its share of the overall score come from the task registry (`train.tasks`)."""

from __future__ import annotations

import numpy as np

from train.tasks import get_task, overall_score


def predictions(task: str, scores: np.ndarray) -> np.ndarray:
    """Scores -> the leaderboard's predictions: class ids (sst/cfimdb), 0/1 (para), 0..5 floats (sts)."""
    return get_task(task).predictions(scores)


def task_metric(task: str, scores: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy for classification tasks, Pearson r for STS."""
    return get_task(task).metric(scores, labels)


def overall(sst: float, para: float, sts: float) -> float:
    """The project's overall score: (sst + para + (sts + 1) / 2) / 3."""
    return overall_score({"sst": sst, "para": para, "sts": sts})


def summarize(metrics: dict[str, float]) -> dict[str, float]:
    """Add `overall` when every task of the overall score is present."""
    out = dict(metrics)
    score = overall_score(metrics)
    if score is not None:
        out["overall"] = score
    return out
