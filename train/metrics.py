"""Dev metrics of the report: SST / CFIMDB accuracy, paraphrase accuracy, STS Pearson r (scipy), overall."""

from __future__ import annotations

import numpy as np
from scipy import stats


def predictions(task: str, scores: np.ndarray) -> np.ndarray:
    """Scores -> the leaderboard's predictions: class ids (sst/cfimdb), 0/1 (para), 0..5 floats (sts)."""
    scores = np.asarray(scores)
    if task in ("sst", "cfimdb"):
        return scores.argmax(-1)
    if task == "para":
        return (scores > 0).astype(np.int64)
    return scores.astype(np.float64)


def task_metric(task: str, scores: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy for classification tasks, Pearson r for STS."""
    pred = predictions(task, scores)
    if task == "sts":
        if np.std(pred) == 0 or np.std(labels) == 0:
            return 0.0
        return float(stats.pearsonr(pred, np.asarray(labels, np.float64)).statistic)
    return float(np.mean(pred == np.asarray(labels).astype(np.int64)))


def overall(sst: float, para: float, sts: float) -> float:
    """The project's overall score: (sst + para + (sts + 1) / 2) / 3."""
    return (sst + para + (sts + 1.0) / 2.0) / 3.0


def summarize(metrics: dict[str, float]) -> dict[str, float]:
    """Add `overall` when sst, para and sts are all present."""
    out = dict(metrics)
    if all(t in metrics for t in ("sst", "para", "sts")):
        out["overall"] = overall(metrics["sst"], metrics["para"], metrics["sts"])
    return out
