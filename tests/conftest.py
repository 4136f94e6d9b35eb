"""Shared fixtures: a tiny random HF BERT saved to disk (torch), and the data directory."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("BERT_JAX_DATA", REPO.parent / "shared" / "data"))

# CLI calls in the tests enable the compile cache and the executable store: keep their programs out of the
# user's cache (a test that patched traced code must never leave a program there), in a cache of their own.
from train.compilation import ENV_VAR, default_cache_dir  # noqa: E402

os.environ.setdefault(ENV_VAR, str(default_cache_dir().parent / "tests"))

# The suite's time is mostly XLA compiles of tiny programs, most of it LLVM optimising them: the tests (and the
# subprocesses they start, which inherit the environment) compile the same HLO with LLVM's cheap passes only. XLA's
# own HLO passes, and so every fusion and library call (YNNPACK's kernels included), are unchanged. A caller's own
# XLA_FLAGS win (`BERT_JAX_TEST_XLA_FLAGS=` keeps XLA's defaults).
FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ.setdefault("XLA_FLAGS", os.environ.get("BERT_JAX_TEST_XLA_FLAGS", FAST_XLA))

TINY = dict(
    vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
    max_position_embeddings=64, type_vocab_size=2, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
)


def save_tiny_bert(out: Path, seed: int = 0, safe: bool = True, **overrides) -> Path:
    """A randomly initialised transformers BertModel (with non-trivial LayerNorm/bias values) saved to `out`."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    model = BertModel(BertConfig(**{**TINY, **overrides}))
    with torch.no_grad():  # HF inits LayerNorm to (1, 0) and biases to 0: perturb so they are tested too
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(out, safe_serialization=safe)
    # a vocab so the directory is a complete checkpoint
    (out / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(TINY["vocab_size"] - 5)]) + "\n")
    return out


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA_DIR / "ids-sst-dev.csv").is_file():
        pytest.skip(f"CS224N data not found at {DATA_DIR} (set BERT_JAX_DATA)")
    return DATA_DIR


def assert_tree_allclose(a, b, atol=1e-6, rtol=0.0):
    import jax

    la, ta = jax.tree.flatten_with_path(a)
    lb, tb = jax.tree.flatten_with_path(b)
    assert ta == tb, f"tree structures differ:\n{ta}\n{tb}"
    for (path, x), (_, y) in zip(la, lb):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=rtol, err_msg=jax.tree_util.keystr(path))


# ---- tiny CS224N-format data and a tiny BERT that shares the real (embedded) vocabulary ----

_WORDS = ("good great fun lovely bad awful dull boring film movie plot actor story the a is was very not "
          "what how why where dog cat man woman car house runs eats plays sings red blue big small").split()


def write_tiny_data(out: Path, n_train: int = 48, n_dev: int = 24, seed: int = 0) -> Path:
    """CS224N-format tab-separated files (train / dev / test-student) for all four tasks, with learnable labels."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)

    def sent(k: int) -> str:
        return " ".join(rng.choice(_WORDS, size=k))

    def write(name: str, header: list[str], rows: list[list]) -> None:
        lines = ["\t".join([""] + header)] + ["\t".join([str(i)] + [str(c) for c in r]) for i, r in enumerate(rows)]
        (out / name).write_text("\n".join(lines) + "\n")

    for split, n in (("train", n_train), ("dev", n_dev), ("test-student", n_dev)):
        labelled = split != "test-student"
        sst, cf, para, sts = [], [], [], []
        for i in range(n):
            y = int(rng.integers(0, 5))
            s = f"{['awful', 'bad', 'the', 'good', 'great'][y]} {sent(int(rng.integers(2, 8)))}"
            sst.append([f"sst{split}{i}", s] + ([y] if labelled else []))
            y2 = int(rng.integers(0, 2))
            cf.append([f"cf{split}{i}", f"{['awful', 'great'][y2]} {sent(5)}"] + ([y2] if labelled else []))
            a = sent(int(rng.integers(3, 9)))
            dup = int(rng.integers(0, 2))
            para.append([f"qq{split}{i}", a, a if dup else sent(6)] + ([float(dup)] if labelled else []))
            sim = float(rng.integers(0, 6))
            b = " ".join(a.split()[: max(1, int(len(a.split()) * sim / 5))]) + " " + sent(int(5 - sim) + 1)
            sts.append([f"sts{split}{i}", a, b] + ([sim] if labelled else []))
        write(f"ids-sst-{split}.csv", ["id", "sentence"] + (["sentiment"] if labelled else []), sst)
        write(f"ids-cfimdb-{split}.csv", ["id", "sentence"] + (["sentiment"] if labelled else []), cf)
        write(f"quora-{split}.csv", ["id", "sentence1", "sentence2"] + (["is_duplicate"] if labelled else []), para)
        write(f"sts-{split}.csv", ["id", "sentence1", "sentence2"] + (["similarity"] if labelled else []), sts)
    return out


def save_tiny_vocab_bert(out: Path, seed: int = 0) -> Path:
    """A tiny random BERT (2 layers, hidden 32) with the embedded checkpoint's real WordPiece vocab."""
    import shutil

    import bert_jax

    save_tiny_bert(out, seed=seed, vocab_size=30522, max_position_embeddings=128)
    shutil.copy(bert_jax.resolve_checkpoint("embedded") / "vocab.txt", out / "vocab.txt")
    return out


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    return write_tiny_data(tmp_path_factory.mktemp("tiny_data"))


@pytest.fixture(scope="session")
def tiny_vocab_bert_dir(tmp_path_factory) -> Path:
    return save_tiny_vocab_bert(tmp_path_factory.mktemp("tiny_vocab_bert"))
