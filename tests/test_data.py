"""Tests for train/data.py: loading (real + malformed files), tokenizing, batching, the epoch sampler."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from train.data import (
    example_lengths,
    length_order,
    DEFAULT_BUCKETS,
    BadRow,
    DataError,
    Encoded,
    TaskData,
    bucket_length,
    encode_task,
    epoch_plan,
    eval_batches,
    load_task,
    make_batch,
    resolve_data_dir,
    summarize_skipped,
)


def _real_data_dir() -> Path | None:
    env = os.environ.get("BERT_JAX_DATA")
    for cand in ([Path(env)] if env else []) + [Path(__file__).resolve().parents[1].parent / "shared" / "data"]:
        if (cand / "ids-sst-train.csv").is_file():
            return cand
    return None


REAL = _real_data_dir()
needs_real = pytest.mark.skipif(
    REAL is None, reason="CS224N data not found in ../shared/data or $BERT_JAX_DATA (real-file tests skipped)"
)

# README row counts: (task, split) -> rows in the file.
README_ROWS = {
    ("sst", "train"): 8544,
    ("sst", "dev"): 1101,
    ("sst", "test"): 2210,
    ("cfimdb", "train"): 1707,
    ("cfimdb", "dev"): 245,
    ("cfimdb", "test"): 488,
    ("para", "train"): 14150,
    ("para", "dev"): 4032,
    ("sts", "train"): 6040,
    ("sts", "dev"): 863,
    ("sts", "test"): 1725,
}
# Known malformed rows in this copy: (task, split) -> physical line numbers.
KNOWN_BAD = {("para", "dev"): [509]}


@pytest.fixture(scope="module")
def tokenizer():
    import bert_jax

    return bert_jax.load_tokenizer("embedded")


def _write(path: Path, lines: list[str | bytes]) -> Path:
    data = b"".join((ln if isinstance(ln, bytes) else ln.encode("utf-8")) + b"\n" for ln in lines)
    path.write_bytes(data)
    return path


# ------------------------------------------------------------------------------------ real files


@needs_real
@pytest.mark.parametrize("task,split", sorted(README_ROWS))
def test_real_files_row_counts(task: str, split: str) -> None:
    d = load_task(REAL, task, split)
    bad = KNOWN_BAD.get((task, split), [])
    assert [b.line for b in d.skipped] == bad
    assert len(d) + len(d.skipped) == README_ROWS[(task, split)]
    assert len(d.ids) == len(d.sentences1) == len(d)
    assert all(s and s == s.strip() for s in d.sentences1)
    if task in ("para", "sts"):
        assert d.sentences2 is not None and len(d.sentences2) == len(d)
    else:
        assert d.sentences2 is None
    if split == "test":
        assert d.labels is None
    else:
        assert d.labels is not None and d.labels.shape == (len(d),)
        assert d.labels.dtype == (np.float32 if task in ("para", "sts") else np.int32)
        lo, hi = {"sst": (0, 4), "cfimdb": (0, 1), "para": (0, 1), "sts": (0, 5)}[task]
        assert d.labels.min() >= lo and d.labels.max() <= hi


@needs_real
def test_quora_dev_malformed_row_is_reported() -> None:
    d = load_task(REAL, "para", "dev")
    assert len(d.skipped) == 1
    bad = d.skipped[0]
    assert bad.line == 509 and bad.path.endswith("quora-dev.csv")
    assert "is_duplicate" in bad.reason
    report = summarize_skipped([load_task(REAL, "sst", "dev"), d])
    assert report.startswith("quora-dev.csv: 1 malformed row skipped (line 509:")
    assert "ids-sst-dev.csv" not in report  # files with nothing skipped are not listed
    assert "ad118c967d683c93883bf072d" not in d.ids


@needs_real
def test_sst_test_file_with_two_index_columns_loads_by_header() -> None:
    d = load_task(REAL, "sst", "test")
    assert d.ids[0] == "b7573736a6ddf7be102b7fee0"
    assert d.sentences1[0] == "Effective but too-tepid biopic"
    assert d.labels is None and not d.skipped


@needs_real
def test_real_quora_quoting_is_unescaped() -> None:
    d = load_task(REAL, "para", "train")
    k = d.ids.index("318658e273ac78f3b1e957b8b")
    assert d.sentences1[k].startswith('"Which is correct grammar')  # `"""Which` -> `"Which`


