"""The accuracy recipe preset (`cpu-recipe`, the default of `make train`) end to end on a tiny BERT and tiny
data: train (split step, length-grouped batches, cross-encoded paraphrase, cosine STS head, linear
schedule), the printed final metrics and best checkpoint, evaluate, predict on a paraphrase file, and the
PyTorch baseline training the same config (`train --framework torch`)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import yaml

from scripts.cli import main as cli_main
from train.config import resolve_config

TINY = ["heads.para_head=cross", "train_limit=48", "dev_limit=24", "epoch_policy=3", "epochs=2", "batch_size=4", "max_len=32",
        "buckets=[16,24,32]", "length_window=2", "warmup_steps=1", "eval_batch_size=8"]


def test_recipe_preset_is_what_the_readme_says():
    cfg = resolve_config("cpu-recipe")
    assert (cfg.heads.pooling, cfg.heads.sts_head) == ("mean", "cosine_relu")
    assert cfg.step_impl == "split" and cfg.data.length_window > 0 and cfg.optim.head_lr_scale > 1
    assert cfg.optim.schedule == "linear" and cfg.optim.warmup_steps > 0


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory, tiny_vocab_bert_dir, tiny_data_dir):
    run = tmp_path_factory.mktemp("recipe") / "run"
    args = ["train", "--config", "cpu-recipe", "--checkpoint", str(tiny_vocab_bert_dir), "--data-dir",
            str(tiny_data_dir), "--out", str(run), "--quiet", *TINY]
    return run, args


def test_recipe_trains_evaluates_and_predicts(recipe_run, tiny_data_dir, tmp_path, capsys):
    run, args = recipe_run
    assert cli_main(args) == 0
    out, err = capsys.readouterr()
    result = json.loads(out.strip().splitlines()[-1])
    assert result["step"] == 6 and np.isfinite(result["overall"])
    assert "final dev metrics (step 6)" in err and f"best checkpoint: {result['best_checkpoint']}" in err
    assert (run / "best").is_dir() and result["best_checkpoint"].startswith(str(run / "best"))
    # compiled, or (the tests' cache already holding this source's programs) loaded from the executable store
    assert result["xla_compiles"] + result["stored_programs"] >= 1 and result["compile_s"] > 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [6] and all("compile_s" in r for r in records)  # eval_every=3: the end only
    from bert_jax import matmul  # the preset's dtype=auto, written as this machine's concrete dtype

    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["dtype"] == matmul.auto_dtype()

    assert cli_main(["evaluate", str(run), "--split", "dev", "--data-dir", str(tiny_data_dir)]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["para"] == pytest.approx(records[-1]["para"] if records[-1]["best"] else evaluated["para"])

    # a paraphrase file the run has never seen, through the cross-encoder
    src = tiny_data_dir / "quora-dev.csv"
    preds = tmp_path / "pred"
    assert cli_main(["predict", str(run), "--task", "para", "--input", str(src), "--out", str(preds)]) == 0
    capsys.readouterr()
    written = list(preds.glob("*.csv"))
    assert len(written) == 1
    lines = written[0].read_text().splitlines()
    with open(src, newline="") as f:
        n_rows = sum(1 for _ in csv.reader(f, delimiter="\t")) - 1
    assert len(lines) == 1 + n_rows and all(line.split(" , ")[1].strip() in ("0", "1") for line in lines[1:])

    # `evaluate --input`: the held-out file's accuracy, a row with a bad label skipped and counted; the reference is
    # the accuracy of predict's leaderboard lines against the file's labels (csv module)
    with open(src, newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    label = rows[0].index("is_duplicate")
    rows[2][label] = "maybe"
    held = tmp_path / "held-out.tsv"
    held.write_text("\n".join("\t".join(r) for r in rows) + "\n")
    predicted = {i.strip(): int(v) for i, v in (line.split(" , ") for line in lines[1:])}
    truth = {r[rows[0].index("id")]: int(float(r[label])) for r in rows[1:] if r[label] != "maybe"}
    assert cli_main(["evaluate", str(run), "--task", "para", "--input", str(held)]) == 0
    out, err = capsys.readouterr()
    scored = json.loads(out.strip().splitlines()[-1])
    assert scored["rows"] == n_rows - 1 and scored["skipped_rows"] == 1 and "line 3" in err
    assert scored["para"] == pytest.approx(np.mean([predicted[i] == y for i, y in truth.items()]))
    held.write_text("\n".join("\t".join(r[:label]) for r in rows) + "\n")  # no label column: a clear error
    assert cli_main(["evaluate", str(run), "--task", "para", "--input", str(held)]) == 2
    assert "no label column 'is_duplicate'" in capsys.readouterr().err
    assert cli_main(["evaluate", str(run), "--input", str(held)]) == 2  # which task's format: --task is required
    assert "--input FILE and --task TASK go together" in capsys.readouterr().err


def test_torch_baseline_trains_the_recipe_on_the_same_batches(recipe_run, tiny_data_dir, tmp_path, capsys):
    _, args = recipe_run
    out = tmp_path / "torch"
    targs = [a if a != str(recipe_run[0]) else str(out) for a in args] + ["--framework", "torch"]
    assert cli_main(targs) == 0
    record = json.loads((out / "torch.json").read_text())
    assert record["framework"] == "torch" and np.isfinite(record["overall"])
    assert record["config"]["heads"]["para_head"] == "cross"
    assert "final dev metrics (PyTorch baseline)" in capsys.readouterr().err


def test_torch_baseline_moving_average_leaves_training_unchanged(recipe_run, tmp_path, capsys):
    """`optim.ema_decay` in the PyTorch baseline: the same weights as without it (its `raw_*` dev metrics are the
    plain run's), while the reported model is the average."""
    _, args = recipe_run
    records = []
    for name, extra in (("plain", []), ("ema", ["optim.ema_decay=0.5"])):
        out = tmp_path / name
        assert cli_main([a if a != str(recipe_run[0]) else str(out) for a in args] + ["--framework", "torch", *extra]) == 0
        records.append(json.loads((out / "torch.json").read_text()))
    capsys.readouterr()
    plain, ema = records
    for k in ("sst", "para", "sts", "overall"):
        assert ema[f"raw_{k}"] == plain[k]
    assert ema["overall"] != plain["overall"]
