"""`bert-jax experiments`: the report's whole study, resumably, with REPORT.md and plots.

RESULTS_DIR/
  runs/<experiment>/     one run directory per experiment (done.json marks it finished)
  ensembles.json         dev metrics of Ensembles 1-7 and the soups
  torch-sum.json         the PyTorch baseline's summed-loss model under the same protocol (when torch is installed)
  REPORT.md, lr.png, ensembles.png
  study.json             protocol, seed, hardware, wall times
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

from train.experiments import EXPERIMENTS, REPORT_DEV, experiment_config_dict, protocol_summary

TASK_COLS = ("sst", "para", "sts", "overall")


def hardware() -> str:
    import os

    import jax

    from scripts.bench_cmd import cpu_model

    dev = jax.devices()[0]
    return f"{cpu_model()}, {os.cpu_count()} cores; jax {jax.__version__} on {dev.platform} ({dev.device_kind})"


def run_experiment(results: Path, protocol: str, exp, data_dir, seed: int, checkpoint: str | None,
                   log: Callable[[str], None]) -> dict[str, Any]:
    """Train one experiment unless it is done; resume it when it was interrupted."""
    from train.config import TrainConfig
    from train.trainer import train

    run = results / "runs" / exp.name
    done = run / "done.json"
    if done.is_file():
        log(f"[skip] {exp.name}: done")
        return json.loads(done.read_text())
    extra = {"seed": seed} | ({"checkpoint": checkpoint} if checkpoint else {})
    cfg = TrainConfig.from_dict(experiment_config_dict(protocol, exp, extra))
    resume = (run / "checkpoints").is_dir()
    log(f"[{'resume' if resume else 'train'}] {exp.name}: {exp.label}")
    t0 = time.perf_counter()
    metrics = train(cfg, data_dir, run, resume=resume)
    if metrics.get("stopped"):
        raise KeyboardInterrupt
    # The report evaluates the final model; best == final here (one evaluation per run in the cpu protocol).
    record = {k: metrics[k] for k in TASK_COLS if k in metrics} | {"wall_s": time.perf_counter() - t0, "step": metrics["step"]}
    done.write_text(json.dumps(record))
    return record


def run_ensembles(results: Path, data_dir: Path, dev_limit: int | None, log: Callable[[str], None]) -> dict[str, dict]:
    """Ensembles 1-7 (`ensembles/report.yaml`) and a uniform and a greedy soup, scored on dev.

    Uses the `ensemble` / `soup` commands in-process; soups are written as runs (runs/soup-uniform, runs/soup-greedy).
    """
    from scripts.cli import main as cli

    from train.experiments import SOUP_MEMBERS

    spec = Path(__file__).resolve().parents[1] / "ensembles" / "report.yaml"
    limit = ["--limit", str(dev_limit)] if dev_limit else []
    common = ["--data-dir", str(data_dir), *limit]
    table = results / "ensembles-table.json"
    if cli(["ensemble", str(spec), "--results-dir", str(results / "runs"), "--split", "dev", "--json", str(table), *common]):
        raise RuntimeError("ensemble evaluation failed")
    out = {r["name"].replace("ens", "ensemble"): r for r in json.loads(table.read_text())["rows"] if r["kind"] != "member"}
    members = [str(results / "runs" / n) for n in SOUP_MEMBERS if (results / "runs" / n / "done.json").is_file()]
    for kind, flags in (("uniform", []), ("greedy", ["--greedy"])):
        run = results / "runs" / f"soup-{kind}"
        if not (run / "soup.json").is_file():
            shutil.rmtree(run, ignore_errors=True)  # an interrupted soup is redone
            log(f"[soup] {kind} over {len(members)} runs")
            if cli(["soup", *members, "--out", str(run), *flags, *common]):
                raise RuntimeError(f"{kind} soup failed")
        out[f"soup-{kind}"] = json.loads((run / "soup.json").read_text())["dev"]
    return {k: {m: v for m, v in r.items() if m in TASK_COLS} for k, r in out.items()}


def run_torch_baseline(results: Path, protocol: str, data_dir: Path, seed: int, checkpoint: str | None,
                       log: Callable[[str], None]) -> dict | None:
    """The PyTorch baseline's summed-loss model under the same protocol and data order (torch-sum.json)."""
    from train.config import TrainConfig

    done = results / "torch-sum.json"
    if done.is_file():
        return json.loads(done.read_text())
    sum_exp = next(e for e in EXPERIMENTS if e.name == "sum")
    extra = {"seed": seed} | ({"checkpoint": checkpoint} if checkpoint else {})
    cfg = TrainConfig.from_dict(experiment_config_dict(protocol, sum_exp, extra))
    log("[torch] sum: PyTorch baseline, summed losses")
    from scripts.torch_baseline import train_torch

    t0 = time.perf_counter()
    metrics = train_torch(cfg, data_dir)
    record = {k: metrics[k] for k in TASK_COLS if k in metrics} | {"wall_s": time.perf_counter() - t0}
    done.write_text(json.dumps(record))
    return record


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def _row(name: str, label: str, ours: dict, theirs: tuple | None, extra: str = "") -> str:
    cells = []
    for i, k in enumerate(TASK_COLS):
        o = ours.get(k)
        t = theirs[i] if theirs else None
        diff = "" if (o is None or t is None) else f" ({o - t:+.3f})"
        cells.append(f"{_fmt(o)} / {_fmt(t)}{diff}")
    return f"| {label} | `{name}` | " + " | ".join(cells) + f" |{extra}"


