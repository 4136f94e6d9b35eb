"""Shared fixtures: a tiny random HF BERT saved to disk (torch), and the data directory."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("BERT_JAX_DATA", REPO.parent / "shared" / "data"))

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
