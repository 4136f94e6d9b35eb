"""Data for the multitask minBERT: loading, tokenizing, bucketed batching and the round-robin sampler.

Files are the tab-separated CS224N "multitask minBERT" default-project files (``ids-sst-*.csv``,
``ids-cfimdb-*.csv``, ``quora-*.csv``, ``sts-*.csv``). Every file has a header row; columns are found
by header *name* (``id``, ``sentence`` / ``sentence1`` + ``sentence2``, and the label column
``sentiment`` / ``is_duplicate`` / ``similarity``), never by position, so unnamed leading index
columns (one in most files, two in this copy of ``ids-sst-test-student.csv``) are ignored.

Parsing is strict per record and tolerant per file: a malformed record (wrong field count, empty
id or sentence, non-numeric or out-of-range label, invalid UTF-8 or NUL bytes, broken quoting) is
skipped and recorded as a :class:`BadRow` with its 1-based physical line number; it never crashes
the load and is never dropped silently (see :func:`summarize_skipped`). Quoting follows Python's
``csv`` module defaults (``"`` quotes a field that *starts* with it, ``""`` inside is a literal
quote), so well-formed files parse exactly as the upstream ``csv.DictReader`` loader parses them.
A quoted field may span physical lines; a line that on its own parses into a complete record always
starts a new record, so one unterminated quote cannot swallow the good rows after it.

Epoch definition (:func:`epoch_plan`): one epoch is a fixed number of *steps*; every step trains
one batch of **every** task (round robin). With ``policy="max"`` an epoch has
``ceil(max_t size_t / batch_size)`` steps, so the largest task is seen once and smaller tasks are
cycled, each cycle a fresh shuffle; ``policy="min"`` gives ``ceil(min_t size_t / batch_size)``
steps (larger tasks see a random part of their data per epoch); an ``int`` policy is that many
steps. Within a task, examples are drawn from a stream of permutations: cycle ``c`` of task ``t``
in epoch ``e`` is ``np.random.default_rng((seed, e, task_index(t), c)).permutation(size_t)``, and
a batch that crosses a cycle boundary is completed from the next cycle. The plan is a pure
function of ``(sizes, batch_size, seed, epoch, policy)``, so resuming at ``(epoch, step)`` replays
``plan[task][step:]`` exactly.
"""

from __future__ import annotations

import math
import os
import re
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from train.tasks import TASKS

SPLITS: tuple[str, ...] = ("train", "dev", "test")
DEFAULT_BUCKETS: tuple[int, ...] = (16, 32, 64, 128)
ENV_VAR = "BERT_JAX_DATA"

# A label is a plain ASCII decimal number (optional sign, fraction, exponent): `float()` alone would also take
# `0_4` (-> 4.0), Arabic-Indic or full-width digits, `nan` and `inf`.
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?", re.ASCII)
# A quoted field may continue over at most this many further physical lines.
_MAX_CONTINUATION_LINES = 32
_GET_DATA_HINT = (
    "Get the CS224N multitask minBERT default-project data files (ids-sst-*.csv, ids-cfimdb-*.csv, "
    "quora-*.csv, sts-*.csv) and pass --data-dir DIR or set BERT_JAX_DATA=DIR."
)


class DataError(ValueError):
    """A user-facing data problem (missing directory, file or column); the message names file and column."""


@dataclass(frozen=True)
class BadRow:
    """A skipped malformed record: ``line`` is its 1-based physical line number in ``path`` (header = line 1)."""

    path: str
    line: int
    reason: str