@needs_real
def test_real_missing_file_names_it() -> None:
    with pytest.raises(DataError, match="quora-test-student.csv"):
        load_task(REAL, "para", "test")


@needs_real
def test_real_encode_and_eval_batches(tokenizer) -> None:
    d = load_task(REAL, "sts", "dev")
    enc = encode_task(d, tokenizer, max_len=64)
    assert len(enc.tokens1) == len(enc.tokens2) == len(d) == len(enc.labels)
    assert max(len(t) for t in enc.tokens1 + enc.tokens2) <= 64
    batches = list(eval_batches(enc, 128))
    assert len(batches) == math.ceil(len(d) / 128)
    assert sum(int(b["valid"].sum()) for b in batches) == len(d)
    np.testing.assert_allclose(np.concatenate([b["labels"][b["valid"] > 0] for b in batches]), d.labels)


# ---------------------------------------------------------------------- synthetic malformed files


SST_HEADER = "\tid\tsentence\tsentiment"


def test_malformed_rows_skipped_with_line_numbers(tmp_path: Path) -> None:
    long_text = "word " * 20000  # ~100k characters: kept, truncation is the tokenizer's job
    lines: list[str | bytes] = [
        SST_HEADER,  # 1
        "0\ta\t good one \t3",  # 2 ok
        "1\tb\tmissing label",  # 3 wrong field count
        "2\tc\t   \t2",  # 4 empty sentence
        "3\td\tout of range\t5",  # 5 label out of range
        "4\te\tnot a number\tpositive",  # 6 non-numeric label
        "5\tf\tfractional\t2.5",  # 7 non-integer SST label
        b"6\tg\tbad \xff\xfe bytes\t1",  # 8 invalid utf-8
        '7\th\t"unterminated quote\t1',  # 9 broken quoting (never closed)
        '8\ti\t"closed" then junk\t1',  # 10 broken quoting (junk after the closing quote)
        "9\tj\t" + long_text + "\t4",  # 11 ok, very long
        "",  # 12 empty line
        "10\tk\ttoo\tmany\t1",  # 13 wrong field count
        '11\tl\t"a ""quoted"" word\tand a tab"\t0',  # 14 ok: quoted field with escaped quotes and a tab
        "12\t\tno id\t1",  # 15 empty id
        b"13\tm\tnul \x00 byte\t1",  # 16 stray NUL
        "14\tn\tok again\t0.0",  # 17 ok ("0.0" is an integer value)
    ]
    d = load_task(None, "sst", "train", path=_write(tmp_path / "sst.csv", lines))
    assert d.ids == ("a", "j", "l", "n")
    assert d.sentences1[0] == "good one"
    assert d.sentences1[1] == long_text.strip()
    assert d.sentences1[2] == 'a "quoted" word\tand a tab'
    np.testing.assert_array_equal(d.labels, np.array([3, 4, 0, 0], np.int32))
    got = {b.line: b.reason for b in d.skipped}
    assert sorted(got) == [3, 4, 5, 6, 7, 8, 9, 10, 12, 13, 15, 16]
    assert "field" in got[3] and "empty sentence" in got[4] and "'sentence'" in got[4]
    assert "5" in got[5] and "sentiment" in got[5]
    assert "not a number" in got[6] and "not an integer" in got[7]
    assert "UTF-8" in got[8] and "quot" in got[9] and "quot" in got[10]
    assert "empty line" in got[12] and "'id'" in got[15] and "NUL" in got[16]
    assert all(isinstance(b, BadRow) and b.path.endswith("sst.csv") for b in d.skipped)
    report = summarize_skipped([d])
    assert report.startswith("sst.csv: 12 malformed rows skipped (line 3:") and "and 9 more" in report


