"""`bert-jax ensemble` (evaluate a spec of prediction ensembles) and `bert-jax soup` (weight-space averages).

  bert-jax ensemble SPEC --data-dir D --split dev|test [--results-dir R] [--out DIR] [--scores F.npz] [--node NAME]
                        [--recorded-scores]
  bert-jax soup RUN RUN... --out RUN [--greedy --data-dir D]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _log(msg: str) -> None:
    print(msg, file=sys.stderr)


def _ensemble(args: argparse.Namespace) -> int:
    import numpy as np

    from ensemble.evaluate import (format_table, group_models, load_models, load_split, model_scores, node_scores,
                                   recorded_scores, table_rows)
    from ensemble.spec import SpecError, compile_weights, load_spec
    from train.predict import write_leaderboard_file

    spec = load_spec(args.spec, results_dir=args.results_dir)
    node = args.node or spec.default_node()
    if node not in spec.nodes and node not in spec.members:
        raise SpecError(f"--node {node!r} is not a member or node of {args.spec} (nodes: {', '.join(spec.nodes) or 'none'})")
    if args.split == "test" and not args.out and not args.scores:
        raise ValueError("the test split has no labels: give --out DIR (leaderboard files) and/or --scores FILE.npz")
    if args.recorded_scores and args.split != "dev":
        raise ValueError("--recorded-scores: runs record their dev scores only; score the test split without it")
    weights = compile_weights(spec)
    raw = load_split(args.data_dir, args.split, limit=args.limit, log=_log)
    if args.recorded_scores:
        _log(f"{len(spec.members)} members ({len(spec.models)} distinct runs, recorded dev scores), "
             f"{len(spec.nodes)} nodes")
        data = recorded_scores(spec.models, raw, args.limit)
    else:
        groups = group_models(load_models(spec.models))
        _log(f"{len(spec.members)} members ({len(spec.models)} distinct runs in {len(groups)} vmapped group(s)), "
             f"{len(spec.nodes)} nodes; scoring {args.split}")
        data = model_scores(groups, len(spec.models), raw, batch_size=args.batch_size)
        del groups
    scores = node_scores(spec, weights, data)
    if args.split != "test":
        rows = table_rows(spec, scores, data)
        print(format_table(rows))
        if args.json:
            Path(args.json).write_text(json.dumps({"split": args.split, "node": node, "rows": rows}, indent=2) + "\n")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for t, s in scores[node].items():
            path = write_leaderboard_file(out, t, args.split, data.ids[t], s)
            _log(f"wrote {path} ({len(data.ids[t])} rows, node {node})")
    if args.scores:
        saved = {"names": np.asarray(spec.names), "kinds": np.asarray(
                     ["member" if n in spec.members else spec.nodes[n].kind for n in spec.names]),
                 "models": np.asarray([str(p) for p in spec.models]), "tasks": np.asarray(list(data.scores))}
        for t in data.scores:
            saved[f"ids/{t}"] = np.asarray(data.ids[t])
        for name, per_task in scores.items():
            saved[f"weights/{name}"] = weights[name]
            for t, s in per_task.items():
                saved[f"scores/{name}/{t}"] = s
        np.savez(args.scores, **saved)
        _log(f"wrote {args.scores} (scores/<name>/<task>, ids/<task>, weights/<name>)")
    return 0


def recorded_dev(runs: list[Path], limit: int | None) -> list[dict]:
    """Each run's dev metrics as its trainer recorded them for the params `load_params` loads: the last
    `metrics.jsonl` record marked best (the best checkpoint's evaluation). The run's dev set must be the one a
    soup evaluates on (`dev_limit` == `limit`)."""
    from train.checkpoint import METRICS, read_metrics, read_run_config
    from train.tasks import TASKS

    out = []
    for run in runs:
        cfg, _ = read_run_config(run)
        if cfg.data.dev_limit != limit:
            raise ValueError(f"{run}: recorded on dev_limit={cfg.data.dev_limit}, the soup scores on limit={limit}")
        path = run / METRICS
        best = [r for r in read_metrics(path) if r.get("best")]
        if not best or not (run / "best").is_dir():
            raise ValueError(f"{path}: no recorded best-dev evaluation (train the run with dev evaluation, or drop "
                             f"--recorded-scores)")
        out.append({k: best[-1][k] for k in (*TASKS, "overall") if k in best[-1]})
    return out


def _soup(args: argparse.Namespace) -> int:
    from ensemble.evaluate import Model, group_models, load_models, load_split, metrics_of, model_scores
    from ensemble.soup import check_compatible, greedy_soup, uniform_soup
    from train.checkpoint import save_params_run

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out}: output run directory exists and is not empty")
    if len(args.runs) < 2:
        raise ValueError("a soup needs at least 2 runs")
    if args.greedy and args.data_dir is None:
        raise ValueError("--greedy needs --data-dir (ingredients are ranked and kept by their dev overall)")
    models = load_models(args.runs)
    names = [str(m.run) for m in models]
    check_compatible([m.spec for m in models], names)
    trees = [m.params for m in models]
    first = models[0]

    raw = load_split(args.data_dir, "dev", limit=args.limit, log=_log) if args.data_dir is not None else {}
    cache: dict = {}

    def dev(ms: list) -> list[dict]:
        """Dev metrics of each model (one vmapped pass)."""
        data = model_scores(group_models(ms), len(ms), raw, batch_size=args.batch_size, cache=cache)
        return [metrics_of({t: s[i] for t, s in data.scores.items()}, data.labels) for i in range(len(ms))]

    def as_first(params) -> Model:  # a soup is a model of the first ingredient's config
        return Model(first.run, first.cfg, first.spec, params)

    record: dict = {"kind": "greedy" if args.greedy else "uniform", "ingredients": names}
    if args.greedy:
        own = recorded_dev([m.run for m in models], args.limit) if args.recorded_scores else dev(models)
        for n, m in zip(names, own):
            _log(f"ingredient {n}: dev {json.dumps({k: round(v, 4) for k, v in m.items()})}")
        params, kept, history = greedy_soup(trees, lambda p: dev([as_first(p)])[0]["overall"], [m["overall"] for m in own], names)
        for h in history:
            _log(f"{'kept   ' if h['kept'] else 'dropped'} {names[h['index']]}: soup dev overall {h['overall']:.4f}")
        record.update(kept=[names[i] for i in kept], history=[{**h, "run": names[h["index"]]} for h in history],
                      ingredient_dev=own)
    else:
        params = uniform_soup(trees, names)
    metrics = dev([as_first(params)])[0] if args.data_dir is not None else {}
    save_params_run(out, first.cfg, first.spec, params, first.run / "vocab.txt", metrics)
    record["dev"] = metrics
    (out / "soup.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({"out": str(out), "kind": record["kind"], "ingredients": len(names),
                      "kept": len(record.get("kept", names)), **metrics}))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("ensemble", help="evaluate prediction ensembles (average / task-based, nested) from a spec file")
    p.add_argument("spec", help="YAML or JSON ensemble spec (see ensemble/spec.py, ensembles/report.yaml)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--split", default="dev", choices=["dev", "test"])
    p.add_argument("--results-dir", default=None, help="member run paths are relative to this (default: the spec's "
                   "results_dir key, else the spec file's directory)")
    p.add_argument("--out", default=None, help="write the chosen node's leaderboard files here")
    p.add_argument("--scores", default=None, help="save raw per-task scores of every member and node to this .npz")
    p.add_argument("--node", default=None, help="node (or member) whose predictions are written (default: the spec's "
                   "`output`, else its last node)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--limit", type=int, default=None, help="only the first N examples of each task")
    p.add_argument("--json", default=None, help="also write the table as JSON to this file")
    p.add_argument("--recorded-scores", action="store_true",
                   help="dev: use the per-example dev scores each run recorded at its best evaluation "
                        "(RUN/dev_scores.npz) instead of evaluating the runs again")
    p.set_defaults(func=_ensemble)

    p = subparsers.add_parser("soup", help="average the params of same-architecture runs into a new run (uniform / greedy soup)")
    p.add_argument("runs", nargs="+", help="run directories (same architecture, fine-tuned from the same checkpoint)")
    p.add_argument("--out", required=True, help="the soup's run directory (must not exist or be empty)")
    p.add_argument("--greedy", action="store_true", help="greedy soup: keep an ingredient only if dev overall does not drop")
    p.add_argument("--recorded-scores", action="store_true",
                   help="greedy: rank the ingredients by the dev metrics their runs recorded (metrics.jsonl, best "
                        "evaluation) instead of evaluating each again")
    p.add_argument("--data-dir", default=None, help="dev data (needed by --greedy; with it a uniform soup's dev metrics are recorded)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--limit", type=int, default=None, help="only the first N dev examples of each task")
    p.set_defaults(func=_soup)
