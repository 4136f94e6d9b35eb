"""`bert-jax experiments`: the report's whole study, resumably, with REPORT.md and plots.

RESULTS_DIR/
  runs/<experiment>/     one run directory per experiment (done.json marks it finished)
  ensembles.json         dev metrics of Ensembles 1-7 and the soups
  torch-sum.json         the PyTorch baseline's summed-loss model under the same protocol (when torch is installed)
  REPORT.md, lr.png, ensembles.png
  study.json             protocol, seed, hardware, wall times
  logs/<job>.log         each parallel job's output (`--workers` > 1)

`--workers N` (default: one per CPU core on a CPU, else 1) trains the study as N parallel jobs, each a
`bert-jax experiments --only ...` process pinned to its own core: on 2 cores XLA's intra-op threads barely
speed up these small steps (batch 8, <= 32 tokens), while two single-core processes side by side give
about 1.4x the throughput (measured: 0.60 s per step each vs 0.43 s for one process on both cores,
family 6 model 207). Populations are then cut into N parts (`train.experiments.split_groups`), so that
the workers finish together; jobs start longest first. The soups are a job too, started once their
ingredient runs are done (while the last runs still train); the ensembles (on the runs' recorded dev scores)
and the report follow in the calling process once every job is done.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from scripts.host import CORES_ENV
from train.experiments import EXPERIMENTS, HANDOUT_DEV, REPORT_DEV, experiment_config_dict, population_groups, protocol_summary, split_groups

TASK_COLS = ("sst", "para", "sts", "overall")


def hardware() -> str:
    import os

    import jax

    from scripts.bench_cmd import cpu_model

    dev = jax.devices()[0]
    return f"{cpu_model()}, {os.cpu_count()} cores; jax {jax.__version__} on {dev.platform} ({dev.device_kind})"


DONE = "done.json"  # written last into RESULTS/runs/<experiment>/: the run is finished


def done_file(results: Path, name: str) -> Path:
    """RESULTS/runs/<name>/done.json: the marker (and record, `_record`) of a finished experiment."""
    return results / "runs" / name / DONE


def is_done(results: Path, name: str) -> bool:
    return done_file(results, name).is_file()


# the study's soups, each a run directory RESULTS/runs/soup-<kind>/ whose soup.json is written last
SOUPS = {"uniform": [], "greedy": ["--greedy", "--recorded-scores"]}  # kind: `soup` command flags


def soup_file(results: Path, kind: str) -> Path:
    return results / "runs" / f"soup-{kind}" / "soup.json"


def _record(run: Path, metrics: dict[str, Any], wall_s: float, losses: list[tuple[int, float]]) -> dict[str, Any]:
    """done.json of a finished run: its final dev metrics (the report evaluates the final model), the wall time of
    its program (a population's is shared by its members), its dev learning curve (after each epoch) and its
    training loss every 20 steps."""
    from train.checkpoint import METRICS, read_metrics

    curve = read_metrics(run / METRICS)
    record = {k: metrics[k] for k in (*TASK_COLS, "cfimdb") if k in metrics} | {
        "wall_s": wall_s, "step": metrics["step"], "compile_s": metrics.get("compile_s"),
        "curve": [{k: r[k] for k in ("step", *TASK_COLS, "cfimdb") if k in r} for r in curve], "loss": losses}
    (run / DONE).write_text(json.dumps(record))
    return record


def run_group(results: Path, protocol: str, exps: list, data_dir, seed: int, checkpoint: str | None,
              log: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """Train a group of experiments (`train.experiments.population_groups`) unless done: one experiment as a
    single run, several as one population (`train.population`); resume what was interrupted."""
    from train.config import TrainConfig
    from train.population import MEMBER_FIELDS, member_configs, train_population
    from train.trainer import train

    out: dict[str, dict[str, Any]] = {}
    todo = []
    for exp in exps:
        done = done_file(results, exp.name)
        if done.is_file():
            log(f"[skip] {exp.name}: done")
            out[exp.name] = json.loads(done.read_text())
        else:
            todo.append(exp)
    if not todo:
        return out
    extra = {"seed": seed} | ({"checkpoint": checkpoint} if checkpoint else {})
    dicts = [experiment_config_dict(protocol, e, extra) for e in todo]
    runs = [results / "runs" / e.name for e in todo]
    resume = all((r / "checkpoints").is_dir() for r in runs)
    verb = "resume" if resume else "train"
    t0 = time.perf_counter()
    losses: list[list[tuple[int, float]]] = [[] for _ in todo]  # (step, training loss) of this invocation

    def on_event(e: dict) -> None:
        if e["event"] == "step":
            per = e["loss_members"] if "loss_members" in e else [e["loss"]]
            for k, v in enumerate(per):
                losses[k].append((e["step"], v))
            if e["step"] % 100 == 0:
                log(f"  step {e['step']}: loss {e['loss']:.3f}, {e['steps_per_s']:.2f} steps/s")
        elif e["event"] == "eval":
            log(f"  dev @ {e['step']}{' ' + e['member'] if 'member' in e else ''}: overall {e.get('overall', float('nan')):.4f}")

    if len(todo) == 1:
        log(f"[{verb}] {todo[0].name}: {todo[0].label}")
        results_ = [train(TrainConfig.from_dict(dicts[0]), data_dir, runs[0], resume=resume, log=on_event)]
    else:
        log(f"[{verb}] population of {len(todo)}: {', '.join(e.name for e in todo)}")
        cfgs = member_configs(TrainConfig.from_dict(dicts[0]), [{f: d[f] for f in MEMBER_FIELDS} for d in dicts])
        results_ = train_population(cfgs, runs, data_dir, resume=resume, log=on_event)
    if any(r.get("stopped") for r in results_):
        raise KeyboardInterrupt
    wall = time.perf_counter() - t0
    for exp, run, metrics, loss in zip(todo, runs, results_, losses):
        out[exp.name] = _record(run, metrics, wall, loss)
    return out


def run_ensembles(results: Path, data_dir: Path, dev_limit: int | None, log: Callable[[str], None]) -> dict[str, dict]:
    """Ensembles 1-7 (`ensembles/report.yaml`) and a uniform and a greedy soup (`run_soups`), scored on dev.

    Uses the `ensemble` command in-process, on the dev scores the member runs recorded (not evaluated again).
    """
    from scripts.cli import main as cli

    spec = Path(__file__).resolve().parents[1] / "ensembles" / "report.yaml"
    missing = [n for n in yaml.safe_load(spec.read_text())["members"].values()
               if not is_done(results, n)]
    if missing:
        log(f"[ensembles] skipped: member run(s) not done: {', '.join(missing)}")
        return {}
    limit = ["--limit", str(dev_limit)] if dev_limit else []
    table = results / "ensembles-table.json"
    # the members' dev scores as their runs recorded them (the same dev sets), not evaluated again
    if cli(["ensemble", str(spec), "--results-dir", str(results / "runs"), "--split", "dev", "--json", str(table),
            "--recorded-scores", "--data-dir", str(data_dir), *limit]):
        raise RuntimeError("ensemble evaluation failed")
    out = {r["name"].replace("ens", "ensemble"): r for r in json.loads(table.read_text())["rows"] if r["kind"] != "member"}
    out |= run_soups(results, data_dir, dev_limit, log)
    return {k: {m: v for m, v in r.items() if m in TASK_COLS} for k, r in out.items()}


def run_soups(results: Path, data_dir: Path, dev_limit: int | None, log: Callable[[str], None]) -> dict[str, dict]:
    """A uniform and a greedy soup over the done runs of `SOUP_MEMBERS`, unless already written: each a run
    directory (runs/soup-uniform, runs/soup-greedy, via the `soup` command in-process) with its dev metrics."""
    from scripts.cli import main as cli

    from train.experiments import SOUP_MEMBERS

    common = ["--data-dir", str(data_dir), *(["--limit", str(dev_limit)] if dev_limit else [])]
    members = [str(results / "runs" / n) for n in SOUP_MEMBERS if is_done(results, n)]
    out = {}
    # greedy: ingredients ranked by the dev scores their runs recorded (the same dev sets), not evaluated again
    for kind, flags in SOUPS.items():
        done = soup_file(results, kind)
        run = done.parent
        if not done.is_file():
            shutil.rmtree(run, ignore_errors=True)  # an interrupted soup is redone
            log(f"[soup] {kind} over {len(members)} runs")
            if cli(["soup", *members, "--out", str(run), *flags, *common]):
                raise RuntimeError(f"{kind} soup failed")
        out[f"soup-{kind}"] = json.loads(done.read_text())["dev"]
    return out


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


TORCH_JOB = "torch-sum"  # the `--only` name of the PyTorch baseline's run
SOUPS_JOB = "soups"  # the `--only` name of the soups (`run_soups`), a job once their ingredient runs are done


def default_workers() -> int:
    """One worker per core this process may use when JAX runs on the CPU; 1 on an accelerator."""
    import jax

    return len(os.sched_getaffinity(0)) if jax.default_backend() == "cpu" else 1


@dataclasses.dataclass(frozen=True)
class Job:
    names: tuple[str, ...]  # experiments (one population, or one run), or (TORCH_JOB,) or (SOUPS_JOB,)
    cost: float  # relative work, for longest-first scheduling
    after: tuple[str, ...] = ()  # runs that must be done (done.json) before it starts

    @property
    def label(self) -> str:
        return self.names[0] if len(self.names) == 1 else f"{self.names[0]}+{len(self.names) - 1}"


def job_cost(config: dict[str, Any]) -> float:
    """Relative work of one run: its tasks' sequences per step (pairs count twice), a frozen encoder ~1/4 of
    fine-tuning, PCGrad a little more than the sum."""
    from train.tasks import TASKS

    seqs = sum(2 if TASKS.lookup(t).pair else 1 for t in config["tasks"])
    return seqs * (1.0 if config["finetune"] else 0.25) * (1.15 if config["combine"] == "pcgrad" else 1.0)


def parallel_jobs(results: Path, configs: dict[str, dict[str, Any]], workers: int, torch: bool,
                  soups: bool = False) -> list[Job]:
    """The jobs of a study not yet done: populations split per worker, single runs, the torch baseline, and with
    `soups` (the whole study) the soups, which start once all their ingredient runs are done; longest first."""
    from train.experiments import SOUP_MEMBERS

    jobs = []
    for g in split_groups(population_groups(configs), workers):
        todo = tuple(n for n in g if not is_done(results, n))
        if todo:
            jobs.append(Job(todo, sum(job_cost(configs[n]) for n in todo)))
    if torch and "sum" in configs and not (results / "torch-sum.json").is_file():
        jobs.append(Job((TORCH_JOB,), 1.8 * job_cost(configs["sum"])))  # measured: torch's step ~1.8x JAX's bf16
    if soups and all(n in configs for n in SOUP_MEMBERS) and not all(
            soup_file(results, k).is_file() for k in SOUPS):
        # measured (model 207): both soups ~5 min on one core, about one 600-step summed-loss run
        jobs.append(Job((SOUPS_JOB,), job_cost(configs["sum"]), after=SOUP_MEMBERS))
    return sorted(jobs, key=lambda j: -j.cost)


def next_job(queue: list[Job], done: Callable[[str], bool]) -> Job | None:
    """The first job of `queue` (longest first) whose `after` runs are all done, or None."""
    return next((j for j in queue if all(done(n) for n in j.after)), None)


def run_parallel(jobs: list[Job], child_args: list[str], results: Path, workers: int,
                 log: Callable[[str], None]) -> None:
    """Run `jobs` as `bert-jax experiments --only NAMES` processes, at most `workers` at once, each pinned to its
    own core (cores from this process's affinity, round robin when there are fewer cores than workers). Output
    goes to RESULTS/logs/<job>.log. A failed job is reported with its log's tail after the others finish; an
    interrupt is passed on (SIGTERM: each run checkpoints and stops, the study resumes later)."""
    logs = results / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    cores = sorted(os.sched_getaffinity(0))
    free = [cores[i % len(cores)] for i in range(workers)]
    queue, running, failed = list(jobs), {}, []
    done = functools.partial(is_done, results)
    try:
        while queue or running:
            while free and (job := next_job(queue, done)) is not None:
                queue.remove(job)
                core = free.pop(0)
                path = logs / f"{job.label}.log"
                cmd = [sys.executable, "-m", "scripts.cli", "experiments", *child_args, "--workers", "1", "--job",
                       "--only", ",".join(job.names)]
                with path.open("a") as out:  # the child pins itself (scripts.host.prepare_process)
                    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, CORES_ENV: str(core)})
                running[proc] = (job, core, time.perf_counter(), path)
                log(f"[job] {job.label} on core {core}: {', '.join(job.names)}")
            time.sleep(1.0)
            for proc in [p for p in running if p.poll() is not None]:
                job, core, t0, path = running.pop(proc)
                free.append(core)
                ok = proc.returncode == 0
                log(f"[job] {job.label} {'done' if ok else f'FAILED (exit {proc.returncode})'} in "
                    f"{(time.perf_counter() - t0) / 60:.1f} min (core {core}, log {path})")
                if not ok:
                    failed.append((job, path))
            if queue and not running and next_job(queue, done) is None:  # a run they need failed
                for job in queue:
                    log(f"[job] {job.label} not started: needs {', '.join(n for n in job.after if not done(n))}")
                break
    except KeyboardInterrupt:
        for proc in running:
            proc.terminate()
        for proc in running:
            proc.wait()
        raise
    if failed:
        tails = "\n".join(f"--- {j.label} ({p}):\n" + "\n".join(p.read_text().splitlines()[-15:]) for j, p in failed)
        raise RuntimeError(f"{len(failed)} study job(s) failed:\n{tails}")


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


def _verdict(effect: float, band: float, claim: str) -> str:
    """`claim` "gain": the effect should exceed the noise band; "same": it should stay within it."""
    if claim == "same":
        return "reproduced" if abs(effect) <= band else "not reproduced"
    if effect > band:
        return "reproduced"
    return "not reproduced" if effect < -band else "inconclusive (within the seed spread)"


def findings(runs: dict[str, dict], ensembles: dict[str, dict]) -> list[str]:
    """The report's claims, each marked reproduced / not reproduced / inconclusive against the noise band: the
    spread (max - min) over the seeds of the summed-loss run."""
    seeds = [runs[n] for n in ("sum", "sum-seed1") if n in runs]
    if len(seeds) < 2:
        return ["(needs the runs `sum` and `sum-seed1`: the noise band)"]
    band = {t: max(s[t] for s in seeds) - min(s[t] for s in seeds) for t in TASK_COLS}
    s = runs["sum"]
    out = ["Noise band = the spread of the summed-loss run over 2 seeds (`sum`, `sum-seed1`): "
           + ", ".join(f"{t} {band[t]:.3f}" for t in TASK_COLS) + ". An effect inside the band is not evidence.", ""]

    def line(claim: str, effect: str, verdict: str) -> None:
        out.append(f"- **{claim}**: {effect} → **{verdict}**")

    singles = {t: runs.get(f"{t}-finetune") for t in ("sst", "para", "sts")}
    if all(singles.values()):
        diffs = {t: s[t] - singles[t][t] for t in singles}
        worst = min(diffs[t] - band[t] for t in diffs)
        best = max(diffs[t] + band[t] for t in diffs)
        verdict = "reproduced" if worst > 0 else ("not reproduced" if best < 0 else "inconclusive / mixed across tasks")
        line("Multitask beats single-task (Table 3, A.3)",
             "summed-loss multitask − the task's own single-task fine-tune: "
             + ", ".join(f"{t} {d:+.3f}" for t, d in diffs.items())
             + (f"; overall vs the SST baseline {s['overall'] - singles['sst']['overall']:+.3f}" if "overall" in singles["sst"] else ""),
             verdict)
    pairs = [(a, b) for a, b in (("sum", "mean"), ("sum-drop0.4", "mean-drop0.4")) if a in runs and b in runs]
    if pairs:  # at each dropout rate the report ran: the claim holds if every difference stays inside the band
        effects = [runs[b]["overall"] - runs[a]["overall"] for a, b in pairs]
        line("Sum ≈ mean of the losses (A.1)",
             "; ".join(f"`{b}` − `{a}` overall {e:+.3f}" for (a, b), e in zip(pairs, effects)),
             _verdict(max(effects, key=abs), band["overall"], "same"))
    if "pcgrad" in runs:
        e = runs["pcgrad"]["overall"] - s["overall"]
        cost = ""
        if runs["pcgrad"].get("wall_s") and s.get("wall_s"):
            members = sum(1 for r in runs.values() if r.get("wall_s") == s["wall_s"])
            cost = (f"; wall {runs['pcgrad']['wall_s'] / 60:.1f} min alone vs {s['wall_s'] / 60 / max(members, 1):.1f} min "
                    f"per member of the summed-loss population")
        line("PCGrad gains nothing for its cost (Table 3)", f"pcgrad − sum overall {e:+.3f}{cost}",
             "reproduced" if e <= band["overall"] else "not reproduced (PCGrad gains beyond the noise)")
    if "cosine" in runs:
        c = runs["cosine"]
        e_sts, e_para = c["sts"] - s["sts"], c["para"] - s["para"]
        v_sts, v_para = _verdict(e_sts, band["sts"], "gain"), _verdict(-e_para, band["para"], "gain")
        mse = f"; cosine + MSE on para {runs['cosine-mse']['para'] - s['para']:+.3f}" if "cosine-mse" in runs else ""
        line("Cosine heads help STS", f"cosine − sum STS r {e_sts:+.3f}", v_sts)
        line("Cosine heads hurt paraphrase", f"cosine (+CE) − sum para {e_para:+.3f}{mse}", v_para)
        if "cosine-mse" in runs:
            e = c["para"] - runs["cosine-mse"]["para"]
            line("On the cosine paraphrase head, BCE beats MSE (Table 3, §6.1.1: 0.732 vs 0.590)",
                 f"cosine (+CE) − cosine-mse para {e:+.3f}", _verdict(e, band["para"], "gain"))
    sweep = {k: "sum" if k == 1 else f"lr{k}e-5" for k in (1, 2, 3, 4, 5, 6)}
    done = {k: n for k, n in sweep.items() if n in runs}
    if len(done) >= 3:  # the report's lr (1 ... 6) x 1e-5, each x the protocol's lr scale
        ks = sorted(done)
        ys = [runs[done[k]]["overall"] for k in ks]
        peak = max(range(len(ys)), key=ys.__getitem__)
        rise = ys[peak] - max(ys[0], ys[-1])
        interior = 0 < peak < len(ys) - 1
        verdict = ("reproduced" if interior and rise > band["overall"] else
                   "inconclusive (within the seed spread)" if rise <= band["overall"] else "not reproduced")
        not_run = [f"{k}e-5" for k in sweep if k not in done]
        line("Figure 4: overall rises with the learning rate, peaks (at 4e-5) and falls",
             "overall by lr " + ", ".join(f"{k}e-5 {y:.3f}" for k, y in zip(ks, ys))
             + f"; peak at {ks[peak]}e-5 (report: 4e-5), {rise:+.3f} above the better end"
             + (f" (not run: {', '.join(not_run)})" if not_run else ""), verdict)
    ens = {n: m for n, m in ensembles.items() if n.startswith("ensemble") and "overall" in m}
    if ens:
        best_ens = max(ens, key=lambda n: ens[n]["overall"])
        best_single = max((n for n in runs if "overall" in runs[n]), key=lambda n: runs[n]["overall"])
        gain = ens[best_ens]["overall"] - runs[best_single]["overall"]
        of_ens = best_ens in ("ensemble6", "ensemble7")
        line("Ensembles of ensembles are best (Table 5)",
             f"best ensemble {best_ens} {ens[best_ens]['overall']:.3f} ({'an' if of_ens else 'not an'} ensemble of "
             f"ensembles), {gain:+.3f} over the best single run `{best_single}`",
             "not reproduced" if not of_ens or gain < -band["overall"] else
             "reproduced" if gain > band["overall"] else "inconclusive (within the seed spread)")
    return out


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
        f"- hardware: {study['hardware']}; {study.get('workers', 1)} training worker(s) (`--workers`, one core each "
        f"when > 1); wall time of this study's invocations {study['wall_s'] / 60:.1f} min; training programs "
        f"{study.get('train_wall_s', 0) / 60:.1f} min (the sum over populations and single runs, from their done.json; "
        "parallel jobs add up).",
        "- cells: **ours / report (ours − report)**; dev sets"
        + (f" limited to the first {study['dev_limit']} examples per task" if study.get("dev_limit") else "") + ".",
        "",
    ]
    lines += ["## Findings", "", *findings(runs, ensembles), ""]
    tables = [("Table 3: model types", "3"), ("Noise: the summed-loss run's seeds", "noise"),
              ("Appendix A.1 (Table 6): sum vs average of losses", "A.1"),
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
        if table == "noise":
            names = ["sum"] + names
        for n in names:
            if n in runs:
                label = by_name[n].label if not (table == "7" and n == "sum") else "1e-5 (= Sum Losses)"
                lines.append(_row(n, label, runs[n], REPORT_DEV.get(n)))
        if table == "3" and torch_sum:
            lines.append(_row("torch-sum", "PyTorch baseline: Sum Losses", torch_sum, REPORT_DEV["sum"]))
        lines.append("")
    base_rows = [n for n in ("sst-pretrain", "sst-finetune", "cfimdb-pretrain", "cfimdb-finetune") if n in runs]
    if base_rows:
        lines += ["## §4.2 baselines: SST and CFIMDB (dev accuracy, ours / the minBERT handout's bert-base, mean of 10 seeds)",
                  "", "| run | SST | CFIMDB |", "|---|---|---|"]
        for n in base_rows:
            ref = HANDOUT_DEV.get(n, {})
            cells = [f"{_fmt(runs[n].get(t))} / {_fmt(ref.get(t))}" for t in ("sst", "cfimdb")]
            lines.append(f"| `{n}` | " + " | ".join(cells) + " |")
        lines.append("")
    if ensembles:
        lines += ["## Table 5: ensembles", "", head]
        for n, m in ensembles.items():
            lines.append(_row(n, n, m, REPORT_DEV.get(n)))
        lines += ["", "![single models vs ensembles](ensembles.png)", ""]
    lines += ["## Figure 4: learning rate", "", "![learning rate sweep](lr.png)", "",
              "## Learning curves (training loss of every run; dev is scored once, after the last step)", "", "![learning curves](curves.png)", ""]
    out = results / "REPORT.md"
    out.write_text("\n".join(lines) + "\n")
    return out


def plot(results: Path, runs: dict[str, dict], ensembles: dict[str, dict], lr_scale: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

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

    losses = {n: r["loss"] for n, r in runs.items() if r.get("loss")}
    if losses:  # the learning curves: training loss of every run (dev is scored once, at the end)
        fig, axes = plt.subplots(1, 2, figsize=(15, 5))
        for i, (n, loss) in enumerate(losses.items()):
            single = [t for t in ("sst", "para", "sts", "cfimdb") if n.startswith(t + "-")]
            ax = axes[1] if single else axes[0]
            steps, vals = np.array([s for s, _ in loss]), np.array([v for _, v in loss])
            k = min(5, len(vals))  # running mean over 5 points (100 steps) for readability
            smooth = np.convolve(vals, np.ones(k) / k, mode="valid")
            final = runs[n].get(single[0] if single else "overall")
            ax.plot(steps[k - 1:], smooth, lw=1.0, color=f"C{i % 10}", linestyle="-" if i < 10 else "--",
                    label=f"{n} (dev {single[0] if single else 'overall'} {final:.3f})" if final is not None else n)
        axes[0].set_title("multitask runs: training loss (sum of the task losses)")
        axes[1].set_title("single-task runs: training loss")
        for ax in axes:
            ax.set_xlabel("step")
            ax.set_ylabel("training loss, running mean of 5 points (every 20 steps)")
            ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        fig.savefig(results / "curves.png", dpi=120)
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
    unknown = sorted((only or set()) - {e.name for e in EXPERIMENTS} - {TORCH_JOB, SOUPS_JOB})
    if unknown:
        raise ValueError(f"--only: unknown experiment(s) {', '.join(unknown)} (known: {', '.join(e.name for e in EXPERIMENTS)}, "
                         f"{TORCH_JOB}, {SOUPS_JOB})")
    t0 = time.perf_counter()
    runs: dict[str, dict] = {}
    if args.report:  # train nothing: the runs already done
        only = None
        chosen = [e for e in EXPERIMENTS if is_done(results, e.name)]
    else:
        chosen = [e for e in EXPERIMENTS if not only or e.name in only]
    by_name = {e.name: e for e in chosen}
    configs = {e.name: experiment_config_dict(args.protocol, e, {"seed": args.seed}) for e in chosen}
    workers = default_workers() if args.workers is None else args.workers
    if workers > 1 and not args.report:
        child = ["--protocol", args.protocol, "--data-dir", str(data_dir), "--out", str(results), "--seed", str(args.seed),
                 *(["--checkpoint", args.checkpoint] if args.checkpoint else [])]
        jobs = parallel_jobs(results, configs, workers, torch=not args.no_torch and (not only or TORCH_JOB in only),
                             soups=not only)
        if jobs:
            log(f"[parallel] {len(jobs)} job(s) on {min(workers, len(jobs))} worker(s), one core each")
            run_parallel(jobs, child, results, min(workers, len(jobs)), log)
    for group in population_groups(configs):
        runs |= run_group(results, args.protocol, [by_name[n] for n in group], data_dir, args.seed, args.checkpoint, log)
    runs = {e.name: runs[e.name] for e in chosen}
    _, base, lr_scale = protocol_base(args.protocol)
    if args.job:  # a parallel job: its runs only; the calling study writes the report
        if TORCH_JOB in (only or ()):
            run_torch_baseline(results, args.protocol, data_dir, args.seed, args.checkpoint, log)
        if SOUPS_JOB in (only or ()):
            run_soups(results, data_dir, base.get("dev_limit"), log)
        return 0
    ensembles = run_ensembles(results, data_dir, base.get("dev_limit"), log) if not only else {}
    torch_sum = (run_torch_baseline(results, args.protocol, data_dir, args.seed, args.checkpoint, log)
                 if not args.no_torch and (not only or TORCH_JOB in only) else None)
    prev = json.loads((results / "study.json").read_text()) if (results / "study.json").is_file() else {}
    study = {"protocol": args.protocol, "checkpoint": args.checkpoint or "embedded", "data_dir": str(data_dir),
             "seed": args.seed, "hardware": hardware(), "dev_limit": base.get("dev_limit"), "workers": workers,
             # wall time summed over invocations, so a resumed study reports its total
             "wall_s": prev.get("wall_s", 0.0) * bool(prev) + time.perf_counter() - t0,
             "runs": runs, "ensembles": ensembles, "torch_sum": torch_sum,
             # a population's members share one wall time: count each program once
             "train_wall_s": sum({r["wall_s"] for r in runs.values() if r.get("wall_s")})}
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
    p.add_argument("--only", default=None, help=f"comma-separated experiment names, or {TORCH_JOB} (the PyTorch baseline); "
                   "no ensembles / report tables for the rest")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline run")
    p.add_argument("--workers", type=int, default=None,
                   help="parallel training jobs, one core each (default: the cores on a CPU, 1 on an accelerator)")
    p.add_argument("--report", action="store_true",
                   help="train nothing: REPORT.md, ensembles (when all their member runs are done) and soups from the "
                        "runs already done")
    p.add_argument("--job", action="store_true", help=argparse.SUPPRESS)  # a `--workers` job: train, write no report
    p.set_defaults(func=_experiments)