def test_multiline_quoted_field_and_unterminated_quote(tmp_path: Path) -> None:
    lines: list[str | bytes] = [
        "\tid\tsentence1\tsentence2\tsimilarity",
        '0\ta\t"first line',  # 2-3: one record whose quoted field spans two lines
        'second line"\tother\t2.5',
        '1\tb\t"never closed\tx\t1.0',  # 4: broken quoting; must not swallow line 5
        "2\tc\tfine\talso fine\t5",  # 5 ok
        "3\td\tfine\talso fine\t5.5",  # 6 out of range
        "4\te\tfine\t\t1",  # 7 empty sentence2
        "5\tf\tfine\tstill fine\t-0.0",  # 8 ok
    ]
    d = load_task(None, "sts", "dev", path=_write(tmp_path / "sts.csv", lines))
    assert d.ids == ("a", "c", "f")
    assert d.sentences1[0] == "first line\nsecond line"
    assert d.labels.dtype == np.float32
    np.testing.assert_allclose(d.labels, [2.5, 5.0, 0.0])
    assert [b.line for b in d.skipped] == [4, 6, 7]
    assert "sentence2" in d.skipped[2].reason


def test_crlf_bom_and_para_labels(tmp_path: Path) -> None:
    raw = "\ufeff\tid\tsentence1\tsentence2\tis_duplicate\r\n0\ta\tq1\tq2\t1.0\r\n1\tb\tq3\tq4\t0.5\r\n"
    (tmp_path / "q.csv").write_bytes(raw.encode("utf-8"))
    d = load_task(None, "para", "dev", path=tmp_path / "q.csv")
    assert d.ids == ("a",) and d.sentences2 == ("q2",) and d.labels.tolist() == [1.0]
    assert d.labels.dtype == np.float32
    assert [b.line for b in d.skipped] == [3]


def test_missing_file_and_missing_column(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="ids-cfimdb-dev.csv"):
        load_task(tmp_path, "cfimdb", "dev")
    p = _write(tmp_path / "nosent.csv", ["\tid\ttext\tsentiment", "0\ta\thello\t1"])
    with pytest.raises(DataError, match=r"nosent\.csv.*'sentence'"):
        load_task(None, "sst", "train", path=p)
    p = _write(tmp_path / "nolabel.csv", ["\tid\tsentence", "0\ta\thello"])
    with pytest.raises(DataError, match=r"nolabel\.csv.*'sentiment'"):
        load_task(None, "sst", "train", path=p)
    # ... but unlabelled input is fine for test / explicit prediction files
    assert load_task(None, "sst", "test", path=p).labels is None
    assert load_task(None, "sst", "dev", path=p).labels is None
    p = _write(tmp_path / "pair.csv", ["\tid\tsentence1\tsimilarity", "0\ta\thello\t1"])
    with pytest.raises(DataError, match=r"pair\.csv.*'sentence2'"):
        load_task(None, "sts", "train", path=p)
    with pytest.raises(DataError, match="unknown task"):
        load_task(tmp_path, "nli", "train")


def test_resolve_data_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dirs = {}
    for name in ("arg", "env", "cwd/data"):
        dirs[name] = tmp_path / name
        dirs[name].mkdir(parents=True)
        (dirs[name] / "ids-sst-dev.csv").write_text(SST_HEADER + "\n")
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setenv("BERT_JAX_DATA", str(dirs["env"]))
    assert resolve_data_dir(dirs["arg"]) == dirs["arg"].resolve()
    assert resolve_data_dir(str(dirs["arg"])) == dirs["arg"].resolve()
    assert resolve_data_dir(None) == dirs["env"].resolve()
    monkeypatch.delenv("BERT_JAX_DATA")
    assert resolve_data_dir(None) == dirs["cwd/data"].resolve()

    with pytest.raises(DataError, match=r"(?s)nowhere.*does not exist.*BERT_JAX_DATA"):
        resolve_data_dir(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("BERT_JAX_DATA", str(empty))
    with pytest.raises(DataError, match=r"(?s)empty.*BERT_JAX_DATA.*none of the expected.*--data-dir"):
        resolve_data_dir(None)
    monkeypatch.delenv("BERT_JAX_DATA")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"(?s)data.*default.*CS224N"):
        resolve_data_dir(None)