@dataclass(frozen=True, eq=False)
class TaskData:
    """One split of one task, N examples (N = ``len(self)``).

    ``ids``, ``sentences1``: N strings (whitespace-stripped, otherwise raw; lower-casing is the
    tokenizer's job). ``sentences2``: N strings for pair tasks, else None. ``labels``: ``[N]`` int32
    (sst 0..4, cfimdb 0/1) or float32 (para 0/1, sts 0..5), None when the file has no label column.
    ``skipped``: the malformed records that were left out.
    """

    task: str
    split: str
    path: str
    ids: tuple[str, ...]
    sentences1: tuple[str, ...]
    sentences2: tuple[str, ...] | None
    labels: np.ndarray | None
    skipped: tuple[BadRow, ...]

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True, eq=False)
class Encoded:
    """A tokenized :class:`TaskData` of N examples, ragged.

    ``tokens1`` / ``tokens2``: N int32 arrays of token ids ``[n_i]`` including ``[CLS]`` and
    ``[SEP]``, ``n_i <= max_len`` (``tokens2`` None for single-sentence tasks). ``labels``: ``[N]``,
    int32 (sst, cfimdb) or float32 (para, sts); zeros of that dtype when ``has_labels`` is False.
    A cross-encoded pair task (``encode_task(..., cross=True)``) has one sequence per example,
    ``tokens1 = [CLS] a [SEP] b [SEP]`` with its token types ``types1`` (0 over ``[CLS] a [SEP]``, 1 over
    ``b [SEP]``), and ``tokens2`` None: it batches like a single-sentence task plus ``token_type_ids``.
    """

    task: str
    ids: tuple[str, ...]
    tokens1: tuple[np.ndarray, ...]
    tokens2: tuple[np.ndarray, ...] | None
    labels: np.ndarray
    has_labels: bool
    types1: tuple[np.ndarray, ...] | None = None  # token type ids [n_i] of a cross-encoded pair (0 = a, 1 = b)

    def __len__(self) -> int:
        return len(self.ids)


# --------------------------------------------------------------------------------------------- paths


def _check_task_split(task: str, split: str) -> None:
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}; expected one of {sorted(TASKS)}")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {list(SPLITS)}")


def task_filename(task: str, split: str) -> str:
    """File name of ``task``/``split``; split "test" maps to the ``-test-student`` files."""
    _check_task_split(task, split)
    return TASKS[task].file.format(split="test-student" if split == "test" else split)


def _expected_filenames() -> list[str]:
    return [task_filename(t, s) for t in TASKS for s in SPLITS]


def resolve_data_dir(arg: str | os.PathLike | None) -> Path:
    """The data directory: ``arg`` (``--data-dir``), else ``$BERT_JAX_DATA``, else ``./data``.

    Raises :class:`DataError` when the chosen directory does not exist or holds none of the
    expected csv files; the message says where it looked and how to get the data. Individual
    missing files are reported later by :func:`load_task`.
    """
    if arg is not None and str(arg) != "":
        path, source = Path(arg), "from --data-dir"
    elif os.environ.get(ENV_VAR):
        path, source = Path(os.environ[ENV_VAR]), f"from ${ENV_VAR}"
    else:
        path, source = Path("data"), f"the default ./data (no --data-dir given, ${ENV_VAR} not set)"
    path = path.expanduser().resolve()
    if not path.is_dir():
        raise DataError(f"data directory {path} ({source}) does not exist. {_GET_DATA_HINT}")
    expected = _expected_filenames()
    if not any((path / name).is_file() for name in expected):
        raise DataError(
            f"data directory {path} ({source}) contains none of the expected csv files "
            f"({', '.join(expected[:3])}, ...). {_GET_DATA_HINT}"
        )
    return path


# ------------------------------------------------------------------------------------------- parsing


def _split_record(text: str) -> tuple[str, list[str] | str | None]:
    """Split one tab-separated record with csv-style quoting.

    Returns ``("ok", fields)``, ``("open", None)`` when a quoted field is still open at the end of
    ``text`` (it may continue on the next physical line), or ``("bad", reason)``.
    """
    fields: list[str] = []
    i, n = 0, len(text)
    while True:
        if i < n and text[i] == '"':
            parts: list[str] = []
            j = i + 1
            while True:
                k = text.find('"', j)
                if k < 0:
                    return "open", None
                parts.append(text[j:k])
                if k + 1 < n and text[k + 1] == '"':
                    parts.append('"')
                    j = k + 2
                    continue
                j = k + 1
                break
            fields.append("".join(parts))
            if j == n:
                return "ok", fields
            if text[j] != "\t":
                return "bad", (
                    f"broken quoting: unexpected {text[j]!r} after the closing quote of field {len(fields)}"
                )
            i = j + 1
        else:
            k = text.find("\t", i)
            if k < 0:
                fields.append(text[i:])
                return "ok", fields
            fields.append(text[i:k])
            i = k + 1


