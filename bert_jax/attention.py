"""Multi-head self-attention with a key padding mask.

Shapes: q, k, v are [batch, seq, heads, head_dim]; `key_mask` is [batch, seq] (1 = real token).

Deterministic calls (and any call with attention dropout 0) go through
`jax.nn.dot_product_attention` (XLA or cuDNN flash attention). That function has no dropout, so when
attention dropout is active (training with `attention_probs_dropout_prob > 0`) the same softmax is
written out explicitly with dropout on the probabilities, exactly as BERT does. The fast cuDNN path
therefore requires `attention_probs_dropout_prob == 0` during training: the trainer sets it to 0 when
`attention_impl="cudnn"` (hidden dropout stays on), and says so in its resolved config.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def keep_mask(rng: jax.Array, keep_prob: float | jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Dropout keep-mask, bit for bit `jax.random.bernoulli(rng, keep_prob, shape)`, computed cheaper.

    `bernoulli` draws 32 random bits per element, turns the top 23 into a float `u = (bits >> 9) * 2**-23`
    and keeps `u < keep_prob` (keep_prob rounded to float32). That is the integer test
    `(bits >> 9) < ceil(keep_prob * 2**23)` on the same bits, without the float conversion. (This and
    the erf GELU of `model.py` together cut 2.6% (seq 32) to 5% (seq 64) of the CPU time of the
    batch-8 train step, in-process A/B.)
    """
    bits = jax.random.bits(rng, shape, jnp.uint32)
    if isinstance(keep_prob, jax.core.Tracer):  # a per-member rate (train/population.py): the same threshold, traced
        return (bits >> 9) < jnp.ceil(jnp.asarray(keep_prob, jnp.float32) * 2**23).astype(jnp.uint32)
    threshold = math.ceil(float(np.float32(keep_prob)) * 2**23)
    return (bits >> 9) < jnp.uint32(threshold)


def self_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    key_mask: jax.Array,
    *,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    implementation: str = "xla",
) -> jax.Array:
    """Scaled dot-product attention over unpadded keys. Returns [batch, seq, heads, head_dim]."""
    deterministic = dropout_rng is None or dropout_rate == 0.0
    if deterministic and implementation == "cudnn":
        # cuDNN takes no broadcast [batch, 1, 1, seq] mask (its bias must be [.., seq, seq]); a padding mask is
        # given as key lengths instead, which is the same mask because the tokenizer pads on the right.
        lengths = key_mask.astype(jnp.int32).sum(-1)  # [batch]
        return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation="cudnn")
    mask = key_mask.astype(bool)[:, None, None, :]  # [batch, 1, 1(query), seq(key)]
    if deterministic:
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=None)
    if implementation == "cudnn":
        raise ValueError("cuDNN attention has no dropout: set attention_probs_dropout_prob=0 for this path")
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * scale
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    keep = keep_mask(dropout_rng, 1.0 - dropout_rate, probs.shape)
    probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)