# ------------------------------------------------------------------------- property: random rows

_WORD = st.text(alphabet="abcdefgh XYZ.,'", min_size=1, max_size=12).filter(lambda s: s.strip())
_QWORD = st.text(alphabet='ab "\t', min_size=1, max_size=8).filter(lambda s: s.strip())


def _quote(s: str) -> str:
    return '"' + s.replace('"', '""') + '"' if ('"' in s or "\t" in s or s.startswith('"')) else s


@st.composite
def _row(draw, k: int):
    kind = draw(
        st.sampled_from(["good", "good_quoted", "fields", "empty", "label_range", "label_nan", "utf8", "quote"])
    )
    ex = f"id{k}"
    sent = draw(_WORD)
    lab = str(draw(st.integers(0, 4)))
    if kind == "good":
        return True, sent.strip(), f"{k}\t{ex}\t{sent}\t{lab}".encode()
    if kind == "good_quoted":
        q = draw(_QWORD)
        return True, q.strip(), f"{k}\t{ex}\t{_quote(q)}\t{lab}".encode()
    if kind == "fields":
        extra = draw(st.sampled_from(["", f"\t{lab}\t{lab}"]))
        return False, None, f"{k}\t{ex}\t{sent}{extra}".encode()
    if kind == "empty":
        return False, None, f"{k}\t{ex}\t  \t{lab}".encode()
    if kind == "label_range":
        return False, None, f"{k}\t{ex}\t{sent}\t{draw(st.sampled_from(['5', '-1', '1.5', '1e9']))}".encode()
    if kind == "label_nan":
        return False, None, f"{k}\t{ex}\t{sent}\t{draw(st.sampled_from(['x', 'nan', '', 'inf']))}".encode()
    if kind == "utf8":
        return False, None, f"{k}\t{ex}\t{sent}".encode() + b"\xc3\x28\t" + lab.encode()
    return False, None, f'{k}\t{ex}\t"{sent}\t{lab}'.encode()  # quote never closed


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_property_loaded_plus_skipped_is_total(tmp_path: Path, data) -> None:
    n = data.draw(st.integers(0, 25))
    rows = [data.draw(_row(k)) for k in range(n)]
    path = tmp_path / "prop.csv"
    path.write_bytes(b"".join(r[2] + b"\n" for r in [(0, 0, SST_HEADER.encode())] + rows))
    d = load_task(None, "sst", "train", path=path)
    assert len(d) + len(d.skipped) == n
    assert list(d.sentences1) == [r[1] for r in rows if r[0]]
    assert [b.line for b in d.skipped] == [k + 2 for k, r in enumerate(rows) if not r[0]]


# ------------------------------------------------------------------------------ encode / batches


def _taskdata(task: str, s1: list[str], s2: list[str] | None = None, labels=None) -> TaskData:
    return TaskData(
        task=task,
        split="dev",
        path="mem",
        ids=tuple(f"i{k}" for k in range(len(s1))),
        sentences1=tuple(s1),
        sentences2=None if s2 is None else tuple(s2),
        labels=labels,
        skipped=(),
    )