def write_report(results: Path, study: dict, runs: dict[str, dict], ensembles: dict[str, dict], torch_sum: dict | None) -> Path:
    """REPORT.md: one table per report table (ours / report (difference)), plus the plots."""
    head = "| row | run | SST acc | Para acc | STS r | Overall |\n|---|---|---|---|---|---|"
    lines = [
        f"# bert-jax reproduction of the CS224N report ({study['protocol']} protocol)",
        "",
        f"- checkpoint: `{study['checkpoint']}`; data: `{study['data_dir']}` (Quora: the ~10% subset of the README, "
        "so paraphrase numbers are not comparable to the report's Quora dev set); seed {seed}; protocol `{protocol}` "
        "(see `train/experiments.py`).".format(**study),
        f"- training: {protocol_summary(study['protocol'])}.",
        f"- hardware: {study['hardware']}; wall time {study['wall_s'] / 60:.1f} min.",
        "- cells: **ours / report (ours − report)**; dev sets"
        + (f" limited to the first {study['dev_limit']} examples per task" if study.get("dev_limit") else "") + ".",
        "",
    ]
    tables = [("Table 3: model types", "3"), ("Appendix A.1 (Table 6): sum vs average of losses", "A.1"),
              ("Table 7 / Figure 4: learning rate (summed losses)", "7"), ("Appendix A.3: task-specific classifiers", "A.3")]
    by_name = {e.name: e for e in EXPERIMENTS}
    for title, table in tables:
        lines += [f"## {title}", "", head]
        names = [e.name for e in EXPERIMENTS if e.table == table]
        if table == "A.1":
            names = ["sum"] + names
        if table == "7":
            names = ["sum"] + names
        if table == "A.3":
            names = ["sst-finetune", "sst-pretrain"] + names
        for n in names:
            if n in runs:
                label = by_name[n].label if not (table == "7" and n == "sum") else "1e-5 (= Sum Losses)"
                lines.append(_row(n, label, runs[n], REPORT_DEV.get(n)))
        if table == "3" and torch_sum:
            lines.append(_row("torch-sum", "PyTorch baseline: Sum Losses", torch_sum, REPORT_DEV["sum"]))
        lines.append("")
    if ensembles:
        lines += ["## Table 5: ensembles", "", head]
        for n, m in ensembles.items():
            lines.append(_row(n, n, m, REPORT_DEV.get(n)))
        lines += ["", "![single models vs ensembles](ensembles.png)", ""]
    lines += ["## Figure 4: learning rate", "", "![learning rate sweep](lr.png)", ""]
    out = results / "REPORT.md"
    out.write_text("\n".join(lines) + "\n")
    return out