def _decode_lines(raw: bytes) -> list[tuple[str | None, str | None]]:
    """Physical lines of ``raw`` as ``(text, error)`` pairs; a final empty line after the last newline is dropped."""
    chunks = raw.split(b"\n")
    if chunks and chunks[-1] == b"":
        chunks.pop()
    out: list[tuple[str | None, str | None]] = []
    for chunk in chunks:
        if chunk.endswith(b"\r"):
            chunk = chunk[:-1]
        try:
            text = chunk.decode("utf-8")
        except UnicodeDecodeError as err:
            bad = chunk[err.start : err.start + 4]
            out.append((None, f"invalid UTF-8 bytes {bad!r} at byte {err.start} of the line"))
            continue
        if "\x00" in text:
            out.append((None, f"stray NUL byte at character {text.index(chr(0))} of the line"))
            continue
        out.append((text.replace("\r", " "), None))
    if out and out[0][0] is not None and out[0][0].startswith("\ufeff"):
        out[0] = (out[0][0][1:], None)  # UTF-8 byte-order mark
    return out


def _records(
    lines: list[tuple[str | None, str | None]], n_fields: int
) -> Iterator[tuple[int, list[str] | None, str | None]]:
    """Records after the header: ``(line_no, fields, None)`` or ``(line_no, None, reason)``.

    A record with a quoted field open at the end of its first line is joined with the following
    lines, but never with a line that is a complete record on its own.
    """

    def standalone_ok(idx: int) -> bool:
        text, err = lines[idx]
        if err is not None or text is None:
            return False
        status, fields = _split_record(text)
        return status == "ok" and len(fields) == n_fields  # type: ignore[arg-type]

    i = 1
    while i < len(lines):
        line_no = i + 1
        text, err = lines[i]
        if err is not None or text is None:
            yield line_no, None, err
            i += 1
            continue
        if text.strip() == "":
            yield line_no, None, "empty line"
            i += 1
            continue
        status, result = _split_record(text)
        consumed = 1
        if status == "open":
            joined = text
            for j in range(i + 1, min(len(lines), i + 1 + _MAX_CONTINUATION_LINES)):
                nxt, nerr = lines[j]
                if nerr is not None or nxt is None or standalone_ok(j):
                    break
                joined = joined + "\n" + nxt
                status, result = _split_record(joined)
                if status != "open":
                    consumed = j - i + 1
                    break
            if status != "ok":
                status, result = "bad", "broken quoting: a quoted field is never closed"
                consumed = 1
        if status == "bad":
            yield line_no, None, str(result)
        else:
            fields = result
            assert isinstance(fields, list)
            if len(fields) != n_fields:
                hint = " (check tabs and quotes)" if '"' in text else ""
                yield line_no, None, f"expected {n_fields} tab-separated fields, found {len(fields)}{hint}"
            else:
                yield line_no, fields, None
        i += consumed


def _parse_label(raw: str, task: str) -> tuple[float | None, str | None]:
    spec = TASKS[task]
    column, (lo, hi), integral = spec.label_column, spec.label_range, spec.integral
    s = raw.strip()
    if s == "":
        return None, f"label column {column!r} is empty"
    if not _DECIMAL.fullmatch(s):
        return None, f"label {s[:40]!r} in column {column!r} is not a number (plain ASCII decimal digits)"
    value = float(s)
    if not math.isfinite(value) or not lo <= value <= hi or (integral and value != int(value)):
        kind = "an integer" if integral else "a number"
        return None, f"label {s[:40]!r} in column {column!r} is not {kind} in {lo:g}..{hi:g}"
    return value, None


def _find_column(header: list[str], name: str, path: str) -> int | None:
    hits = [k for k, h in enumerate(header) if h.strip() == name]
    if len(hits) > 1:
        raise DataError(f"{path}: column {name!r} appears {len(hits)} times in the header")
    return hits[0] if hits else None


def _id_problem(ex_id: str) -> str | None:
    """Why ``ex_id`` cannot be written into a leaderboard line (``id , value``), else None."""
    if "\n" in ex_id or "\r" in ex_id:
        return "id contains a line break (it would split its leaderboard line)"
    if "," in ex_id:
        return "id contains ',' (leaderboard lines are 'id , value': it would be ambiguous)"
    return None


