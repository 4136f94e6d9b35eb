"""Task heads on the shared encoder, as pure functions over plain param dicts.

Sentence embeddings come from `pool` ([CLS] pooler, as the report, or a masked mean). Scores:
  sst / cfimdb : logits [batch, classes]           (linear over the dropped-out embedding)
  para         : logit  [batch]                    ("pair": linear over [u, v, |u-v|, u*v]; "cosine": scale*cos(u,v)+bias)
  sts          : score  [batch] on the 0..5 scale  ("pair": linear over [u, v, |u-v|, u*v]; "cosine": 2.5*(1+cos(u,v)))
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from bert_jax import BertConfig, Params, encode

NUM_CLASSES = {"sst": 5, "cfimdb": 2}
SINGLE_TASKS = ("sst", "cfimdb")
PAIR_TASKS = ("para", "sts")


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    pooling: str = "cls"  # "cls" (BERT pooler, the report) | "mean"
    para_head: str = "pair"  # "pair" | "cosine"
    sts_head: str = "pair"  # "pair" | "cosine"
    heads: tuple[str, ...] = ("sst", "para", "sts")  # which heads the model carries (every model is evaluable on all three)

    def __post_init__(self) -> None:
        if self.pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {self.pooling!r}")
        for name, v in (("para_head", self.para_head), ("sts_head", self.sts_head)):
            if v not in ("pair", "cosine"):
                raise ValueError(f"{name} must be 'pair' or 'cosine', got {v!r}")
        unknown = set(self.heads) - set(SINGLE_TASKS + PAIR_TASKS)
        if unknown:
            raise ValueError(f"unknown task head(s) {sorted(unknown)}; known: {SINGLE_TASKS + PAIR_TASKS}")


def _dense_init(rng: jax.Array, n_in: int, n_out: int) -> Params:
    return {"kernel": 0.02 * jax.random.normal(rng, (n_in, n_out), jnp.float32), "bias": jnp.zeros((n_out,), jnp.float32)}


def init_heads(hc: HeadConfig, hidden: int, rng: jax.Array) -> Params:
    """Fresh head parameters: {task: {...}}."""
    params: Params = {}
    for i, task in enumerate(hc.heads):
        key = jax.random.fold_in(rng, i)
        if task in SINGLE_TASKS:
            params[task] = _dense_init(key, hidden, NUM_CLASSES[task])
        elif task == "para" and hc.para_head == "cosine":
            params[task] = {"scale": jnp.array(5.0, jnp.float32), "bias": jnp.array(0.0, jnp.float32)}
        elif task == "sts" and hc.sts_head == "cosine":
            params[task] = {}
        else:
            params[task] = _dense_init(key, 4 * hidden, 1)
    return params


def pool(out, attention_mask: jax.Array, pooling: str) -> jax.Array:
    """Sentence embedding [batch, hidden] (float32) from a `BertOutput`."""
    if pooling == "cls":
        return out.pooler_output.astype(jnp.float32)
    m = attention_mask.astype(jnp.float32)[..., None]
    return (out.last_hidden_state.astype(jnp.float32) * m).sum(1) / jnp.maximum(m.sum(1), 1.0)


def _dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0)


def _cosine(u: jax.Array, v: jax.Array) -> jax.Array:
    # max(‖x‖, eps) computed as sqrt(max(‖x‖², eps²)): same value, but a zero vector (e.g. the mean-pooled
    # embedding of an all-padding row) gets a zero gradient instead of NaN (d‖x‖/dx = x/‖x‖ = 0/0 at x = 0).
    eps = 1e-8

    def norm(x: jax.Array) -> jax.Array:
        return jnp.sqrt(jnp.maximum(jnp.square(x).sum(-1), eps * eps))

    return (u * v).sum(-1) / (norm(u) * norm(v))


def task_scores(
    params: Params, bert_config: BertConfig, hc: HeadConfig, task: str, batch: dict[str, jax.Array], rng: jax.Array | None = None
) -> jax.Array:
    """Scores of one task's batch (see module docstring for shapes). `rng=None` is deterministic.

    `params = {"bert": encoder params, "heads": {task: head params}}`. Pair batches run both sentences
    through the encoder as one [2*batch, seq] call.
    """
    if rng is not None:
        enc_rng, head_rng = jax.random.split(rng)
    else:
        enc_rng = head_rng = None
    head = params["heads"][task]
    if task in SINGLE_TASKS:
        out = encode(params["bert"], bert_config, batch["input_ids"], batch["attention_mask"], dropout_rng=enc_rng)
        x = _dropout(pool(out, batch["attention_mask"], hc.pooling), bert_config.hidden_dropout_prob, head_rng)
        return x @ head["kernel"] + head["bias"]
    ids = jnp.concatenate([batch["input_ids_1"], batch["input_ids_2"]], axis=0)
    mask = jnp.concatenate([batch["attention_mask_1"], batch["attention_mask_2"]], axis=0)
    emb = pool(encode(params["bert"], bert_config, ids, mask, dropout_rng=enc_rng), mask, hc.pooling)
    u, v = jnp.split(emb, 2, axis=0)
    kind = hc.para_head if task == "para" else hc.sts_head
    if kind == "cosine":
        cos = _cosine(u, v)
        return head["scale"] * cos + head["bias"] if task == "para" else 2.5 * (1.0 + cos)
    feats = jnp.concatenate([u, v, jnp.abs(u - v), u * v], axis=-1)
    feats = _dropout(feats, bert_config.hidden_dropout_prob, head_rng)
    return (feats @ head["kernel"] + head["bias"])[:, 0]
