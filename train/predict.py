"""CS224N leaderboard files: `{sst,para,sts}-{dev,test}-output.csv` in the starter's exact format.

Every line is `id , value ` with the raw id: the format has no quoting or escaping. So an id holding a line
break (it would split its line) or a comma (the line would be ambiguous) is not escaped but refused:
`train.data.load_task` skips such rows of the dev and test files as malformed (counted and reported with
their line numbers), and `leaderboard_lines` raises a ValueError naming the id should one get this far.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from train.metrics import predictions
from train.tasks import get_task


def leaderboard_lines(task: str, ids: Sequence[str], scores: np.ndarray) -> list[str]:
    """Header `id \\t <column> `, then one `id , value ` line per example (as the starter writes them)."""
    from train.data import _id_problem

    column = get_task(task).leaderboard_column
    for i in ids:
        problem = _id_problem(str(i))
        if problem:
            raise ValueError(f"{task}: cannot write a leaderboard line for id {str(i)[:60]!r}: {problem}")
    preds = predictions(task, scores)
    return [f"id \t {column} \n"] + [f"{i} , {p} \n" for i, p in zip(ids, preds.tolist())]


def write_leaderboard_file(out_dir: Path, task: str, split: str, ids: Sequence[str], scores: np.ndarray,
                           label: str | None = None) -> Path:
    """`OUT/<task>-<split>-output.csv`, or `OUT/<task>-<label>-output.csv` (predict --input FILE: the file's
    name, so that it never replaces a split's prediction file)."""
    path = Path(out_dir) / f"{get_task(task).name}-{label or split}-output.csv"
    tmp = path.with_suffix(".csv.tmp")
    tmp.write_text("".join(leaderboard_lines(task, ids, scores)))
    tmp.replace(path)
    return path