def load_task(
    data_dir: str | os.PathLike | None, task: str, split: str, path: str | os.PathLike | None = None,
    read_labels: bool = True,
) -> TaskData:
    """Load one split of one task; malformed records are skipped and recorded, never fatal.

    ``path`` overrides the file (e.g. ``predict --task T --input FILE``); otherwise the file is
    ``data_dir / task_filename(task, split)`` (``data_dir`` None -> :func:`resolve_data_dir`).
    The label column is required for split "train", and for split "dev" when no ``path`` is
    given; elsewhere it is optional (``labels`` None when absent). ``read_labels=False`` (``predict``,
    which needs no label) ignores the label column: no row is skipped for its label, ``labels`` is None.
    On the dev and test splits, whose ids are written into leaderboard files as ``id , value`` lines,
    an id holding a line break or a comma is a malformed row (skipped and counted, like the others):
    refused at load time rather than escaped, since the starter's format has no escaping.
    Raises :class:`DataError` for a missing/empty file or a missing required column (the message
    names file and column).
    """
    _check_task_split(task, split)
    if path is None:
        base = resolve_data_dir(None) if data_dir is None else Path(data_dir)
        file = base / task_filename(task, split)
    else:
        file = Path(path)
    spath = str(file)
    if not file.is_file():
        raise DataError(
            f"{file.name}: file not found (looked for {file}). "
            + (_GET_DATA_HINT if path is None else "Check the --input path.")
        )
    lines = _decode_lines(file.read_bytes())
    if not lines:
        raise DataError(f"{spath}: file is empty (expected a header row)")
    header_text, header_err = lines[0]
    if header_err is not None or header_text is None:
        raise DataError(f"{spath}: cannot read the header row: {header_err}")
    status, header = _split_record(header_text)
    if status != "ok":
        raise DataError(f"{spath}: cannot parse the header row (broken quoting)")
    assert isinstance(header, list)

    pair = TASKS[task].pair
    text_cols = ("sentence1", "sentence2") if pair else ("sentence",)
    label_col = TASKS[task].label_column
    cols: dict[str, int] = {}
    for name in ("id", *text_cols):
        k = _find_column(header, name, spath)
        if k is None:
            raise DataError(f"{spath}: required column {name!r} not found in the header (columns: {header})")
        cols[name] = k
    label_k = _find_column(header, label_col, spath) if read_labels else None
    if read_labels and label_k is None and (split == "train" or (split == "dev" and path is None)):
        raise DataError(
            f"{spath}: required label column {label_col!r} not found in the header (columns: {header})"
        )

    ids: list[str] = []
    s1: list[str] = []
    s2: list[str] = []
    labels: list[float] = []
    skipped: list[BadRow] = []
    for line_no, fields, reason in _records(lines, len(header)):
        if fields is None:
            skipped.append(BadRow(spath, line_no, reason or "malformed row"))
            continue
        ex_id = fields[cols["id"]].strip()
        texts = [fields[cols[c]].strip() for c in text_cols]
        reason = None
        if ex_id == "":
            reason = "empty 'id'"
        elif split != "train" and _id_problem(ex_id):
            reason = _id_problem(ex_id)
        else:
            for c, t in zip(text_cols, texts):
                if t == "":
                    reason = f"empty sentence in column {c!r}"
                    break
        value = None
        if reason is None and label_k is not None:
            value, reason = _parse_label(fields[label_k], task)
            if reason is not None and '"' in lines[line_no - 1][0]:  # type: ignore[operator]
                reason += " (a quoted field may have swallowed it)"
        if reason is not None:
            skipped.append(BadRow(spath, line_no, reason))
            continue
        ids.append(ex_id)
        s1.append(texts[0])
        if pair:
            s2.append(texts[1])
        if value is not None:
            labels.append(value)

    label_arr = None if label_k is None else np.asarray(labels, dtype=TASKS[task].label_dtype)
    return TaskData(
        task=task,
        split=split,
        path=spath,
        ids=tuple(ids),
        sentences1=tuple(s1),
        sentences2=tuple(s2) if pair else None,
        labels=label_arr,
        skipped=tuple(skipped),
    )


def summarize_skipped(datas: Iterable[TaskData], max_examples: int = 3) -> str:
    """One line per file with skipped rows, e.g.
    ``quora-dev.csv: 1 malformed row skipped (line 509: label column 'is_duplicate' is empty ...)``.

    Returns "" when nothing was skipped.
    """
    out = []
    for d in datas:
        if not d.skipped:
            continue
        n = len(d.skipped)
        shown = "; ".join(f"line {b.line}: {b.reason}" for b in d.skipped[:max_examples])
        more = f"; ... and {n - max_examples} more" if n > max_examples else ""
        out.append(f"{Path(d.path).name}: {n} malformed row{'s' if n != 1 else ''} skipped ({shown}{more})")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------- tokenizing