def test_encode_task_real_tokenizer(tokenizer) -> None:
    long = "hello " * 300
    d = _taskdata("sst", ["Hello world", long, "a"], labels=np.array([1, 2, 3], np.int32))
    enc = encode_task(d, tokenizer, max_len=32)
    assert isinstance(enc, Encoded) and enc.has_labels and enc.tokens2 is None
    assert [t.dtype for t in enc.tokens1] == [np.int32] * 3
    assert enc.tokens1[0].tolist() == [tokenizer.cls_token_id, *tokenizer.encode("hello world", add_special_tokens=False), tokenizer.sep_token_id]
    assert len(enc.tokens1[1]) == 32 and enc.tokens1[1][-1] == tokenizer.sep_token_id
    pd = _taskdata("para", ["What is it?", "b"], ["What's that?", "c d e"], labels=None)
    penc = encode_task(pd, tokenizer)
    assert not penc.has_labels and penc.labels.dtype == np.float32 and penc.labels.tolist() == [0.0, 0.0]
    assert penc.tokens2 is not None and all(t[0] == tokenizer.cls_token_id for t in penc.tokens2)
    assert encode_task(_taskdata("cfimdb", ["x"]), tokenizer).labels.dtype == np.int32


def test_encode_task_cross_pairs_as_the_tokenizer_pairs_them(tokenizer) -> None:
    """cross=True: one [CLS] a [SEP] b [SEP] sequence with token types, as transformers encodes a text pair
    (truncation longest-first), batched like a single sentence plus token_type_ids."""
    a, b = ["What is it?", "b " * 40], ["What's that?", "c d e"]
    penc = encode_task(_taskdata("para", a, b, labels=np.array([1.0, 0.0], np.float32)), tokenizer, max_len=24, cross=True)
    assert penc.tokens2 is None and penc.types1 is not None
    for i in range(2):
        want = tokenizer(a[i], b[i], truncation="longest_first", max_length=24)
        assert penc.tokens1[i].tolist() == want["input_ids"] and penc.types1[i].tolist() == want["token_type_ids"]
    assert len(penc.tokens1[1]) == 24 and penc.types1[0].tolist().count(1) == len(tokenizer.tokenize("What's that?")) + 1
    batch = make_batch(penc, np.arange(2), 3, (16, 32))
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels", "valid"}
    assert batch["token_type_ids"].shape == (3, 32) and batch["labels"].dtype == np.float32
    assert batch["token_type_ids"][0, : len(penc.types1[0])].tolist() == penc.types1[0].tolist()
    assert batch["token_type_ids"][2].sum() == 0  # the padding row
    with pytest.raises(ValueError, match="only pair tasks"):
        encode_task(_taskdata("sst", ["x"]), tokenizer, cross=True)


def _fake_enc(task: str, lens1: list[int], lens2: list[int] | None = None) -> Encoded:
    toks = lambda lens: tuple(np.arange(1, n + 1, dtype=np.int32) + 100 for n in lens)  # noqa: E731
    pair = lens2 is not None
    labels = (np.arange(len(lens1)) % 2).astype(np.float32 if pair else np.int32)
    return Encoded(task, tuple(map(str, range(len(lens1)))), toks(lens1), toks(lens2) if pair else None, labels, True)


def test_bucket_length() -> None:
    assert [bucket_length(n, DEFAULT_BUCKETS) for n in (0, 1, 16, 17, 33, 64, 65, 128, 500)] == [
        16, 16, 16, 32, 64, 64, 128, 128, 128,
    ]
    assert bucket_length(9, (8, 4, 12)) == 12


def test_make_batch_single() -> None:
    enc = _fake_enc("sst", [5, 20, 3, 7])
    b = make_batch(enc, np.array([0, 2, 3]), 4, DEFAULT_BUCKETS)
    assert set(b) == {"input_ids", "attention_mask", "labels", "valid"}
    assert b["input_ids"].shape == b["attention_mask"].shape == (4, 16)
    assert b["input_ids"].dtype == b["attention_mask"].dtype == np.int32
    assert b["labels"].dtype == np.int32 and b["valid"].dtype == np.float32
    assert b["valid"].tolist() == [1, 1, 1, 0]
    assert b["attention_mask"].sum(1).tolist() == [5, 3, 7, 0]
    assert b["input_ids"][1, :4].tolist() == [101, 102, 103, 0]
    assert (b["input_ids"][3] == 0).all() and b["labels"].tolist() == [0, 0, 1, 0]
    assert make_batch(enc, np.array([1, 0]), 2, DEFAULT_BUCKETS)["input_ids"].shape == (2, 32)
    # longer than the largest bucket: cut, keeping the final token
    enc_long = _fake_enc("sst", [40])
    bl = make_batch(enc_long, np.array([0]), 1, (16, 32))
    assert bl["input_ids"].shape == (1, 32) and bl["input_ids"][0, -1] == 140
    with pytest.raises(ValueError):
        make_batch(enc, np.arange(4), 3, DEFAULT_BUCKETS)


