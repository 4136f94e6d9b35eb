"""CS224N leaderboard files: `{sst,para,sts}-{dev,test}-output.csv` in the starter's exact format."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from train.metrics import predictions

_FILES = {"sst": ("sst", "Predicted_Sentiment"), "para": ("para", "Predicted_Is_Paraphrase"),
          "sts": ("sts", "Predicted_Similiary"),  # sic: the starter's spelling
          "cfimdb": ("cfimdb", "Predicted_Sentiment")}


def leaderboard_lines(task: str, ids: Sequence[str], scores: np.ndarray) -> list[str]:
    """Header `id \\t <column> `, then one `id , value ` line per example (as the starter writes them)."""
    _, column = _FILES[task]
    preds = predictions(task, scores)
    return [f"id \t {column} \n"] + [f"{i} , {p} \n" for i, p in zip(ids, preds.tolist())]


def write_leaderboard_file(out_dir: Path, task: str, split: str, ids: Sequence[str], scores: np.ndarray) -> Path:
    prefix, _ = _FILES[task]
    path = Path(out_dir) / f"{prefix}-{split}-output.csv"
    tmp = path.with_suffix(".csv.tmp")
    tmp.write_text("".join(leaderboard_lines(task, ids, scores)))
    tmp.replace(path)
    return path
