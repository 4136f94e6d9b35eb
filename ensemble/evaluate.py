"""Scores of many runs on a split, one vmapped pass per group of same-architecture runs.

`load_models` reads run directories; `group_models` stacks the runs that share an evaluation function
(`stack.eval_spec`) and a tokenization (vocabulary, max_len); `load_split` reads a split's task files;
`model_scores` runs every group over those tasks' batches (one jitted call per batch and group) and
returns `{task: [M, N, ...]}` over all M models, in the order given. `node_scores` / `table_rows` turn
the compiled spec weights + those scores into per-member / per-node scores and metrics.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import sys
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

import bert_jax
from bert_jax import Params
from ensemble.spec import EnsembleSpec, combine
from train.tasks import evaluated_tasks
from ensemble.stack import eval_spec, make_stacked_eval_fn, stack, stacked_predict
from train import data as D
from train.checkpoint import load_params
from train.config import TrainConfig
from train.metrics import summarize, task_metric
from train.step import ModelSpec


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    run: Path
    cfg: TrainConfig
    spec: ModelSpec
    params: Params


@dataclasses.dataclass(frozen=True, eq=False)
class Group:
    """Models (indices into the model list) evaluated together: `params` stacked, leading axis len(indices)."""

    spec: ModelSpec  # eval_spec of every member
    vocab: Path  # the tokenizer's directory (a run dir)
    max_len: int
    buckets: tuple[int, ...]
    indices: tuple[int, ...]
    params: Params


@dataclasses.dataclass(frozen=True, eq=False)
class SplitScores:
    """`scores[task]`: `[M, N, ...]` float32 for the M models; `labels[task]` `[N]` or None (test split)."""

    split: str
    ids: dict[str, tuple[str, ...]]
    labels: dict[str, np.ndarray | None]
    scores: dict[str, np.ndarray]


def load_models(runs: Sequence[str | Path]) -> list[Model]:
    """Best-dev params (else latest) of each run directory."""
    out = []
    for run in runs:
        cfg, spec, params = load_params(run)
        out.append(Model(Path(run), cfg, spec, params))
    return out


def _vocab_digest(run: Path) -> str:
    """sha256 of the run's tokenizer files (vocabulary and casing): runs that tokenize alike share one encoding."""
    from bert_jax.tokenizer import TOKENIZER_FILES

    h = hashlib.sha256((run / "vocab.txt").read_bytes())
    for name in TOKENIZER_FILES[1:]:
        if (run / name).is_file():
            h.update(name.encode() + b"\0" + (run / name).read_bytes())
    return h.hexdigest()


def group_models(models: Sequence[Model]) -> list[Group]:
    """Group by (eval_spec, vocabulary, max_len) and stack each group (first-appearance order).

    Raises `stack.StructureError` naming the first differing leaf when two runs with the same spec hold
    differently shaped params (an inconsistent run directory).
    """
    keys: dict[tuple, list[int]] = {}
    for i, m in enumerate(models):
        keys.setdefault((eval_spec(m.spec), _vocab_digest(m.run), m.cfg.data.max_len), []).append(i)
    groups = []
    for (spec, _, max_len), idx in keys.items():
        first = models[idx[0]]
        params = stack([models[i].params for i in idx], names=[str(models[i].run) for i in idx])
        groups.append(Group(spec, first.run, max_len, tuple(first.cfg.data.scoring_buckets), tuple(idx), params))
    return groups


def load_split(
    data_dir: str | Path | None,
    split: str,
    tasks: Sequence[str] | None = None,
    limit: int | None = None,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
) -> dict[str, D.TaskData]:
    """`{task: TaskData}` of `split` (first `limit` examples per task when given); skipped rows are logged.

    On the test split a task whose file is missing is skipped with a warning (it is absent from the result).
    """
    data_dir = D.resolve_data_dir(data_dir)
    out = {}
    for t in evaluated_tasks() if tasks is None else tasks:
        try:
            td = D.load_task(data_dir, t, split)
        except D.DataError as e:
            if split != "test" or (data_dir / D.task_filename(t, split)).exists():
                raise
            log(f"warning: {e} -- task {t!r} skipped on the test split")
            continue
        if limit is not None:
            td = dataclasses.replace(td, ids=td.ids[:limit], sentences1=td.sentences1[:limit],
                                     sentences2=None if td.sentences2 is None else td.sentences2[:limit],
                                     labels=None if td.labels is None else td.labels[:limit])
        out[t] = td
    skipped = D.summarize_skipped(out.values())
    if skipped:
        log(skipped)
    return out