def _tokenize(tokenizer: Any, sentences: Sequence[str], max_len: int, chunk: int = 8192) -> tuple[np.ndarray, ...]:
    out: list[np.ndarray] = []
    for start in range(0, len(sentences), chunk):
        enc = tokenizer(
            list(sentences[start : start + chunk]),
            add_special_tokens=True,
            truncation=True,
            max_length=max_len,
            padding=False,
            return_attention_mask=False,
            return_token_type_ids=False,
        )
        out.extend(np.asarray(ids, dtype=np.int32) for ids in enc["input_ids"])
    return tuple(out)


def _tokenize_pairs(tokenizer: Any, a: Sequence[str], b: Sequence[str], max_len: int,
                    chunk: int = 8192) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
    """``[CLS] a [SEP] b [SEP]`` token ids and token types, truncated to ``max_len`` (longest side first)."""
    ids: list[np.ndarray] = []
    types: list[np.ndarray] = []
    for start in range(0, len(a), chunk):
        enc = tokenizer(list(a[start : start + chunk]), list(b[start : start + chunk]), add_special_tokens=True,
                        truncation="longest_first", max_length=max_len, padding=False,
                        return_attention_mask=False, return_token_type_ids=True)
        ids.extend(np.asarray(x, dtype=np.int32) for x in enc["input_ids"])
        types.extend(np.asarray(x, dtype=np.int32) for x in enc["token_type_ids"])
    return tuple(ids), tuple(types)


def encode_task(data: TaskData, tokenizer: Any, max_len: int = 128, cross: bool = False) -> Encoded:
    """Tokenize every sentence once, truncated to ``max_len`` tokens: pairs Siamese style (each sentence
    alone), or with ``cross=True`` as one ``[CLS] a [SEP] b [SEP]`` sequence (a cross-encoder's input).

    Returns ragged token arrays ``[n_i]`` int32 (with ``[CLS]``/``[SEP]``, ``n_i <= max_len``).
    """
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2 (room for [CLS] and [SEP]), got {max_len}")
    dtype = TASKS[data.task].label_dtype
    has_labels = data.labels is not None
    labels = np.asarray(data.labels, dtype=dtype) if has_labels else np.zeros(len(data), dtype=dtype)
    if cross:
        if data.sentences2 is None:
            raise ValueError(f"task {data.task!r} has one sentence per example; only pair tasks can be cross-encoded")
        if max_len < 3:
            raise ValueError(f"max_len must be >= 3 for a cross-encoded pair, got {max_len}")
        tokens, types = _tokenize_pairs(tokenizer, data.sentences1, data.sentences2, max_len)
        return Encoded(task=data.task, ids=data.ids, tokens1=tokens, tokens2=None, labels=labels,
                       has_labels=has_labels, types1=types)
    return Encoded(
        task=data.task,
        ids=data.ids,
        tokens1=_tokenize(tokenizer, data.sentences1, max_len),
        tokens2=None if data.sentences2 is None else _tokenize(tokenizer, data.sentences2, max_len),
        labels=labels,
        has_labels=has_labels,
    )


# ------------------------------------------------------------------------------------------ batching


def bucket_length(n: int, buckets: Sequence[int] = DEFAULT_BUCKETS) -> int:
    """Smallest bucket >= ``n``; the largest bucket when ``n`` exceeds them all."""
    bs = sorted(buckets)
    if not bs:
        raise ValueError("buckets must be non-empty")
    for b in bs:
        if b >= n:
            return int(b)
    return int(bs[-1])


