"""Training end to end on a tiny random BERT (real vocab) and tiny CS224N-format data.

- the jitted multitask step overfits one fixed batch for combine = sum, mean and pcgrad;
- single-task training: "pretrain" (encoder frozen) vs "finetune", and a one-task multitask model;
- the `bert-jax` CLI: train (+ --resume), evaluate, predict (leaderboard files, --task/--input,
  --scores) and the exit-2 user errors.
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest
import yaml

import bert_jax
from scripts.cli import main as cli_main
from train import data as D
from train.config import TrainConfig
from train.heads import task_scores
from train.metrics import overall
from train.step import init_model, init_state, make_train_step, optimizer

REPO = Path(__file__).resolve().parents[1]
TASKS3 = ("sst", "para", "sts")


# ------------------------------------------------------------------------------------ the jitted step

@pytest.fixture(scope="module")
def fixed_batches(tiny_vocab_bert_dir, tiny_data_dir) -> dict[str, dict[str, np.ndarray]]:
    """The first 4 training examples of every task, as one [4, 32] batch each."""
    tok = bert_jax.load_tokenizer(tiny_vocab_bert_dir)
    out = {}
    for t in ("sst", "para", "sts"):
        enc = D.encode_task(D.load_task(tiny_data_dir, t, "train"), tok, 32)
        out[t] = D.make_batch(enc, np.arange(4), 4, (32,))
        assert out[t]["valid"].sum() == 4
    assert len(set(out["sst"]["labels"].tolist())) > 1  # something to learn
    return out


def _cfg(ckpt: Path, **kw) -> TrainConfig:
    """No dropout anywhere, so the step's reported losses are the deterministic losses of its input params."""
    return TrainConfig.from_dict({"checkpoint": str(ckpt), "hidden_dropout": 0.0, "attention_dropout": 0.0, "lr": 3e-3, **kw})


def _train(cfg: TrainConfig, batches: dict, steps: int):
    """(model spec, initial params as numpy, final params, per-step metrics as floats)."""
    spec, params = init_model(cfg, jax.random.key(0))
    before = jax.tree.map(np.array, params)  # a copy: the step donates its input state
    tx = optimizer(cfg)
    state = init_state(params, tx)
    step = make_train_step(spec, tx, cfg.tasks, cfg.combine, cfg.pcgrad_reduction, cfg.finetune)
    task_batches = {t: batches[t] for t in cfg.tasks}
    history = []
    for _ in range(steps):
        state, m = step(state, task_batches, jax.random.key(1))
        history.append(m)
    assert int(state.step) == steps
    return spec, before, jax.tree.map(np.asarray, state.params), [{k: float(v) for k, v in m.items()} for m in history]


@pytest.fixture(scope="module")
def overfit(tiny_vocab_bert_dir, fixed_batches):
    """combine -> history of 100 steps at lr 3e-3 on the fixed batch (memoised: each costs one compile)."""
    runs: dict[str, list[dict]] = {}

    def get(combine: str) -> list[dict]:
        if combine not in runs:
            runs[combine] = _train(_cfg(tiny_vocab_bert_dir, combine=combine), fixed_batches, 100)[3]
        return runs[combine]

    return get


@pytest.mark.parametrize("combine", ["sum", "mean", "pcgrad"])
def test_tiny_bert_overfits_a_tiny_batch(overfit, combine):
    history = overfit(combine)
    first, last = history[0], history[-1]
    assert set(first) == {"loss", "loss_sst", "loss_para", "loss_sts", "grad_norm"}
    # untrained: chance-level losses (CE ~ log 5, BCE ~ log 2); STS MSE of 0..5 labels vs ~0 predictions
    assert first["loss_sst"] == pytest.approx(np.log(5), abs=0.1)
    assert first["loss_para"] == pytest.approx(np.log(2), abs=0.05)
    for h in history:
        assert np.isfinite(list(h.values())).all()
        assert h["loss"] == pytest.approx(h["loss_sst"] + h["loss_para"] + h["loss_sts"], rel=1e-5)
    for t in TASKS3:
        assert last[f"loss_{t}"] < 0.25 * first[f"loss_{t}"], (combine, t, first[f"loss_{t}"], last[f"loss_{t}"])


