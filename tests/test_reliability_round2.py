"""Reliability, round 2: each fault of the issue, injected at the level where a user meets it (mostly the
`bert-jax` command line, in-process: exit code, the one stderr line, and what is left on disk).

1. `train --out` into a directory that is not a bert-jax run / over an existing run (`--overwrite`)
2. two writers on one run directory (RUN/.lock)
3. a dev file without a usable row; an evaluation that fails after training; predict and unneeded labels
4. the tokenizer travels with the run; vocab without [CLS]/[SEP]; `--resume` with another checkpoint or
   tokenizer; token ids beyond the model's vocab_size
5. `--resume` with other training data of the same size
6. a malformed config.json of the checkpoint (and bert_config.json of a run)
7. a failed save (a write error in a real process, and ENOSPC injected)
8. labels that only look numeric
9. ids that would break leaderboard lines; `predict --input` output names
+ minor: an empty training file, strict JSON of an interrupted run, overrides after flags, duplicate
  keys in an ensemble spec.

Trainings use the tiny real-vocab BERT, the tiny data and the `tiny` preset (4 steps of batch 4).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]


def _train_args(data: Path, run: Path, bert: Path, *extra: str) -> list[str]:
    return ["train", "--config", "tiny", "--checkpoint", str(bert), "--data-dir", str(data), "--out", str(run),
            "--quiet", "buckets=[32]", *extra]


def _main(args: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = cli_main(args)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _error_line(err: str, command: str = "train") -> str:
    """The one `bert-jax <command>: error: ...` line of `err` (no traceback, no other error line)."""
    assert "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ": error: " in ln]
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith(f"bert-jax {command}: error: "), lines[0]
    return lines[0]


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _copy_data(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


@pytest.fixture(scope="module")
def run4(tmp_path_factory, tiny_data_dir, tiny_vocab_bert_dir) -> Path:
    """A finished tiny run (4 steps, one epoch): checkpoints/4, best/4, metrics.jsonl."""
    run = tmp_path_factory.mktemp("round2") / "run4"
    assert cli_main(_train_args(tiny_data_dir, run, tiny_vocab_bert_dir)) == 0
    return run


@pytest.fixture()
def run_copy(run4, tmp_path) -> Path:
    return Path(shutil.copytree(run4, tmp_path / "run"))


# ------------------------------------------------------------------ 1. what --out may be, --overwrite


@pytest.mark.parametrize("flag", [None, "--overwrite", "--resume"])
def test_out_dir_that_is_not_a_run_is_refused(flag, tmp_path, tiny_data_dir, tiny_vocab_bert_dir, capsys) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes\n")
    (out / "vocab.txt").write_text("[PAD]\nmine\n")
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "keep.bin").write_bytes(b"\x00\x01")
    before = _snapshot(out)
    rc, _, err = _main(_train_args(tiny_data_dir, out, tiny_vocab_bert_dir, *([flag] if flag else [])), capsys)
    assert rc == 2
    line = _error_line(err)
    assert str(out) in line and "not a bert-jax run" in line and "new --out" in line
    assert _snapshot(out) == before and sorted(p.name for p in out.iterdir()) == ["checkpoints", "notes.txt", "vocab.txt"]


def test_overwrite_restarts_a_run_and_deletes_only_its_own_files(run_copy, tmp_path, tiny_data_dir,
                                                                 tiny_vocab_bert_dir, capsys) -> None:
    run = run_copy
    (run / "notes.txt").write_text("keep me\n")
    (run / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nstale\n")  # a stale vocabulary must not survive
    before = _snapshot(run)
    # without a flag: refused, naming both ways out; nothing changes
    rc, _, err = _main(_train_args(tiny_data_dir, run, tiny_vocab_bert_dir), capsys)
    assert rc == 2
    line = _error_line(err)
    assert str(run) in line and "--resume" in line and "--overwrite" in line
    assert _snapshot(run) == before
    # --overwrite, but the new run cannot start (a training file without rows): nothing is deleted
    broken = _copy_data(tiny_data_dir, tmp_path / "broken")
    (broken / "ids-sst-train.csv").write_text("\tid\tsentence\tsentiment\n")
    rc, _, err = _main(_train_args(broken, run, tiny_vocab_bert_dir, "--overwrite"), capsys)
    assert rc == 2 and "ids-sst-train.csv" in _error_line(err)
    assert _snapshot(run) == before
    # --overwrite: announced on stderr, then only bert-jax's files are replaced
    rc, _, err = _main(_train_args(tiny_data_dir, run, tiny_vocab_bert_dir, "--overwrite", "--steps", "2"), capsys)
    assert rc == 0, err
    said = [ln for ln in err.splitlines() if "--overwrite: deleting" in ln]
    assert len(said) == 1 and str(run) in said[0]
    for name in ("best/", "checkpoints/", "config.yaml", "metrics.jsonl", "vocab.txt"):
        assert name in said[0], name
    assert "keeping notes.txt" in said[0]
    assert (run / "notes.txt").read_text() == "keep me\n"
    assert (run / "vocab.txt").read_bytes() == (tiny_vocab_bert_dir / "vocab.txt").read_bytes()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["2"]
    assert [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()] == [2]
    assert not (run / ".lock").exists()


def test_empty_out_dir_and_resume_overwrite_together(tmp_path, tiny_data_dir, tiny_vocab_bert_dir, capsys) -> None:
    run = tmp_path / "run"
    rc, _, err = _main(_train_args(tiny_data_dir, run, tiny_vocab_bert_dir, "--resume", "--overwrite"), capsys)
    assert rc == 2 and "exclude each other" in _error_line(err)
    assert not run.exists()  # a refused start leaves no directory behind


# ------------------------------------------------------------------------------- 2. the run lock


def _hold_lock(run: Path, pid: int) -> int:
    run.mkdir(parents=True, exist_ok=True)
    fd = os.open(run / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, json.dumps({"pid": pid, "host": socket.gethostname(), "started": 0}).encode())
    return fd


def test_second_writer_fails_at_once(run_copy, tiny_data_dir, tiny_vocab_bert_dir, capsys) -> None:
    run = run_copy
    before = _snapshot(run)
    fd = _hold_lock(run, 424242)  # as a running `train` holds it
    try:
        rc, _, err = _main(_train_args(tiny_data_dir, run, tiny_vocab_bert_dir, "--resume"), capsys)
        assert rc == 2
        line = _error_line(err)
        assert "in use by another bert-jax train (pid 424242 on host" in line and str(run / ".lock") in line
        # ... and from another process (flock is per open file, so this is what a second `train` meets)
        p = subprocess.run([sys.executable, "-m", "scripts.cli", *_train_args(tiny_data_dir, run, tiny_vocab_bert_dir, "--resume")],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
        assert p.returncode == 2 and "in use by another bert-jax train" in _error_line(p.stderr)
    finally:
        os.close(fd)
    (run / ".lock").unlink()
    assert _snapshot(run) == before


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_lock_of_a_dead_process_is_taken_over_and_reported(tmp_path, tiny_data_dir, tiny_vocab_bert_dir,
                                                                 capsys) -> None:
    run = tmp_path / "run"
    run.mkdir()
    pid = _dead_pid()
    (run / ".lock").write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": 0}))
    rc, _, err = _main(_train_args(tiny_data_dir, run, tiny_vocab_bert_dir, "--steps", "1"), capsys)
    assert rc == 0, err
    note = [ln for ln in err.splitlines() if "stale lock" in ln]
    assert len(note) == 1 and f"pid {pid}" in note[0] and str(run / ".lock") in note[0]
    assert not (run / ".lock").exists()


def test_stale_lock_without_flock_is_reported_with_the_way_out(tmp_path, tiny_data_dir, tiny_vocab_bert_dir, capsys,
                                                               monkeypatch) -> None:
    """A filesystem without flock: the lock file is the lock; a dead owner's file is reported with `rm`."""
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    run = tmp_path / "run"
    run.mkdir()
    pid = _dead_pid()
    (run / ".lock").write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": 0}))
    rc, _, err = _main(_train_args(tiny_data_dir, run, tiny_vocab_bert_dir), capsys)
    assert rc == 2
    line = _error_line(err)
    assert "stale lock file" in line and f"pid {pid}" in line and f"rm {run / '.lock'}" in line