def model_scores(
    groups: Sequence[Group],
    n_models: int,
    raw: Mapping[str, D.TaskData],
    batch_size: int = 64,
    cache: dict | None = None,
) -> SplitScores:
    """Scores of every model of every group on the tasks of `raw` (one vmapped pass per group).

    `cache` (a dict the caller keeps) reuses tokenizations across calls (e.g. the greedy soup's candidates).
    """
    cache = {} if cache is None else cache
    scores: dict[str, np.ndarray] = {}
    for g in groups:
        cross = g.spec.heads.cross_tasks
        key = (_vocab_digest(g.vocab), g.max_len, tuple(raw), cross)
        if key not in cache:
            tok = bert_jax.load_tokenizer(g.vocab)
            cache[key] = {t: D.encode_task(td, tok, g.max_len, cross=t in cross) for t, td in raw.items()}
        eval_fn = make_stacked_eval_fn(g.spec)
        for t, enc in cache[key].items():
            s = stacked_predict(eval_fn, g.params, enc, batch_size, g.buckets)
            if t not in scores:
                scores[t] = np.zeros((n_models, *s.shape[1:]), np.float32)
            scores[t][list(g.indices)] = s
    return _split_scores(raw, scores)


def recorded_scores(runs: Sequence[str | Path], raw: Mapping[str, D.TaskData], limit: int | None) -> SplitScores:
    """The dev scores of `runs` as their trainers recorded them at their best evaluation
    (`train.checkpoint.read_dev_scores`: the params `load_models` loads), for the tasks of `raw`, with no
    evaluation. Each run must have been scored on the same dev rows as `raw` (`dev_limit` == `limit`, the same
    ids in the same order); else `RunError` names the run and the task."""
    from train.checkpoint import RunError, read_dev_scores

    scores: dict[str, np.ndarray] = {}
    for i, run in enumerate(runs):
        rec = read_dev_scores(run)
        if rec.dev_limit != limit:
            raise RunError(f"{run}: dev scores recorded on dev_limit={rec.dev_limit}, these are scored on limit={limit}")
        for t, td in raw.items():
            if t not in rec.scores:
                raise RunError(f"{run}: no recorded dev scores for task {t!r} (it has {', '.join(rec.scores)})")
            if rec.ids[t] != tuple(td.ids):
                raise RunError(f"{run}: its recorded {t} dev scores are of other rows than {td.path} gives now "
                               f"({len(rec.ids[t])} vs {len(td.ids)} ids); evaluate the run instead")
            s = rec.scores[t]
            if t not in scores:
                scores[t] = np.zeros((len(runs), *s.shape), np.float32)
            scores[t][i] = s
    return _split_scores(raw, scores)


def _split_scores(raw: Mapping[str, D.TaskData], scores: dict[str, np.ndarray]) -> SplitScores:
    """`scores` ({task: [M, N, ...]}) with the ids and labels of the split `raw`."""
    split = next(iter(raw.values())).split if raw else ""
    return SplitScores(split=split, ids={t: td.ids for t, td in raw.items()},
                       labels={t: td.labels for t, td in raw.items()}, scores=scores)


def metrics_of(scores: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray | None]) -> dict[str, float]:
    """Task metrics (+ overall when sst, para and sts are all present) of one member's / node's scores."""
    return summarize({t: task_metric(t, s, labels[t]) for t, s in scores.items() if labels.get(t) is not None})


def node_scores(spec: EnsembleSpec, weights: Mapping[str, np.ndarray], data: SplitScores) -> dict[str, dict[str, np.ndarray]]:
    """`{name: {task: [N, ...]}}` for every member and node of the spec (via its compiled weights)."""
    return {name: combine(weights[name], data.scores, spec.tasks) for name in spec.names}


def table_rows(spec: EnsembleSpec, scores: Mapping[str, Mapping[str, np.ndarray]], data: SplitScores) -> list[dict]:
    """One row per member and node: name, kind, and the metrics."""
    rows = []
    for name in spec.names:
        kind = "member" if name in spec.members else spec.nodes[name].kind
        rows.append({"name": name, "kind": kind, **metrics_of(scores[name], data.labels)})
    return rows


def format_table(rows: Sequence[Mapping]) -> str:
    """A fixed-width text table: name, kind, SST acc, para acc, STS r, overall."""
    cols = (("sst", "SST acc"), ("para", "para acc"), ("sts", "STS r"), ("overall", "overall"))
    width = max([len("name")] + [len(r["name"]) for r in rows])
    head = f"{'name':<{width}}  {'kind':<7}" + "".join(f"  {c:>8}" for _, c in cols)
    lines = [head, "-" * len(head)]
    for r in rows:
        vals = "".join(f"  {r[k]:>8.4f}" if isinstance(r.get(k), float) and math.isfinite(r[k]) else f"  {'-':>8}" for k, _ in cols)
        lines.append(f"{r['name']:<{width}}  {r['kind']:<7}{vals}")
    return "\n".join(lines)