def test_mean_is_the_sum_over_the_task_count(overfit):
    """At the first step (same params, same batch) the `mean` gradient is exactly the `sum` one / 3."""
    s, m = overfit("sum")[0], overfit("mean")[0]
    assert m["loss"] == pytest.approx(s["loss"], rel=1e-6)  # `loss` reports the sum of the task losses
    assert m["grad_norm"] == pytest.approx(s["grad_norm"] / 3, rel=1e-5)


def _changed(a, b, skip_key_bias: bool = False) -> list[bool]:
    """Per leaf: did it change? `skip_key_bias` leaves out the attention key biases, whose gradient is
    exactly zero (softmax is invariant to adding q·b_k to every logit of a query's row)."""
    return [not np.array_equal(x, y) for (path, x), y in zip(jax.tree.flatten_with_path(a)[0], jax.tree.leaves(b))
            if not (skip_key_bias and "'key']['bias'" in jax.tree_util.keystr(path))]


@pytest.mark.parametrize("finetune", [False, True], ids=["pretrain", "finetune"])
def test_single_task_pretrain_and_finetune(tiny_vocab_bert_dir, fixed_batches, finetune):
    cfg = _cfg(tiny_vocab_bert_dir, tasks=("sst",), finetune=finetune)
    _, before, after, history = _train(cfg, fixed_batches, 6)
    assert set(history[0]) == {"loss", "loss_sst", "grad_norm"}
    assert history[-1]["loss_sst"] < history[0]["loss_sst"]
    # the trained head moved (both kernel and bias); heads of untrained tasks are untouched
    assert all(_changed(before["heads"]["sst"], after["heads"]["sst"]))
    for t in ("para", "sts"):
        assert not any(_changed(before["heads"][t], after["heads"][t])), t
    enc_changed = _changed(before["bert"], after["bert"], skip_key_bias=finetune)
    if finetune:
        assert all(enc_changed), "every encoder tensor gets a gradient and moves"
    else:
        assert not any(enc_changed), "pretrain: encoder params must stay bit-identical"


def test_one_task_multitask_classifier(tiny_vocab_bert_dir, fixed_batches):
    """tasks=("sts",) with PCGrad (one task: no projection) trains STS; the model still scores every task."""
    cfg = _cfg(tiny_vocab_bert_dir, tasks=("sts",), combine="pcgrad")
    assert cfg.heads.heads == ("sst", "para", "sts")
    spec, before, after, history = _train(cfg, fixed_batches, 30)
    assert set(history[0]) == {"loss", "loss_sts", "grad_norm"}
    assert history[-1]["loss_sts"] < 0.25 * history[0]["loss_sts"]
    assert all(_changed(before["bert"], after["bert"], skip_key_bias=True))
    sst = task_scores(after, spec.bert, spec.heads, "sst", fixed_batches["sst"])
    assert sst.shape == (4, 5) and np.isfinite(np.asarray(sst)).all()


# ------------------------------------------------------------------------------------- the CLI

def _bert_jax_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("bert-jax")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "scripts.cli"]


