"""The experiment driver on a tiny random BERT and tiny data: runs, skips finished runs, writes the report."""

from __future__ import annotations

import json
import subprocess
import sys

from train.experiments import EXPERIMENTS, REPORT_DEV, experiment_config_dict, population_groups


def test_every_experiment_config_resolves():
    from train.config import TrainConfig

    by = {}
    for exp in EXPERIMENTS:
        by[exp.name] = TrainConfig.from_dict(experiment_config_dict("cpu", exp))
    assert by["pcgrad"].combine == "pcgrad" and by["mean-drop0.4"].model.hidden_dropout == 0.4
    assert by["sst-pretrain"].tasks == ("sst",) and not by["sst-pretrain"].finetune
    assert by["cosine"].heads.sts_head == "cosine" and by["cosine"].heads.para_head == "cosine"
    # the cpu protocol scales every lr by the same factor: the sweep keeps the report's ratios
    assert abs(by["lr5e-5"].optim.lr / by["sum"].optim.lr - 5.0) < 1e-9
    assert set(REPORT_DEV) | {"cfimdb-finetune", "cfimdb-pretrain"} >= {e.name for e in EXPERIMENTS}
    assert by["cosine-mse"].heads.para_head == "cosine_mse" and by["cfimdb-finetune"].tasks == ("cfimdb",)
    assert by["sum"].data.epochs * by["sum"].data.epoch_policy >= 600 and by["sum"].data.dev_limit is None  # the bar


def test_population_groups_share_one_architecture():
    """The lr sweep, sum / mean, dropout variants and seeds train as one population; PCGrad, cosine heads and each
    single-task run alone."""
    configs = {e.name: experiment_config_dict("cpu", e) for e in EXPERIMENTS}
    groups = population_groups(configs)
    big = next(g for g in groups if "sum" in g)
    assert set(big) == {"sum", "sum-seed1", "mean", "sum-drop0.4", "mean-drop0.4", "lr2e-5", "lr3e-5", "lr4e-5",
                        "lr5e-5", "lr6e-5"}
    assert ["pcgrad"] in groups and ["cosine"] in groups and ["cosine-mse"] in groups and ["cfimdb-pretrain"] in groups
    assert sorted(n for g in groups for n in g) == sorted(configs)


def test_driver_resumes_and_reports(tmp_path, tiny_data_dir, tiny_vocab_bert_dir):
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "scripts.cli", "experiments", "--protocol", "tiny", "--data-dir", str(tiny_data_dir),
           "--out", str(out), "--checkpoint", str(tiny_vocab_bert_dir), "--only", "sum,sum-seed1,sst-pretrain", "--no-torch"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "[train] population of 2: sum, sum-seed1" in first.stderr and "[train] sst-pretrain" in first.stderr
    done = json.loads((out / "runs" / "sum" / "done.json").read_text())
    metrics = [json.loads(l) for l in (out / "runs" / "sum" / "metrics.jsonl").read_text().splitlines()]
    assert done["overall"] == metrics[-1]["overall"] and done["step"] == 2
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "[skip] sum: done" in second.stderr and "[train]" not in second.stderr
    report = (out / "REPORT.md").read_text()
    assert f"{done['overall']:.3f} / 0.666" in report  # ours / the report's, for the summed-loss row
    assert "`sst-pretrain`" in report and (out / "lr.png").stat().st_size > 1000
    assert "Noise band = the spread of the summed-loss run over 2 seeds" in report
    assert (out / "curves.png").stat().st_size > 1000 and len(done["curve"]) == 2 and done["loss"]
    study = json.loads((out / "study.json").read_text())
    assert study["protocol"] == "tiny" and study["wall_s"] > 0
    # --report: trains nothing; the ensembles wait for all their members (here most are not run)
    (out / "REPORT.md").unlink()
    third = subprocess.run([*cmd[:cmd.index("--only")], "--report", "--no-torch"], capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stderr[-2000:]
    assert "[train]" not in third.stderr and "[ensembles] skipped: member run(s) not done: sst-finetune" in third.stderr
    assert f"{done['overall']:.3f} / 0.666" in (out / "REPORT.md").read_text()
    assert set(json.loads((out / "study.json").read_text())["runs"]) == {"sum", "sum-seed1", "sst-pretrain"}