def _pad(seqs: Sequence[np.ndarray], batch_size: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.zeros((batch_size, length), dtype=np.int32)
    mask = np.zeros((batch_size, length), dtype=np.int32)
    for r, s in enumerate(seqs):
        if len(s) > length:  # longer than the largest bucket: keep the final [SEP] (its type, for token types)
            s = np.concatenate([s[: length - 1], s[-1:]])
        ids[r, : len(s)] = s
        mask[r, : len(s)] = 1
    return ids, mask


def _longest(enc: Encoded, index: np.ndarray) -> int:
    """Token count of the longest sequence among examples `index` (both sentences of pairs); 0 if none."""
    pairs = enc.tokens2 is not None
    return max((max(len(enc.tokens1[i]), len(enc.tokens2[i]) if pairs else 0) for i in index), default=0)


def make_batch(
    enc: Encoded, index: np.ndarray, batch_size: int, buckets: Sequence[int] = DEFAULT_BUCKETS
) -> dict[str, np.ndarray]:
    """A fixed-shape batch of the examples ``index`` (``len(index) <= batch_size``); pad id 0.

    ``B = batch_size``; ``L = bucket_length(longest sequence in the batch)`` (both sentences for
    pairs). Single-sentence task: ``input_ids``, ``attention_mask`` int32 ``[B, L]`` (a cross-encoded
    pair also ``token_type_ids`` int32 ``[B, L]``). Pair task:
    ``input_ids_1``, ``attention_mask_1``, ``input_ids_2``, ``attention_mask_2`` int32 ``[B, L]``.
    Both: ``labels`` ``[B]`` (int32 for sst/cfimdb, float32 for para/sts) and ``valid`` float32
    ``[B]``, 1 for real rows and 0 for the padding rows past ``len(index)``. Sequences longer than
    the largest bucket are cut to it, keeping their final ``[SEP]``.
    """
    index = np.asarray(index, dtype=np.int64).reshape(-1)
    if len(index) > batch_size:
        raise ValueError(f"{len(index)} indices do not fit a batch of {batch_size}")
    seqs1 = [enc.tokens1[i] for i in index]
    seqs2 = [enc.tokens2[i] for i in index] if enc.tokens2 is not None else []
    length = bucket_length(_longest(enc, index), buckets)
    labels = np.zeros((batch_size,), dtype=enc.labels.dtype)
    labels[: len(index)] = enc.labels[index]
    valid = np.zeros((batch_size,), dtype=np.float32)
    valid[: len(index)] = 1.0
    if enc.tokens2 is None:
        ids, mask = _pad(seqs1, batch_size, length)
        out = {"input_ids": ids, "attention_mask": mask, "labels": labels, "valid": valid}
        if enc.types1 is not None:  # a cross-encoded pair
            out["token_type_ids"] = _pad([enc.types1[i] for i in index], batch_size, length)[0]
        return out
    ids1, mask1 = _pad(seqs1, batch_size, length)
    ids2, mask2 = _pad(seqs2, batch_size, length)
    return {
        "input_ids_1": ids1,
        "attention_mask_1": mask1,
        "input_ids_2": ids2,
        "attention_mask_2": mask2,
        "labels": labels.astype(np.float32),
        "valid": valid,
    }


def step_batches(
    encs: Mapping[str, Encoded], index: Mapping[str, np.ndarray], batch_size: BatchSize,
    buckets: Sequence[int] = DEFAULT_BUCKETS, align: bool = False,
) -> dict[str, dict[str, np.ndarray]]:
    """One training step's batches: ``{task: make_batch(encs[task], index[task], batch_of(batch_size, task), ...)}``
    for each task of ``index``.

    ``align=False``: each task's batch gets its own bucket length (least padding, but up to
    ``len(buckets) ** len(tasks)`` distinct step shapes, each one XLA compilation). ``align=True``:
    every task's batch is padded to the longest of those lengths (at most ``len(buckets)`` step shapes,
    more padded tokens). On the ``cpu-sum`` preset (buckets 16/32/64, batch 8, 1000 steps of the data
    here): 16 step shapes unaligned, 3 aligned, with 1.33x the padded tokens.
    """
    if align:
        buckets = (bucket_length(max(_longest(encs[t], index[t]) for t in index), buckets),)
    return {t: make_batch(encs[t], index[t], batch_of(batch_size, t), buckets) for t in index}


def example_lengths(enc: Encoded) -> np.ndarray:
    """``[N]`` int: the padded length each example needs (the longer sentence of a Siamese pair)."""
    n1 = np.fromiter((len(t) for t in enc.tokens1), np.int64, len(enc.tokens1))
    if enc.tokens2 is None:
        return n1
    return np.maximum(n1, np.fromiter((len(t) for t in enc.tokens2), np.int64, len(enc.tokens2)))


def eval_batches(
    enc: Encoded, batch_size: int, buckets: Sequence[int] = DEFAULT_BUCKETS, order: np.ndarray | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """Batches of consecutive examples of ``order`` (default: file order): batch i covers
    ``order[i*B : (i+1)*B]``; the last is padded (valid=0). ``order=np.argsort(example_lengths(enc))``
    (see :func:`length_order`) batches similar lengths together: far less padding."""
    n = len(enc.tokens1)
    order = np.arange(n) if order is None else np.asarray(order)
    for start in range(0, n, batch_size):
        yield make_batch(enc, order[start : min(start + batch_size, n)], batch_size, buckets)


def length_order(enc: Encoded) -> np.ndarray:
    """A stable permutation of the examples by padded length (for :func:`eval_batches`)."""
    return np.argsort(example_lengths(enc), kind="stable")


# ------------------------------------------------------------------------------------------- sampler


def _task_index(task: str) -> int:
    """Stable per-task seed component: position in the task registry, else a CRC32 of the name."""
    names = list(TASKS)
    if task in names:
        return names.index(task)
    return len(names) + zlib.crc32(task.encode("utf-8"))


BatchSize = int | Mapping[str, int]  # one batch size for every task, or task -> its batch size


def batch_of(batch_size: BatchSize, task: str) -> int:
    """The batch size of ``task``: ``batch_size`` itself, or its entry for ``task``."""
    b = batch_size[task] if isinstance(batch_size, Mapping) else batch_size
    if b < 1:
        raise ValueError(f"batch size of {task!r} must be >= 1, got {b}")
    return int(b)


def epoch_steps(sizes: Mapping[str, int], batch_size: BatchSize, policy: str | int = "max") -> int:
    """Number of round-robin steps in one epoch (see the module docstring); ``"max"`` / ``"min"`` count
    each task's batches with its own batch size."""
    if not sizes:
        raise ValueError("sizes is empty")
    for task, n in sizes.items():
        batch_of(batch_size, task)
        if n < 1:
            raise ValueError(f"task {task!r} has no examples")
    if isinstance(policy, (int, np.integer)) and not isinstance(policy, bool):
        if policy < 1:
            raise ValueError(f"steps per epoch must be >= 1, got {policy}")
        return int(policy)
    per_task = [math.ceil(n / batch_of(batch_size, t)) for t, n in sizes.items()]
    if policy == "max":
        return max(per_task)
    if policy == "min":
        return min(per_task)
    raise ValueError(f"policy must be 'max', 'min' or a positive int, got {policy!r}")


def epoch_plan(
    sizes: Mapping[str, int], batch_size: BatchSize, seed: int, epoch: int, policy: str | int = "max",
    lengths: Mapping[str, np.ndarray] | None = None, length_window: int = 0,
) -> dict[str, np.ndarray]:
    """Round-robin plan of one epoch: task -> int64 ``[steps, B_task]`` example indices (``B_task`` =
    :func:`batch_of` ``(batch_size, task)``).

    Step ``s`` trains batch ``plan[task][s]`` of every task. Each task's indices are consecutive
    reshuffles (cycles) of ``range(size)``, cycle ``c`` drawn from
    ``np.random.default_rng((seed, epoch, task_index, c))``; a batch crossing a cycle boundary is
    completed from the next cycle, so every batch is full. Deterministic in all arguments.

    Length grouping (``length_window`` W > 0, ``lengths[task]`` the ``[size]`` padded lengths): within
    each window of W consecutive steps a task's W * B examples are sorted by length and cut into W
    batches again, which the window then visits in a seeded random order
    (``default_rng((seed, epoch, task_index, "length", window))``). The window holds the same examples as
    without grouping (so epochs still cover the data alike), but a batch's sentences have similar
    lengths: on the data here (batch 16, W 32, buckets 16..128) padding falls from ~60% to ~20% of the
    tokens of a step.
    """
    steps = epoch_steps(sizes, batch_size, policy)
    plan: dict[str, np.ndarray] = {}
    for task, n in sizes.items():
        t_idx = _task_index(task)
        need = steps * batch_of(batch_size, task)
        cycles = []
        for c in range(math.ceil(need / n)):
            cycles.append(np.random.default_rng((seed, epoch, t_idx, c)).permutation(n))
        plan[task] = np.concatenate(cycles)[:need].reshape(steps, batch_of(batch_size, task))
        if length_window:
            if lengths is None:
                raise ValueError("length_window needs the examples' lengths")
            plan[task] = _group_by_length(plan[task], np.asarray(lengths[task]), length_window, (seed, epoch, t_idx))
    return plan


def _group_by_length(plan: np.ndarray, lengths: np.ndarray, window: int, seed: tuple) -> np.ndarray:
    out = plan.copy()
    steps, batch = plan.shape
    for w, start in enumerate(range(0, steps, window)):
        block = plan[start : start + window].reshape(-1)
        block = block[np.argsort(lengths[block], kind="stable")].reshape(-1, batch)
        visit = np.random.default_rng((*seed, zlib.crc32(b"length"), w)).permutation(len(block))
        out[start : start + len(block)] = block[visit]
    return out


@dataclass(frozen=True)
class Schedule:
    """Which examples every training step sees: the one step schedule of the JAX trainer, the PyTorch
    baseline's trainer and `bench --what epoch`.

    ``encs``: task -> its encoded training set; ``subsets``: task -> the ``[n_t]`` indices of ``encs[task]``
    that are trained (all, or a seeded subset). Epoch ``e`` follows :func:`epoch_plan` over the subsets
    (``seed``, ``policy``, per-task ``batch_size``, length grouping by ``length_window``); a step's batches
    are :func:`step_batches` of ``buckets`` / ``align``. Global step ``g`` is step ``g % steps_per_epoch``
    of epoch ``g // steps_per_epoch``.
    """

    encs: Mapping[str, Encoded]
    subsets: Mapping[str, np.ndarray]
    batch_size: BatchSize
    seed: int
    policy: str | int = "max"
    buckets: Sequence[int] = DEFAULT_BUCKETS
    align: bool = False
    length_window: int = 0

    @property
    def sizes(self) -> dict[str, int]:
        return {t: len(s) for t, s in self.subsets.items()}

    @property
    def steps_per_epoch(self) -> int:
        return epoch_steps(self.sizes, self.batch_size, self.policy)

    def lengths(self) -> dict[str, np.ndarray]:
        """``[n_t]`` padded length of every trained example (what length grouping sorts by)."""
        return {t: example_lengths(self.encs[t])[self.subsets[t]] for t in self.subsets}

    def plan(self, epoch: int) -> dict[str, np.ndarray]:
        """task -> ``[steps_per_epoch, B_task]`` indices into ``encs[task]`` for ``epoch``."""
        plan = epoch_plan(self.sizes, self.batch_size, self.seed, epoch, self.policy,
                          self.lengths() if self.length_window else None, self.length_window)
        return {t: np.asarray(self.subsets[t])[p] for t, p in plan.items()}

    def epoch_batches(self, epoch: int, start: int = 0) -> Iterator[dict[str, dict[str, np.ndarray]]]:
        """The batches of steps ``start ..`` of ``epoch``, built one step at a time."""
        plan = self.plan(epoch)
        for s in range(start, self.steps_per_epoch):
            yield step_batches(self.encs, {t: plan[t][s] for t in plan}, self.batch_size, self.buckets, self.align)

    def shape_examples(self, start: int, stop: int) -> dict[str, list[dict[str, np.ndarray]]]:
        """task -> one batch of every distinct shape the steps ``start <= g < stop`` give it, in order of first use:
        the per-task programs a run will call. Only each step's bucket lengths are computed (from the examples'
        lengths); one batch per shape is built."""
        lengths = {t: example_lengths(self.encs[t]) for t in self.subsets}
        bs = np.asarray(sorted(self.buckets))
        first: dict[str, dict[int, np.ndarray]] = {t: {} for t in self.subsets}  # task -> length -> that step's index
        g = start
        while g < stop:
            epoch, s = divmod(g, self.steps_per_epoch)
            e = min(self.steps_per_epoch, s + stop - g)
            plan = self.plan(epoch)
            longest = {t: lengths[t][plan[t][s:e]].max(axis=1) for t in plan}  # [steps] per task
            if self.align:
                both = np.max(np.stack(list(longest.values())), axis=0)
                longest = {t: both for t in plan}
            for t in plan:
                padded = bs[np.minimum(np.searchsorted(bs, longest[t]), len(bs) - 1)]  # bucket_length, vectorized
                for i, n in enumerate(padded.tolist()):
                    first[t].setdefault(n, plan[t][s + i])
            g += e - s
        return {t: [make_batch(self.encs[t], index, batch_of(self.batch_size, t), (n,)) for n, index in by_len.items()]
                for t, by_len in first.items()}

    def batches(self, start: int, stop: int) -> Iterator[tuple[int, dict[str, dict[str, np.ndarray]]]]:
        """``(g, batches)`` of global steps ``start <= g < stop``, across epochs."""
        g = start
        while g < stop:
            epoch, s = divmod(g, self.steps_per_epoch)
            for b in self.epoch_batches(epoch, s):
                yield g, b
                g += 1
                if g >= stop:
                    return