def _last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module", autouse=True)
def _cli_background(request, tmp_path_factory, tiny_vocab_bert_dir, tiny_data_dir):
    """Start the shared CLI run (two `bert-jax train` processes, one after the other) in the background as
    soon as this module starts, so that it runs on the second core while the in-process tests run; only
    when some selected test needs it. `cli_run` waits for it."""
    if not any(item.module is request.module and "cli_run" in item.fixturenames for item in request.session.items):
        yield None
        return
    root = tmp_path_factory.mktemp("cli")
    run = root / "run"
    common = [*_bert_jax_cmd(), "train", "--config", "tiny", "--checkpoint", str(tiny_vocab_bert_dir),
              "--data-dir", str(tiny_data_dir), "--out", str(run), "--quiet", "buckets=[32]"]  # one bucket: one step shape
    q = shlex.join
    script = (f"{q(common + ['--steps', '2'])} >first.out 2>first.err && cp run/metrics.jsonl first-metrics.jsonl && "
              f"{q(common + ['--steps', '4', '--resume'])} >second.out 2>second.err")
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(root / "jax-cache"),  # the 2nd process reuses the 1st's compiles
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    proc = subprocess.Popen(["bash", "-c", script], cwd=root, env=env)
    yield SimpleNamespace(proc=proc, root=root, run=run)
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def cli_run(_cli_background, tiny_data_dir):
    """The shared tiny run: `train --config tiny --steps 2`, then `train ... --resume --steps 4`."""
    bg = _cli_background
    rc = bg.proc.wait(timeout=900)
    logs = {n: (bg.root / n).read_text() if (bg.root / n).is_file() else "" for n in ("first.err", "second.err")}
    assert rc == 0, f"bert-jax train failed (exit {rc}):\n{logs['first.err']}\n{logs['second.err']}"
    return SimpleNamespace(dir=bg.run, root=bg.root, data=tiny_data_dir,
                           first=_last_json((bg.root / "first.out").read_text()),
                           second=_last_json((bg.root / "second.out").read_text()),
                           metrics_after_first=(bg.root / "first-metrics.jsonl").read_text())


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_cli_train_writes_the_run_directory(cli_run, tiny_vocab_bert_dir):
    run = cli_run.dir
    for name in ("config.yaml", "bert_config.json", "vocab.txt", "metrics.jsonl"):
        assert (run / name).is_file(), name
    cfg = TrainConfig.from_dict(yaml.safe_load((run / "config.yaml").read_text()))
    assert cfg == TrainConfig.from_dict({**TrainConfig().to_dict(), "epochs": 1, "epoch_policy": 4, "batch_size": 4,
                                         "max_len": 32, "buckets": [32], "train_limit": 64, "dev_limit": 32,
                                         "checkpoint": str(tiny_vocab_bert_dir), "max_steps": 4})
    assert (run / "vocab.txt").read_bytes() == (tiny_vocab_bert_dir / "vocab.txt").read_bytes()
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
    assert len([p for p in (run / "best").iterdir() if p.name.isdigit()]) == 1
    records = _records(run)
    assert [r["step"] for r in records] == [2, 4]
    for r in records:
        assert set(TASKS3) <= set(r) and r["overall"] == pytest.approx(overall(r["sst"], r["para"], r["sts"]))
        assert -1 <= r["sts"] <= 1 and 0 <= r["sst"] <= 1 and 0 <= r["para"] <= 1
    assert records[0]["best"] is True
    assert cli_run.first["step"] == 2 and cli_run.first["stopped"] is False
    assert cli_run.second["step"] == 4 and cli_run.second["stopped"] is False
    assert cli_run.second["best_overall"] == max(r["overall"] for r in records)


def test_cli_resume_continues_from_the_checkpoint(cli_run):
    """The resumed process started at step 2: it kept the step-2 evaluation (a restart from step 0 would
    rewind metrics.jsonl to nothing) and only appended the step-4 one."""
    text = (cli_run.dir / "metrics.jsonl").read_text()
    assert text.startswith(cli_run.metrics_after_first) and cli_run.metrics_after_first.count("\n") == 1
    at2, at4 = _records(cli_run.dir)
    assert at4["best"] is (at4["overall"] > at2["overall"])  # the best-so-far was restored, not reset to -inf


def _tensorboard_scalars(logdir: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value} of every TFRecord event file in `logdir`, parsed here (length, crc, Event proto)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, dict[int, float]] = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, {})[event.step] = v.simple_value
    return out