def test_make_batch_pair_uses_longest_of_both() -> None:
    enc = _fake_enc("sts", [5, 6, 7], [30, 4, 2])
    b = make_batch(enc, np.array([1, 2]), 3, DEFAULT_BUCKETS)
    assert set(b) == {"input_ids_1", "attention_mask_1", "input_ids_2", "attention_mask_2", "labels", "valid"}
    for k in ("input_ids_1", "attention_mask_1", "input_ids_2", "attention_mask_2"):
        assert b[k].shape == (3, 16) and b[k].dtype == np.int32
    assert b["attention_mask_1"].sum(1).tolist() == [6, 7, 0]
    assert b["attention_mask_2"].sum(1).tolist() == [4, 2, 0]
    assert b["labels"].dtype == np.float32 and b["valid"].tolist() == [1, 1, 0]
    assert make_batch(enc, np.array([0]), 3, DEFAULT_BUCKETS)["input_ids_1"].shape == (3, 32)


def test_step_batches_aligned_pads_every_task_to_the_longest_bucket() -> None:
    from train.data import step_batches

    encs = {"sst": _fake_enc("sst", [5, 20, 3, 7]), "sts": _fake_enc("sts", [5, 6, 7], [40, 4, 2])}
    index = {"sst": np.array([0, 2]), "sts": np.array([1, 2])}
    free = step_batches(encs, index, 2, DEFAULT_BUCKETS)
    assert free["sst"]["input_ids"].shape == (2, 16) and free["sts"]["input_ids_1"].shape == (2, 16)
    index["sts"] = np.array([0, 1])  # sentence 2 of example 0 has 40 tokens: bucket 64
    free = step_batches(encs, index, 2, DEFAULT_BUCKETS)
    aligned = step_batches(encs, index, 2, DEFAULT_BUCKETS, align=True)
    assert free["sst"]["input_ids"].shape == (2, 16) and free["sts"]["input_ids_2"].shape == (2, 64)
    assert {k: v.shape for k, v in aligned["sst"].items() if k.startswith(("input", "attention"))} == {
        "input_ids": (2, 64), "attention_mask": (2, 64)}
    for t in ("sst", "sts"):  # the same rows, only more padding
        for k, v in free[t].items():
            np.testing.assert_array_equal(aligned[t][k][:, : v.shape[-1]] if v.ndim == 2 else aligned[t][k], v)
            if v.ndim == 2:
                assert not aligned[t][k][:, v.shape[-1]:].any()
    assert aligned["sst"]["attention_mask"].sum(1).tolist() == [5, 3]


def test_eval_batches_in_order() -> None:
    enc = _fake_enc("sst", list(range(2, 12)))
    batches = list(eval_batches(enc, 4))
    assert len(batches) == 3
    assert [b["valid"].tolist() for b in batches][-1] == [1, 1, 0, 0]
    lens = np.concatenate([b["attention_mask"].sum(1)[b["valid"] > 0] for b in batches])
    assert lens.tolist() == list(range(2, 12))
    assert all(b["input_ids"].shape[0] == 4 for b in batches)


# -------------------------------------------------------------------------------------- sampler


SIZES = {"sst": 50, "para": 203, "sts": 17}


