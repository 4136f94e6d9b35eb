"""Numerical comparison of bert_jax against transformers' PyTorch `BertModel` on the same inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bert_jax.convert import load_pretrained, resolve_checkpoint
from bert_jax.model import encode


def random_inputs(vocab_size: int, batch: int, seq: int, seed: int = 0, type_vocab_size: int = 2) -> dict[str, np.ndarray]:
    """A padded batch: random ids, per-row lengths in [2, seq], random token types; [batch, seq] int32 each."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, seq + 1, size=batch)
    lengths[0] = seq  # at least one full row
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int32)
    ids = rng.integers(1, vocab_size, size=(batch, seq)).astype(np.int32) * mask
    types = (rng.integers(0, type_vocab_size, size=(batch, seq)) * mask).astype(np.int32)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def torch_outputs(model_dir: str | Path, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(last_hidden_state, pooler_output) of transformers' BertModel in float32, eval mode."""
    import torch
    from transformers import BertModel

    model = BertModel.from_pretrained(str(model_dir), attn_implementation="eager").eval()
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v.astype(np.int64)) for k, v in inputs.items()})
    return out.last_hidden_state.numpy(), out.pooler_output.numpy()


def max_abs_diff(
    jax_out: tuple[np.ndarray, np.ndarray], torch_out: tuple[np.ndarray, np.ndarray], attention_mask: np.ndarray
) -> dict[str, float]:
    """Max |jax - torch| over real (unpadded) token positions and over the pooled output."""
    real = attention_mask.astype(bool)[..., None]
    hidden = np.where(real, np.asarray(jax_out[0], np.float32) - torch_out[0], 0.0)
    return {
        "last_hidden_state": float(np.abs(hidden).max()),
        "pooler_output": float(np.abs(np.asarray(jax_out[1], np.float32) - torch_out[1]).max()),
    }


def compare(checkpoint: str | Path = "embedded", batch: int = 4, seq: int = 64, seed: int = 0) -> dict[str, float]:
    """Load `checkpoint` in both frameworks, run one random padded batch, return the max abs differences."""
    config, params = load_pretrained(checkpoint)
    inputs = random_inputs(config.vocab_size, batch, seq, seed, config.type_vocab_size)
    out = encode(params, config, inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"])
    ref = torch_outputs(resolve_checkpoint(checkpoint), inputs)
    return max_abs_diff((out.last_hidden_state, out.pooler_output), ref, inputs["attention_mask"])