def test_cli_train_writes_tensorboard_events(cli_run):
    """The TensorBoard hook (on by default) wrote every step's losses and the dev metrics of every evaluation,
    across the resume, equal to metrics.jsonl's."""
    scalars = _tensorboard_scalars(cli_run.dir / "tensorboard")
    for tag in ("train/loss", "train/loss_sst", "train/loss_para", "train/loss_sts", "train/grad_norm"):
        assert sorted(scalars[tag]) == [1, 2, 3, 4], tag
        assert all(np.isfinite(v) for v in scalars[tag].values())
    records = _records(cli_run.dir)
    for t in ("sst", "para", "sts", "overall"):
        assert scalars[f"dev/{t}"] == {r["step"]: pytest.approx(r[t], abs=1e-6) for r in records}


def test_cli_train_refuses_to_overwrite_a_run(cli_run, tiny_vocab_bert_dir, capsys):
    listing = sorted(p.name for p in (cli_run.dir / "checkpoints").iterdir())
    rc = cli_main(["train", "--config", "tiny", "--checkpoint", str(tiny_vocab_bert_dir), "--data-dir", str(cli_run.data),
                   "--out", str(cli_run.dir), "--quiet", "buckets=[32]"])
    assert rc == 2 and "--resume" in capsys.readouterr().err
    assert sorted(p.name for p in (cli_run.dir / "checkpoints").iterdir()) == listing


def test_cli_evaluate_prints_the_best_metrics(cli_run, capsys):
    assert cli_main(["evaluate", str(cli_run.dir), "--split", "dev", "--data-dir", str(cli_run.data)]) == 0
    out = _last_json(capsys.readouterr().out)
    best = [r for r in _records(cli_run.dir) if r["best"]][-1]
    assert out["split"] == "dev"
    for k in ("sst", "para"):
        assert out[k] == best[k], k
    # The tiny model's STS scores spread by only ~1e-4, so Pearson r moves by ~1e-5 between two
    # XLA compilations (training process vs this one) that differ in the last float bits.
    for k in ("sts", "overall"):
        assert out[k] == pytest.approx(best[k], abs=1e-4), k


def _read_tsv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def _leaderboard(path: Path) -> tuple[str, list[tuple[str, str]]]:
    lines = path.read_text().split("\n")
    assert lines[-1] == ""  # every line, the last included, ends with "\n"
    rows = []
    for line in lines[1:-1]:
        assert line.endswith(" ") and line.count(" , ") == 1, repr(line)
        i, v = line[:-1].split(" , ")
        rows.append((i, v))
    return lines[0], rows


@pytest.fixture(scope="module")
def cli_pred(cli_run):
    """`predict RUN --split test --out DIR --scores S.npz` on the shared run."""
    out, npz = cli_run.root / "pred", cli_run.root / "scores.npz"
    rc = cli_main(["predict", str(cli_run.dir), "--split", "test", "--out", str(out), "--data-dir", str(cli_run.data),
                   "--scores", str(npz)])
    assert rc == 0
    return SimpleNamespace(out=out, scores=dict(np.load(npz)))


def test_cli_predict_writes_leaderboard_files(cli_run, cli_pred):
    files = {"sst": ("ids-sst-test-student.csv", "sst-test-output.csv", "id \t Predicted_Sentiment "),
             "para": ("quora-test-student.csv", "para-test-output.csv", "id \t Predicted_Is_Paraphrase "),
             "sts": ("sts-test-student.csv", "sts-test-output.csv", "id \t Predicted_Similiary ")}
    assert sorted(p.name for p in cli_pred.out.iterdir()) == sorted(f for _, f, _ in files.values())
    for task, (src, name, header) in files.items():
        ids = [r["id"] for r in _read_tsv(cli_run.data / src)]
        assert len(ids) == 24
        head, rows = _leaderboard(cli_pred.out / name)
        assert head == header
        assert [i for i, _ in rows] == ids  # one line per test row, in file order
        assert cli_pred.scores[f"{task}_ids"].tolist() == ids
        s = cli_pred.scores[f"{task}_scores"]
        assert s.shape == ((len(ids), 5) if task == "sst" else (len(ids),))
        values = [v for _, v in rows]
        if task == "sst":
            assert [int(v) for v in values] == s.argmax(-1).tolist()
        elif task == "para":
            assert [int(v) for v in values] == (s > 0).astype(int).tolist()
        else:
            np.testing.assert_allclose([float(v) for v in values], s, rtol=1e-6)