# ------------------------------------------------- 3. dev data, evaluation failures, predict labels


def test_dev_file_without_usable_rows_fails_before_the_first_step(tmp_path, tiny_data_dir, tiny_vocab_bert_dir,
                                                                 capsys) -> None:
    data = _copy_data(tiny_data_dir, tmp_path / "data")
    lines = (data / "sts-dev.csv").read_text().splitlines()
    (data / "sts-dev.csv").write_text("\n".join([lines[0]] + [ln.rsplit("\t", 1)[0] + "\thigh" for ln in lines[1:]]) + "\n")
    run = tmp_path / "run"
    rc, _, err = _main(_train_args(data, run, tiny_vocab_bert_dir), capsys)
    assert rc == 2
    line = _error_line(err)
    assert str(data / "sts-dev.csv") in line and "no usable row in the dev file of task 'sts'" in line
    assert f"all {len(lines) - 1} data rows are malformed" in line
    assert not run.exists()  # failed before anything was written


def test_training_state_is_saved_before_the_evaluation(tmp_path, tiny_data_dir, tiny_vocab_bert_dir, monkeypatch) -> None:
    import train.trainer as T
    from train.config import resolve_config

    cfg = resolve_config("tiny", ["buckets=[32]"], checkpoint=str(tiny_vocab_bert_dir))
    run = tmp_path / "run"

    def broken(*a, **k):
        raise RuntimeError("evaluation failed")

    with monkeypatch.context() as m:
        m.setattr(T, "evaluate", broken)
        with pytest.raises(RuntimeError, match="evaluation failed"):
            T.train(cfg, tiny_data_dir, run)
    assert (run / "checkpoints" / "4").is_dir()  # the 4 trained steps are kept
    assert not (run / "metrics.jsonl").exists() or (run / "metrics.jsonl").read_text() == ""
    assert not (run / ".lock").exists()
    # resuming redoes the evaluation that failed, then finishes
    result = T.train(cfg, tiny_data_dir, run, resume=True)
    assert result["step"] == 4 and not result["stopped"] and result["best_overall"] == result["overall"]
    assert [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()] == [4]
    assert sorted(p.name for p in (run / "best").iterdir() if p.name.isdigit()) == ["4"]