def test_epoch_plan_deterministic_and_epoch_dependent() -> None:
    a = epoch_plan(SIZES, 8, seed=3, epoch=0)
    b = epoch_plan(dict(reversed(list(SIZES.items()))), 8, seed=3, epoch=0)
    c = epoch_plan(SIZES, 8, seed=3, epoch=1)
    s = epoch_plan(SIZES, 8, seed=4, epoch=0)
    assert set(a) == set(SIZES)
    for t in SIZES:
        np.testing.assert_array_equal(a[t], b[t])  # independent of dict order
        assert not np.array_equal(a[t], c[t]) and not np.array_equal(a[t], s[t])
    # a task's plan does not depend on which other tasks are trained
    np.testing.assert_array_equal(epoch_plan({"sst": 50, "para": 203}, 8, 3, 0)["sst"], a["sst"])


def test_epoch_plan_step_counts() -> None:
    assert {t: v.shape for t, v in epoch_plan(SIZES, 8, 0, 0, "max").items()} == {t: (26, 8) for t in SIZES}
    assert {t: v.shape for t, v in epoch_plan(SIZES, 8, 0, 0, "min").items()} == {t: (3, 8) for t in SIZES}
    assert {t: v.shape for t, v in epoch_plan(SIZES, 8, 0, 0, 5).items()} == {t: (5, 8) for t in SIZES}
    with pytest.raises(ValueError):
        epoch_plan(SIZES, 8, 0, 0, "most")
    with pytest.raises(ValueError):
        epoch_plan({"sst": 0}, 8, 0, 0)


def test_epoch_plan_per_task_batch_sizes() -> None:
    """A task -> batch-size mapping: each task's rows are its own batch size; "max"/"min" count each task's
    batches with its own size (sst 50/32 -> 2, para 203/8 -> 26, sts 97/16 -> 7), and a task's plan is the
    same sequence of examples as with one shared size (only cut differently)."""
    sizes = {"sst": 50, "para": 203, "sts": 97}
    bs = {"sst": 32, "para": 8, "sts": 16}
    plan = epoch_plan(sizes, bs, seed=0, epoch=0, policy="max")
    assert {t: v.shape for t, v in plan.items()} == {"sst": (26, 32), "para": (26, 8), "sts": (26, 16)}
    assert epoch_plan(sizes, bs, 0, 0, "min")["sts"].shape == (2, 16)
    shared = epoch_plan(sizes, 8, seed=0, epoch=0, policy=4 * 26)["sst"].reshape(-1)
    np.testing.assert_array_equal(plan["sst"].reshape(-1), shared[: 26 * 32])
    with pytest.raises(ValueError, match="batch size of 'sts'"):
        epoch_plan(sizes, {"sst": 4, "para": 4, "sts": 0}, 0, 0)


def test_epoch_plan_cycles_are_permutations() -> None:
    plan = epoch_plan(SIZES, 8, seed=1, epoch=2)
    for t, n in SIZES.items():
        flat = plan[t].reshape(-1)
        assert flat.dtype.kind == "i" and flat.min() >= 0 and flat.max() < n
        full = len(flat) // n
        for c in range(full):
            assert sorted(flat[c * n : (c + 1) * n].tolist()) == list(range(n))
        tail = flat[full * n :]
        assert len(set(tail.tolist())) == len(tail)  # the partial last cycle has no repeats
        if t != "para":
            assert not np.array_equal(flat[:n], flat[n : 2 * n])  # reshuffled each cycle


def test_csv_writer_roundtrip(tmp_path: Path) -> None:
    """Files written by Python's csv module (tab dialect, as pandas/upstream do) parse back exactly."""
    import csv

    sents = ['plain', '"starts quoted" then text', 'mid "quote" here', 'tab\tinside', 'new\nline inside', "'single'"]
    path = tmp_path / "rt.csv"
    with open(path, "w", newline="", encoding="utf-8") as fp:
        w = csv.writer(fp, delimiter="\t", lineterminator="\n")
        w.writerow(["", "id", "sentence1", "sentence2", "is_duplicate"])
        for k, s in enumerate(sents):
            w.writerow([k, f"i{k}", s, s[::-1], float(k % 2)])
    d = load_task(None, "para", "train", path=path)
    assert not d.skipped
    assert list(d.sentences1) == sents and list(d.sentences2) == [s[::-1] for s in sents]
    assert d.labels.tolist() == [float(k % 2) for k in range(len(sents))]