def test_cli_predict_one_task_on_any_file(cli_run, cli_pred, capsys):
    """`--task sts --input FILE`: the first 5 test rows, predicted alone, score as in the full-file run."""
    src = (cli_run.data / "sts-test-student.csv").read_text().splitlines()
    path = cli_run.root / "my-sts.csv"
    path.write_text("\n".join(src[:6]) + "\n")
    out, npz = cli_run.root / "pred-one", cli_run.root / "one.npz"
    assert cli_main(["predict", str(cli_run.dir), "--task", "sts", "--input", str(path), "--out", str(out), "--scores", str(npz)]) == 0
    assert [p.name for p in out.iterdir()] == ["sts-my-sts-output.csv"]  # named after --input
    head, rows = _leaderboard(out / "sts-my-sts-output.csv")
    assert head == "id \t Predicted_Similiary "
    assert [i for i, _ in rows] == [r["id"] for r in _read_tsv(path)] == cli_pred.scores["sts_ids"][:5].tolist()
    one = np.load(npz)["sts_scores"]
    assert one.shape == (5,)
    np.testing.assert_allclose(one, cli_pred.scores["sts_scores"][:5], atol=1e-5)
    capsys.readouterr()
    assert cli_main(["predict", str(cli_run.dir), "--input", str(path), "--out", str(out)]) == 2
    assert "--input needs --task" in capsys.readouterr().err