def plot(results: Path, runs: dict[str, dict], ensembles: dict[str, dict], lr_scale: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = (1, 2, 3, 4, 5, 6)
    names = ["sum"] + [f"lr{k}e-5" for k in ks[1:]]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, task in enumerate(TASK_COLS):
        color = f"C{i}"
        ys = [runs.get(n, {}).get(task) for n in names]
        if all(y is not None for y in ys):
            ax.plot(ks, ys, marker="o", color=color, label=f"{task} (ours)")
        theirs = [REPORT_DEV[n][i] for n in names]
        if all(y is not None for y in theirs):
            ax.plot(ks, theirs, linestyle="--", marker=".", color=color, alpha=0.6, label=f"{task} (report)")
    ax.set_xticks(ks, [f"{k}e-5" + (f"\n(ours {k * lr_scale:g}e-5)" if lr_scale != 1 else "") for k in ks], fontsize=8)
    ax.set_xlabel("the report's learning rate")
    ax.set_ylabel("dev score")
    ax.set_title("Summed-loss multitask model: learning rate sweep (Figure 4)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(results / "lr.png", dpi=120)
    plt.close(fig)

    items = [(n, m["overall"]) for n, m in runs.items() if "overall" in m] + [(n, m["overall"]) for n, m in ensembles.items()]
    if items:
        fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(items)), 4))
        colors = ["tab:blue" if n in runs else "tab:orange" for n, _ in items]
        ax.bar(range(len(items)), [v for _, v in items], color=colors)
        ax.set_xticks(range(len(items)), [n for n, _ in items], rotation=70, ha="right", fontsize=8)
        ax.set_ylabel("dev overall")
        ax.set_ylim(min(v for _, v in items) - 0.05, max(v for _, v in items) + 0.02)
        ax.set_title("Single models (blue) vs ensembles and soups (orange)")
        fig.tight_layout()
        fig.savefig(results / "ensembles.png", dpi=120)
        plt.close(fig)


def _experiments(args: argparse.Namespace) -> int:
    from train.data import resolve_data_dir
    from train.experiments import protocol_base

    results = Path(args.out)
    results.mkdir(parents=True, exist_ok=True)
    data_dir = resolve_data_dir(args.data_dir)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    only = set(args.only.split(",")) if args.only else None
    t0 = time.perf_counter()
    runs: dict[str, dict] = {}
    for exp in EXPERIMENTS:
        if only and exp.name not in only:
            continue
        runs[exp.name] = run_experiment(results, args.protocol, exp, data_dir, args.seed, args.checkpoint, log)
    _, base, lr_scale = protocol_base(args.protocol)
    ensembles = run_ensembles(results, data_dir, base.get("dev_limit"), log) if not only else {}
    torch_sum = run_torch_baseline(results, args.protocol, data_dir, args.seed, args.checkpoint, log) if not args.no_torch and not only else None
    prev = json.loads((results / "study.json").read_text()) if (results / "study.json").is_file() else {}
    study = {"protocol": args.protocol, "checkpoint": args.checkpoint or "embedded", "data_dir": str(data_dir),
             "seed": args.seed, "hardware": hardware(), "dev_limit": base.get("dev_limit"),
             # wall time summed over invocations, so a resumed study reports its total
             "wall_s": prev.get("wall_s", 0.0) * bool(prev) + time.perf_counter() - t0,
             "runs": runs, "ensembles": ensembles, "torch_sum": torch_sum}
    (results / "study.json").write_text(json.dumps(study, indent=2))
    plot(results, runs, ensembles, lr_scale)
    report = write_report(results, study, runs, ensembles, torch_sum)
    log(f"wrote {report} ({study['wall_s'] / 60:.1f} min)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("experiments", help="the report's whole study, resumably, with REPORT.md")
    p.add_argument("--protocol", choices=["report", "cpu", "tiny"], default="cpu", help="tiny: a few steps, for tests")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", required=True, help="results directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", default=None, help="'embedded' (default) or a local HF BERT directory")
    p.add_argument("--only", default=None, help="comma-separated experiment names (no ensembles / report tables for the rest)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline run")
    p.set_defaults(func=_experiments)