def test_length_grouping_keeps_each_window_and_sorts_batches() -> None:
    """length_window W: every window of W steps trains the same examples as the plain plan, each batch's
    lengths are a contiguous run of the window's sorted lengths, and the plan stays deterministic."""
    sizes = {"sst": 50, "para": 37}
    rng = np.random.default_rng(0)
    lengths = {t: rng.integers(3, 100, n) for t, n in sizes.items()}
    plain = epoch_plan(sizes, 4, 7, 2, 10)
    grouped = epoch_plan(sizes, 4, 7, 2, 10, lengths=lengths, length_window=3)
    again = epoch_plan(sizes, 4, 7, 2, 10, lengths=lengths, length_window=3)
    for t in sizes:
        assert np.array_equal(grouped[t], again[t])
        for start in range(0, 10, 3):
            a, b = plain[t][start : start + 3], grouped[t][start : start + 3]
            assert sorted(a.reshape(-1).tolist()) == sorted(b.reshape(-1).tolist())
            window_sorted = np.sort(lengths[t][a.reshape(-1)])
            runs = {tuple(window_sorted[k : k + 4]) for k in range(0, len(window_sorted), 4)}
            assert {tuple(np.sort(lengths[t][row])) for row in b} == runs
        spread = lambda p: np.mean([np.ptp(lengths[t][row]) for row in p])  # noqa: E731
        assert spread(grouped[t]) < 0.6 * spread(plain[t])
    with pytest.raises(ValueError, match="lengths"):
        epoch_plan(sizes, 4, 7, 2, 10, length_window=3)


def test_eval_batches_in_length_order_and_unsorted_scores() -> None:
    enc = _fake_enc("sst", [9, 2, 30, 5, 17])
    order = length_order(enc)
    assert order.tolist() == [1, 3, 0, 4, 2]
    batches = list(eval_batches(enc, 2, (4, 8, 16, 32), order))
    assert [b["input_ids"].shape[1] for b in batches] == [8, 32, 32]  # (2, 5) | (9, 17) | (30,)
    assert example_lengths(_fake_enc("para", [3, 9], [7, 2])).tolist() == [7, 9]


@pytest.mark.parametrize("align", [False, True])
def test_schedule_shape_examples_are_the_shapes_its_steps_give(align: bool) -> None:
    """`Schedule.shape_examples(start, stop)`: one batch per distinct (task, shape) of the batches that
    `Schedule.batches(start, stop)` builds (checked by building every step), in order of first use, across epochs
    and from a mid-epoch start; each example is one of those steps' batches."""
    from train.data import Schedule

    rng = np.random.default_rng(3)
    encs = {"sst": _fake_enc("sst", rng.integers(2, 70, 23).tolist()),
            "sts": _fake_enc("sts", rng.integers(2, 40, 11).tolist(), rng.integers(2, 140, 11).tolist())}
    sched = Schedule(encs, {t: np.arange(len(e.tokens1)) for t, e in encs.items()}, {"sst": 4, "sts": 2}, seed=5,
                     buckets=(16, 32, 64, 128), align=align)
    start, stop = 3, 3 * sched.steps_per_epoch + 2
    want: dict[str, dict[tuple, dict]] = {t: {} for t in encs}
    for _, batches in sched.batches(start, stop):
        for t, b in batches.items():
            want[t].setdefault(tuple((k, v.shape) for k, v in sorted(b.items())), b)
    got = sched.shape_examples(start, stop)
    for t in encs:
        assert [tuple((k, v.shape) for k, v in sorted(b.items())) for b in got[t]] == list(want[t])
        for b, w in zip(got[t], want[t].values()):
            assert {k: v.dtype for k, v in b.items()} == {k: v.dtype for k, v in w.items()}
    assert len(got["sst"]) >= 2 and len(got["sts"]) >= 2
