"""A new task is one registration: a toy pair-regression task, registered here and nowhere else, trains,
evaluates, predicts and ensembles through the ordinary command line (issue: one place per concept)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats

from scripts.cli import main
from train import tasks as T
from train.config import TrainConfig
from train.heads import HeadConfig

TOY = T.Task("toy", "toy-{split}.csv", "overlap", "regression", (0.0, 1.0), pair=True,
             heads=("cosine", "pair", "cosine_relu", "cross"), leaderboard_column="Predicted_Overlap")


@pytest.fixture
def toy_task():
    T.register_task(TOY)
    try:
        yield TOY
    finally:
        T.unregister_task("toy")


def _toy_data(base: Path, out: Path, seed: int = 0) -> Path:
    """The tiny CS224N files plus toy-{train,dev,test-student}.csv: label = the share of the first sentence's
    words that the second one keeps (0..1)."""
    shutil.copytree(base, out)
    rng = np.random.default_rng(seed)
    words = ["red", "blue", "cat", "dog", "runs", "sits", "big", "small", "the", "a", "green", "tree"]
    for split, n in (("train", 40), ("dev", 20), ("test-student", 10)):
        rows = ["\tid\tsentence1\tsentence2" + ("\toverlap" if split != "test-student" else "")]
        for i in range(n):
            a = list(rng.choice(words, size=6))
            k = int(rng.integers(0, 7))
            b = a[:k] + list(rng.choice(words, size=6 - k))
            label = f"\t{k / 6:.4f}" if split != "test-student" else ""
            rows.append(f"{i}\ttoy{split}{i}\t{' '.join(a)}\t{' '.join(b)}{label}")
        (out / f"toy-{split}.csv").write_text("\n".join(rows) + "\n")
    return out


def _train(data: Path, out: Path, ckpt: Path, seed: int, capsys) -> list[dict]:
    args = ["train", "--config", "tiny", "--checkpoint", str(ckpt), "--data-dir", str(data), "--out", str(out),
            "--quiet", "--seed", str(seed), "tasks=[sst, toy]", "epochs=2", "buckets=[32]"]
    assert main(args) == 0
    capsys.readouterr()
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_registered_toy_task_trains_evaluates_predicts_and_ensembles(toy_task, tmp_path, tiny_data_dir,
                                                                       tiny_vocab_bert_dir, capsys):
    # the registry feeds the config, the heads and the data loader
    assert TrainConfig(tasks=("sst", "toy")).heads.heads == ("sst", "para", "sts", "toy")
    assert HeadConfig().kind("toy") == "cosine"  # the task's first head kind is its default
    with pytest.raises(ValueError, match="unknown task 'toyy'; known tasks: sst, cfimdb, para, sts, toy"):
        T.get_task("toyy")
    data = _toy_data(tiny_data_dir, tmp_path / "data")

    # train: the toy task is trained (its loss is logged) and scored on dev at every epoch end
    records = _train(data, tmp_path / "r0", tiny_vocab_bert_dir, 0, capsys)
    last, best = records[-1], max(records, key=lambda r: r["overall"])  # evaluate / predict use the best params
    assert {"sst", "para", "sts", "toy", "overall"} <= set(last) and -1.0 <= last["toy"] <= 1.0
    # the overall score is still the project's: (sst + para + (sts + 1) / 2) / 3 (the toy task has no share)
    assert last["overall"] == pytest.approx((last["sst"] + last["para"] + (last["sts"] + 1) / 2) / 3, abs=1e-12)

    # predict: a leaderboard file with the toy task's column; its scores' Pearson r (scipy) is the metric
    npz = tmp_path / "scores.npz"
    assert main(["predict", str(tmp_path / "r0"), "--data-dir", str(data), "--out", str(tmp_path / "pred"),
                 "--task", "toy", "--scores", str(npz)]) == 0
    lines = (tmp_path / "pred" / "toy-dev-output.csv").read_text().splitlines()
    assert lines[0] == "id \t Predicted_Overlap " and len(lines) == 21 and lines[1].startswith("toydev0 , ")
    scores = np.load(npz)["toy_scores"]
    assert scores.shape == (20,) and np.all((scores >= 0) & (scores <= 1))  # cosine head on the 0..1 label range
    dev = [ln.split("\t") for ln in (data / "toy-dev.csv").read_text().splitlines()[1:]]
    labels = np.array([float(r[4]) for r in dev])
    capsys.readouterr()

    # evaluate: the run's best params, the toy task among the dev metrics, = scipy's Pearson r of the predictions
    assert main(["evaluate", str(tmp_path / "r0"), "--data-dir", str(data)]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["toy"] == pytest.approx(stats.pearsonr(scores, labels).statistic, abs=1e-6)
    assert metrics["toy"] == pytest.approx(best["toy"], abs=1e-6)

    # ensemble: a task node routes the toy task to its own member, an average node averages it
    _train(data, tmp_path / "r1", tiny_vocab_bert_dir, 1, capsys)
    spec = {"members": {"a": str(tmp_path / "r0"), "b": str(tmp_path / "r1")},
            "nodes": {"avg": {"type": "average", "children": ["a", "b"]},
                      "tb": {"type": "task", "sst": "a", "para": "a", "sts": "a", "toy": "b"}},
            "output": "avg"}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    enpz = tmp_path / "ens.npz"
    assert main(["ensemble", str(tmp_path / "spec.yaml"), "--data-dir", str(data), "--split", "dev",
                 "--out", str(tmp_path / "ens"), "--scores", str(enpz)]) == 0
    z = np.load(enpz)
    np.testing.assert_allclose(z["scores/a/toy"], scores, atol=1e-5)
    np.testing.assert_allclose(z["scores/avg/toy"], (z["scores/a/toy"] + z["scores/b/toy"]) / 2, atol=1e-6)
    np.testing.assert_allclose(z["scores/tb/toy"], z["scores/b/toy"], atol=0)
    np.testing.assert_allclose(z["scores/tb/sst"], z["scores/a/sst"], atol=0)
    assert (tmp_path / "ens" / "toy-dev-output.csv").read_text().startswith("id \t Predicted_Overlap ")
    # a task node that leaves out a registered task is refused, naming it
    spec["nodes"]["tb"].pop("toy")
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    assert main(["ensemble", str(tmp_path / "spec.yaml"), "--data-dir", str(data), "--split", "dev",
                 "--out", str(tmp_path / "ens2")]) == 2
    assert "no child for task(s) ['toy']" in capsys.readouterr().err


def test_registry_refuses_inconsistent_tasks():
    with pytest.raises(ValueError, match="already registered"):
        T.register_task(T.TASKS["sst"])
    with pytest.raises(ValueError, match="do not fit a binary task"):
        T.Task("x", "x-{split}.csv", "y", "binary", (0, 1), pair=True, heads=("cosine_relu",))
    with pytest.raises(ValueError, match="num_classes"):
        T.Task("x", "x-{split}.csv", "y", "classes", (0, 4), pair=False)
    with pytest.raises(ValueError, match="no '{split}'"):
        T.Task("x", "x.csv", "y", "regression", (0, 1), pair=True, heads=("pair",))