def test_cli_user_errors_exit_2(tiny_vocab_bert_dir, tmp_path, capsys):
    missing = tmp_path / "no-such-data"
    rc = cli_main(["train", "--config", "tiny", "--checkpoint", str(tiny_vocab_bert_dir), "--data-dir", str(missing),
                   "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and str(missing.resolve()) in err and "does not exist" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()
    rc = cli_main(["evaluate", str(tmp_path / "no-run"), "--data-dir", str(missing)])
    err = capsys.readouterr().err
    assert rc == 2 and str(tmp_path / "no-run") in err
    rc = cli_main(["train", "--config", "tiny", "--data-dir", str(missing), "--out", str(tmp_path / "run"), "bogus_key=1"])
    err = capsys.readouterr().err
    assert rc == 2 and "bogus_key" in err


def test_eval_every_evaluates_every_nth_epoch_and_the_last_step(tiny_vocab_bert_dir, tiny_data_dir, tmp_path):
    """`eval_every=2` over 3 epochs of 1 step: dev metrics after step 2 (epoch 2) and step 3 (the end) only; the
    best checkpoint is one of those."""
    from train.config import resolve_config
    from train.trainer import train

    cfg = resolve_config("tiny", ["epochs=3", "epoch_policy=1", "eval_every=2", "buckets=[32]"],
                         checkpoint=str(tiny_vocab_bert_dir))
    r = train(cfg, tiny_data_dir, tmp_path / "run", tensorboard=False)
    assert [rec["step"] for rec in _records(tmp_path / "run")] == [2, 3]
    assert r["step"] == 3 and Path(r["best_checkpoint"]).name in ("2", "3")


def test_moving_average_is_the_run_model_and_leaves_training_unchanged(tiny_vocab_bert_dir, tiny_data_dir, tmp_path):
    """`optim.ema_decay`: the weights follow the same trajectory as without it (its `raw_*` dev metrics equal the
    plain run's), the dev metrics and the best checkpoint are the average's, and the average is the hand-computed
    one over the weights the plain step produces."""
    from train.optim import ema_params

    common = ["train", "--config", "tiny", "--checkpoint", str(tiny_vocab_bert_dir), "--data-dir", str(tiny_data_dir),
              "--quiet", "buckets=[32]", "--steps", "3"]
    assert cli_main([*common, "--out", str(tmp_path / "plain")]) == 0
    assert cli_main([*common, "--out", str(tmp_path / "ema"), "optim.ema_decay=0.5"]) == 0
    plain, ema = _records(tmp_path / "plain")[-1], _records(tmp_path / "ema")[-1]
    for k in ("sst", "para", "sts", "overall"):
        assert ema[f"raw_{k}"] == plain[k]
    assert ema["overall"] != plain["overall"]

    # the step itself: average over three steps vs the same steps without it
    cfg = _cfg(tiny_vocab_bert_dir, lr=1e-3)
    spec, params = init_model(cfg, jax.random.key(0))
    states, tracked = [], []
    for decay in (0.0, 0.5):
        c = cfg.with_values({"optim.ema_decay": decay})
        tx = optimizer(c)
        state = init_state(jax.tree.map(lambda x: x.copy(), params), tx)
        step = make_train_step(spec, tx, c.tasks, c.combine, c.pcgrad_reduction, c.finetune)
        trajectory = [jax.tree.map(np.array, state.params)]
        for i in range(3):
            state, _ = step(state, _tiny_batches(tiny_vocab_bert_dir, tiny_data_dir), jax.random.key(i))
            trajectory.append(jax.tree.map(np.array, state.params))
        states.append(trajectory)
        tracked.append(ema_params(state.opt_state))
    assert tracked[0] is None
    for a, b in zip(jax.tree.leaves(states[0]), jax.tree.leaves(states[1])):
        np.testing.assert_array_equal(a, b)  # the average does not touch the weights
    want = jax.tree.map(lambda *ps: 0.125 * ps[0] + 0.125 * ps[1] + 0.25 * ps[2] + 0.5 * ps[3], *states[0])
    for got, w in zip(jax.tree.leaves(tracked[1]), jax.tree.leaves(want)):
        np.testing.assert_allclose(got, w, rtol=1e-6, atol=1e-7)


def _tiny_batches(ckpt, data_dir) -> dict:
    tok = bert_jax.load_tokenizer(ckpt)
    return {t: D.make_batch(D.encode_task(D.load_task(data_dir, t, "train"), tok, 32), np.arange(4), 4, (32,))
            for t in ("sst", "para", "sts")}


def test_eval_buckets_pad_less_and_score_the_same(tiny_vocab_bert_dir, tiny_data_dir):
    """`data.eval_buckets`: dev batches padded to the finer lengths (fewer padded tokens) give the scores of the
    training buckets' padding (the reference: every batch padded to 32) within float rounding."""
    from train.step import make_eval_fn
    from train.trainer import predict_scores

    cfg = TrainConfig.from_dict(dict(checkpoint=str(tiny_vocab_bert_dir), max_len=32, buckets=[32], eval_buckets=[8, 16, 32]))
    assert cfg.data.scoring_buckets == (8, 16, 32)
    spec, params = init_model(cfg, jax.random.key(0))
    tok = bert_jax.load_tokenizer(tiny_vocab_bert_dir)
    scorer = make_eval_fn(spec)
    lengths: list[int] = []

    def recording(p, task, batch):
        lengths.append(next(v.shape[1] for k, v in batch.items() if k.startswith("input_ids")))
        return scorer(p, task, batch)

    for t in TASKS3:
        enc = D.encode_task(D.load_task(tiny_data_dir, t, "dev"), tok, cfg.data.max_len)
        coarse = predict_scores(scorer, params, enc, 8, cfg.data.buckets)
        fine = predict_scores(recording, params, enc, 8, cfg.data.scoring_buckets)
        np.testing.assert_allclose(fine, coarse, atol=1e-5, rtol=0)
    assert min(lengths) < 32 and set(lengths) <= {8, 16, 32}
    with pytest.raises(ValueError, match="eval_buckets"):
        TrainConfig.from_dict(dict(buckets=[16, 32], eval_buckets=[8, 16]))  # would cut what training keeps
    again = TrainConfig.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict())))
    assert again.data.eval_buckets == (8, 16, 32) and TrainConfig().data.scoring_buckets == TrainConfig().data.buckets