def test_predict_keeps_rows_whose_unneeded_label_is_bad(run4, tmp_path, capsys) -> None:
    path = tmp_path / "labelled.csv"
    path.write_text("\tid\tsentence\tsentiment\n0\ta\tgood film\t4\n1\tb\tbad film\thigh\n2\tc\tdull plot\t0_4\n"
                    "3\td\tlovely\t\n4\te\tawful\t9\n")
    out = tmp_path / "pred"
    rc, _, err = _main(["predict", str(run4), "--task", "sst", "--input", str(path), "--out", str(out)], capsys)
    assert rc == 0, err
    assert "malformed" not in err
    rows = (out / "sst-labelled-output.csv").read_text().splitlines()[1:]
    assert [r.split(" , ")[0] for r in rows] == ["a", "b", "c", "d", "e"]


# ------------------------------------------------------------------------- 4. tokenizer and vocab


def test_run_keeps_its_tokenizer_and_casing(tmp_path, tiny_data_dir, tiny_vocab_bert_dir, capsys) -> None:
    import bert_jax

    cased = Path(shutil.copytree(tiny_vocab_bert_dir, tmp_path / "cased"))
    (cased / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
    (cased / "special_tokens_map.json").write_text(json.dumps({"cls_token": "[CLS]", "sep_token": "[SEP]"}))
    run = tmp_path / "run"
    rc, _, err = _main(_train_args(tiny_data_dir, run, cased, "--steps", "1"), capsys)
    assert rc == 0, err
    assert json.loads((run / "tokenizer_config.json").read_text())["do_lower_case"] is False
    assert (run / "special_tokens_map.json").read_bytes() == (cased / "special_tokens_map.json").read_bytes()
    assert (run / "vocab.txt").read_bytes() == (cased / "vocab.txt").read_bytes()
    text = "Good Film , GREAT plot"
    ids = bert_jax.load_tokenizer(run)(text)["input_ids"]
    assert ids == bert_jax.load_tokenizer(cased)(text)["input_ids"]
    assert ids != bert_jax.load_tokenizer(tiny_vocab_bert_dir)(text)["input_ids"]  # the uncased tokenization differs
    shutil.rmtree(cased)  # the run is self-contained: evaluate needs nothing of the checkpoint
    rc, out, err = _main(["evaluate", str(run), "--data-dir", str(tiny_data_dir)], capsys)
    assert rc == 0, err
    assert json.loads(out.strip().splitlines()[-1])["split"] == "dev"


def test_vocab_without_cls_or_sep_is_refused(tmp_path, tiny_data_dir, tiny_vocab_bert_dir, capsys) -> None:
    bert = Path(shutil.copytree(tiny_vocab_bert_dir, tmp_path / "bert"))
    words = [w for w in (bert / "vocab.txt").read_text().splitlines() if w != "[CLS]"]
    (bert / "vocab.txt").write_text("\n".join(words) + "\n")
    rc, _, err = _main(_train_args(tiny_data_dir, tmp_path / "run", bert), capsys)
    assert rc == 2
    line = _error_line(err)
    assert str(bert / "vocab.txt") in line and "no [CLS] token" in line
    assert not (tmp_path / "run").exists()


def test_resume_with_another_checkpoint_or_tokenizer_is_refused(run_copy, tmp_path, tiny_data_dir,
                                                                tiny_vocab_bert_dir, capsys) -> None:
    run = run_copy
    before = _snapshot(run)
    other = Path(shutil.copytree(tiny_vocab_bert_dir, tmp_path / "other"))
    rc, _, err = _main(["train", "--data-dir", str(tiny_data_dir), "--out", str(run), "--resume", "--quiet",
                        "--checkpoint", str(other)], capsys)
    assert rc == 2
    line = _error_line(err)
    assert "--resume with a different config (checkpoint:" in line and str(other) in line
    assert _snapshot(run) == before
    # the same checkpoint path, but the run's tokenizer differs from it (vocabulary / casing)
    (run / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
    before = _snapshot(run)
    rc, _, err = _main(["train", "--data-dir", str(tiny_data_dir), "--out", str(run), "--resume", "--quiet"], capsys)
    assert rc == 2
    line = _error_line(err)
    assert "--resume with a different tokenizer: tokenizer_config.json" in line and str(run) in line
    assert _snapshot(run) == before


def test_token_ids_beyond_vocab_size_are_named_at_start(tmp_path, tiny_data_dir, capsys) -> None:
    import bert_jax
    from tests.conftest import save_tiny_bert

    bert = save_tiny_bert(tmp_path / "small", vocab_size=99, max_position_embeddings=128)
    shutil.copy(bert_jax.resolve_checkpoint("embedded") / "vocab.txt", bert / "vocab.txt")  # 30522 words, 99 rows
    rc, _, err = _main(_train_args(tiny_data_dir, tmp_path / "run", bert), capsys)
    assert rc == 2
    line = _error_line(err)
    assert str(bert / "vocab.txt") in line and f"{bert / 'config.json'} has vocab_size 99" in line
    assert "non-finite" not in err and not (tmp_path / "run").exists()


# ----------------------------------------------------------------- 5. same-sized, different data


def test_resume_with_same_sized_different_data_is_refused(run_copy, tmp_path, tiny_data_dir, capsys) -> None:
    data = _copy_data(tiny_data_dir, tmp_path / "data")
    lines = (data / "ids-sst-train.csv").read_text().splitlines()
    cols = lines[5].split("\t")
    cols[2] = "an entirely different sentence"
    lines[5] = "\t".join(cols)
    (data / "ids-sst-train.csv").write_text("\n".join(lines) + "\n")
    before = _snapshot(run_copy)
    rc, _, err = _main(["train", "--data-dir", str(data), "--out", str(run_copy), "--resume", "--quiet"], capsys)
    assert rc == 2
    line = _error_line(err)
    assert "the training data changed since this checkpoint (task(s) sst: same number of examples" in line
    assert str(run_copy / "checkpoints" / "4") in line
    assert _snapshot(run_copy) == before
    position = json.loads((run_copy / "checkpoints/4/position/metadata").read_text())
    assert set(position["train_fingerprint"]) == {"sst", "para", "sts"}


# ---------------------------------------------------------------------- 6. malformed config.json


@pytest.mark.parametrize("edit,key", [
    (lambda c: dict(c, num_attention_heads=0), "num_attention_heads"),
    (lambda c: dict(c, hidden_size=32.0), "hidden_size"),
    (lambda c: dict(c, hidden_dropout_prob="high"), "hidden_dropout_prob"),
    (lambda c: [c], "expected a JSON object"),
], ids=["zero_heads", "float_size", "string_prob", "list"])
def test_malformed_checkpoint_config_is_one_line(edit, key, tmp_path, tiny_data_dir, tiny_vocab_bert_dir, capsys) -> None:
    bert = Path(shutil.copytree(tiny_vocab_bert_dir, tmp_path / "bert"))
    config = json.loads((bert / "config.json").read_text())
    (bert / "config.json").write_text(json.dumps(edit(config)))
    rc, _, err = _main(_train_args(tiny_data_dir, tmp_path / "run", bert), capsys)
    assert rc == 2
    line = _error_line(err)
    assert str(bert / "config.json") in line and key in line
    assert not (tmp_path / "run").exists()


def test_malformed_run_bert_config_is_one_line(run_copy, tiny_data_dir, capsys) -> None:
    config = json.loads((run_copy / "bert_config.json").read_text())
    (run_copy / "bert_config.json").write_text(json.dumps(dict(config, num_attention_heads=0)))
    rc, _, err = _main(["evaluate", str(run_copy), "--data-dir", str(tiny_data_dir)], capsys)
    assert rc == 2
    line = _error_line(err, "evaluate")
    assert str(run_copy) in line and "bert_config.json" in line and "num_attention_heads" in line


# ------------------------------------------------------------------------------ 7. a failed save

# `python -c SAVE_FAIL STEP train ...`: from the save of checkpoint STEP on, every write past 100 kB fails
# with a real OS error (RLIMIT_FSIZE: EFBIG), in TensorStore's writer threads, as on a full disk.
SAVE_FAIL = r"""
import resource, signal, sys
import train.checkpoint as C
_save = C.Checkpointer.save_state
def save_state(self, state, position):
    if int(state.step) == int(sys.argv[1]):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))
    return _save(self, state, position)
C.Checkpointer.save_state = save_state
from scripts.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_failed_save_in_a_real_process_is_one_line(tmp_path, tiny_data_dir, tiny_vocab_bert_dir) -> None:
    run = tmp_path / "run"
    p = subprocess.run([sys.executable, "-c", SAVE_FAIL, "8", *_train_args(tiny_data_dir, run, tiny_vocab_bert_dir, "epochs=2")],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 2, p.stderr[-3000:]
    assert "Event loop is closed" not in p.stderr and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert len(p.stderr.splitlines()) <= 4, p.stderr[-3000:]  # train sizes, dev @ step 4, the error
    line = _error_line(p.stderr)
    assert f"{run / 'checkpoints' / '8'}: cannot save the training state ([Errno 27] File too large; " in line
    assert f"the previous checkpoint ({run / 'checkpoints' / '4'}) is kept" in line and "--resume" in line
    assert sorted(q.name for q in (run / "checkpoints").iterdir() if q.name.isdigit()) == ["4"]
    assert not (run / ".lock").exists()
    # the way out works: once writes succeed again, --resume continues from step 4 and finishes
    assert cli_main(["train", "--data-dir", str(tiny_data_dir), "--out", str(run), "--resume", "--quiet"]) == 0
    assert sorted(q.name for q in (run / "checkpoints").iterdir()) == ["4", "8"]  # the partial save is cleaned up
    assert [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()] == [4, 8]


def test_disk_full_during_a_save_is_one_line(tmp_path, tiny_data_dir, tiny_vocab_bert_dir, capsys, monkeypatch) -> None:
    import orbax.checkpoint as ocp

    save = ocp.CheckpointManager.save

    def full(self, step, *a, **k):
        if Path(str(self.directory)).name == "checkpoints":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return save(self, step, *a, **k)

    monkeypatch.setattr(ocp.CheckpointManager, "save", full)
    run = tmp_path / "run"
    rc, _, err = _main(_train_args(tiny_data_dir, run, tiny_vocab_bert_dir, "--steps", "1"), capsys)
    assert rc == 2
    line = _error_line(err)
    assert f"{run / 'checkpoints' / '1'}: cannot save the training state (OSError: [Errno 28] No space left on device)" in line
    assert "no checkpoint was kept" in line and "--resume" in line


# ------------------------------------------------------------------- 8. labels that look numeric


def test_lookalike_numeric_labels_are_malformed_rows(tmp_path) -> None:
    from train.data import load_task, summarize_skipped

    sst = tmp_path / "sst.csv"
    sst.write_text("\tid\tsentence\tsentiment\n" + "".join(
        f"{k}\tid{k}\ttext {k}\t{lab}\n" for k, lab in enumerate(["4", "0_4", "\u0663", "\uff13", "+3", "2.0", "1e0", " 3 "])))
    d = load_task(None, "sst", "train", path=sst)
    assert d.labels.tolist() == [4, 3, 2, 1, 3]
    assert [b.line for b in d.skipped] == [3, 4, 5]
    assert all("is not a number" in b.reason for b in d.skipped)
    assert summarize_skipped([d]).startswith("sst.csv: 3 malformed rows skipped (line 3: label '0_4'")
    sts = tmp_path / "sts.csv"
    sts.write_text("\tid\tsentence1\tsentence2\tsimilarity\n0\ta\tx\ty\t0_5\n1\tb\tx\ty\t2.5\n2\tc\tx\ty\t\u0665\n")
    d = load_task(None, "sts", "train", path=sts)
    assert d.labels.tolist() == [2.5] and [b.line for b in d.skipped] == [2, 4]


# ------------------------------------------------------------- 9. leaderboard ids and output names


def test_ids_that_would_break_leaderboard_lines_are_skipped(run4, tmp_path, tiny_data_dir, capsys) -> None:
    from train.data import load_task

    path = tmp_path / "mine.csv"
    path.write_text('\tid\tsentence\n0\tok1\tgood film\n1\tbad , id\tgood film\n2\t"multi\nline"\tgood film\n'
                    "3\tok2\tbad film\n4\tcomma,id\tdull\n")
    d = load_task(None, "sst", "test", path=path)
    assert d.ids == ("ok1", "ok2") and [b.line for b in d.skipped] == [3, 4, 7]
    assert "line break" in d.skipped[1].reason and "','" in d.skipped[0].reason
    out = tmp_path / "pred"
    rc, _, err = _main(["predict", str(run4), "--task", "sst", "--input", str(path), "--out", str(out)], capsys)
    assert rc == 0, err
    assert "mine.csv: 3 malformed rows skipped" in err
    assert [p.name for p in out.iterdir()] == ["sst-mine-output.csv"]
    lines = (out / "sst-mine-output.csv").read_text().split("\n")
    assert len(lines) == 4 and lines[-1] == "" and all(ln.count(" , ") == 1 for ln in lines[1:-1])
    from train.predict import leaderboard_lines

    with pytest.raises(ValueError, match="line break"):
        leaderboard_lines("sts", ["a\nb"], __import__("numpy").zeros(1))


def test_predict_input_never_replaces_a_split_prediction(run4, tmp_path, tiny_data_dir, capsys) -> None:
    out = tmp_path / "pred"
    rc, _, err = _main(["predict", str(run4), "--split", "dev", "--task", "sts", "--data-dir", str(tiny_data_dir),
                        "--out", str(out)], capsys)
    assert rc == 0, err
    dev = (out / "sts-dev-output.csv").read_bytes()
    mine = tmp_path / "dev.csv"  # an input file whose name is a split's
    mine.write_text("\n".join((tiny_data_dir / "sts-dev.csv").read_text().splitlines()[:4]) + "\n")
    rc, _, err = _main(["predict", str(run4), "--task", "sts", "--input", str(mine), "--out", str(out)], capsys)
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["sts-dev-input-output.csv", "sts-dev-output.csv"]
    assert (out / "sts-dev-output.csv").read_bytes() == dev


# ----------------------------------------------------------------------------------------- minor


def test_empty_training_file_error_names_the_file(tmp_path, tiny_data_dir, tiny_vocab_bert_dir, capsys) -> None:
    data = _copy_data(tiny_data_dir, tmp_path / "data")
    (data / "quora-train.csv").write_text("\tid\tsentence1\tsentence2\tis_duplicate\n")
    rc, _, err = _main(_train_args(data, tmp_path / "run", tiny_vocab_bert_dir), capsys)
    assert rc == 2
    line = _error_line(err)
    assert str(data / "quora-train.csv") in line and "task 'para'" in line and "nothing after the header row" in line


def test_interrupted_run_prints_strict_json(tmp_path, tiny_data_dir, tiny_vocab_bert_dir, capsys, monkeypatch) -> None:
    import train.trainer as T

    real = T.train

    def interrupted(*a, **k):
        signal.raise_signal(signal.SIGINT)  # arrives before the first step (the CLI's handler is installed)
        return real(*a, **k)

    monkeypatch.setattr(T, "train", interrupted)
    rc, out, err = _main(_train_args(tiny_data_dir, tmp_path / "run", tiny_vocab_bert_dir), capsys)
    assert rc == 128 + signal.SIGINT, err
    line = out.strip().splitlines()[-1]
    assert "Infinity" not in line and "NaN" not in line

    def refuse(c):
        raise AssertionError(f"non-strict JSON constant {c}")

    result = json.loads(line, parse_constant=refuse)
    assert result["stopped"] is True and result["best_overall"] is None and result["step"] == 0


def test_overrides_may_follow_flags(tmp_path, tiny_data_dir, capsys) -> None:
    # before: argparse exited with "unrecognized arguments: bogus_key=1"; now the override reaches the config
    rc, _, err = _main(["train", "lr=1e-5", "--out", str(tmp_path / "run"), "--data-dir", str(tiny_data_dir),
                        "--quiet", "bogus_key=1"], capsys)
    assert rc == 2 and "unknown config key(s): bogus_key" in _error_line(err)
    with pytest.raises(SystemExit):
        cli_main(["train", "--out", str(tmp_path / "run"), "--quiet", "--bogus-flag"])


def test_duplicate_keys_in_an_ensemble_spec_are_refused(run4, tmp_path, tiny_data_dir, capsys) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"members:\n  a: {run4}\n  b: {run4}\nnodes:\n  avg: {{type: average, children: [a, b]}}\n"
                    f"  avg: {{type: average, children: [a]}}\n")
    rc, _, err = _main(["ensemble", str(spec), "--data-dir", str(tiny_data_dir), "--split", "dev"], capsys)
    assert rc == 2
    line = _error_line(err, "ensemble")
    assert str(spec) in line and "duplicate key 'avg' (line 6, first on line 5)" in line
    js = tmp_path / "spec.json"
    js.write_text('{"members": {"a": "x", "a": "y"}}')
    rc, _, err = _main(["ensemble", str(js), "--data-dir", str(tiny_data_dir), "--split", "dev"], capsys)
    assert rc == 2 and "duplicate key 'a'" in _error_line(err, "ensemble")
