"""Task heads on the shared encoder, as pure functions over plain param dicts.

Sentence embeddings come from `pool` ([CLS] pooler, as the report, or a masked mean). Scores:
  sst / cfimdb : logits [batch, classes]           (linear over the dropped-out embedding)
  para         : logit  [batch]                    ("pair": linear over [u, v, |u-v|, u*v]; "cosine": scale*cos(u,v)+bias, 5 and -2.5 at init)
  sts          : score  [batch] on the 0..5 scale  ("pair": linear over [u, v, |u-v|, u*v]; "cosine": 2.5*(1+cos(u,v));
                                                    "cosine_relu": 5*max(cos(u,v), 0))
A pair head of kind "cross" (para or sts) is a cross-encoder: the pair is one `[CLS] a [SEP] b [SEP]`
sequence (token types 0 / 1; `train.data.encode_task(..., cross=True)`) and the score is a linear map of
its dropped-out pooled embedding ([batch] logit for para, [batch] score for sts).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from bert_jax import BertConfig, Params, encode
from bert_jax.config import is_traced
from train.tasks import TASKS, get_task


COSINE_LOGIT_SCALE = 5.0  # the "cosine" paraphrase logit's initial scale: logit = scale * (cos - 1/2) at init


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    pooling: str = "cls"  # "cls" (BERT pooler, the report) | "mean"
    para_head: str = "pair"  # "pair" | "cosine" | "cosine_mse" | "cross"
    sts_head: str = "pair"  # "pair" | "cosine" | "cosine_relu" | "cross"
    heads: tuple[str, ...] = ("sst", "para", "sts")  # which heads the model carries (every model is evaluable on all three)
    # In-batch negatives (`train.losses.in_batch_ranking`) added to the loss of every binary pair task with a
    # Siamese head, at this weight (0: off): each positive pair's first sentence must pick its own second
    # sentence among the batch's second sentences, by `ranking_scale` * cosine.
    ranking_weight: float = 0.0
    ranking_scale: float = 20.0

    def __post_init__(self) -> None:
        if self.pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {self.pooling!r}")
        for task, v in (("para", self.para_head), ("sts", self.sts_head)):
            if task in TASKS and v not in TASKS[task].heads:
                raise ValueError(f"{task}_head must be one of {', '.join(TASKS[task].heads)}; got {v!r}")
        unknown = [t for t in self.heads if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown task head(s) {sorted(unknown)}; known: {tuple(TASKS)}")
        if self.ranking_weight < 0 or self.ranking_scale <= 0:
            raise ValueError(f"ranking_weight must be >= 0 and ranking_scale > 0; got {self.ranking_weight}, {self.ranking_scale}")
        if self.ranking_weight:
            cross = [t for t in self.heads if TASKS[t].pair and TASKS[t].kind == "binary" and self.kind(t) == "cross"]
            if cross:
                raise ValueError(f"ranking_weight needs separate sentence embeddings, but the {cross[0]} head is "
                                 f"'cross' (one encoded sequence per pair); use a Siamese head (pair, cosine, cosine_mse)")

    def kind(self, task: str) -> str:
        """"single" (a one-sentence task) or the pair task's head kind (`para_head` / `sts_head`, else the
        task's default, the first of its registered head kinds)."""
        return {"para": self.para_head, "sts": self.sts_head}.get(task, get_task(task).heads[0])

    def ranks(self, task: str) -> bool:
        """Whether `task`'s loss gets the in-batch ranking term (a binary pair task with a Siamese head)."""
        spec = get_task(task)
        return bool(self.ranking_weight) and spec.pair and spec.kind == "binary" and self.kind(task) != "cross"

    @property
    def cross_tasks(self) -> tuple[str, ...]:
        """Pair tasks whose data is tokenized as one cross-encoded sequence (`encode_task(cross=True)`)."""
        return tuple(t for t in self.heads if TASKS[t].pair and self.kind(t) == "cross")


def _dense_init(rng: jax.Array, n_in: int, n_out: int) -> Params:
    return {"kernel": 0.02 * jax.random.normal(rng, (n_in, n_out), jnp.float32), "bias": jnp.zeros((n_out,), jnp.float32)}


def init_heads(hc: HeadConfig, hidden: int, rng: jax.Array) -> Params:
    """Fresh head parameters: {task: {...}}."""
    params: Params = {}
    for i, task in enumerate(hc.heads):
        key, spec, kind = jax.random.fold_in(rng, i), get_task(task), hc.kind(task)
        if kind == "single":
            params[task] = _dense_init(key, hidden, spec.num_classes if spec.kind == "classes" else 1)
        elif kind == "cosine" and spec.kind == "binary":  # a logit: learned scale and bias of the cosine
            # decision threshold at init cos = 0.5, the "cosine_mse" head's: at bias 0 every pair of positive cosine
            # (nearly all, with mean pooling) is a paraphrase, and a bias moves only ~lr per Adam step
            params[task] = {"scale": jnp.array(COSINE_LOGIT_SCALE, jnp.float32),
                            "bias": jnp.array(-0.5 * COSINE_LOGIT_SCALE, jnp.float32)}
        elif kind in ("cosine", "cosine_relu", "cosine_mse"):  # no parameters
            params[task] = {}
        elif kind == "cross":
            params[task] = _dense_init(key, hidden, 1)
        elif kind == "pair":
            params[task] = _dense_init(key, 4 * hidden, 1)
        else:
            raise ValueError(f"task {task!r}: unknown head kind {kind!r}")
    return params


def pool(out, attention_mask: jax.Array, pooling: str) -> jax.Array:
    """Sentence embedding [batch, hidden] (float32) from a `BertOutput`."""
    if pooling == "cls":
        return out.pooler_output.astype(jnp.float32)
    m = attention_mask.astype(jnp.float32)[..., None]
    return (out.last_hidden_state.astype(jnp.float32) * m).sum(1) / jnp.maximum(m.sum(1), 1.0)


def _dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    if rng is None or (not is_traced(rate) and rate == 0.0):
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x * (1.0 / (1.0 - rate)) if is_traced(rate) else x / (1.0 - rate), 0.0)


def _cosine(u: jax.Array, v: jax.Array) -> jax.Array:
    # max(‖x‖, eps) computed as sqrt(max(‖x‖², eps²)): same value, but a zero vector (e.g. the mean-pooled
    # embedding of an all-padding row) gets a zero gradient instead of NaN (d‖x‖/dx = x/‖x‖ = 0/0 at x = 0).
    eps = 1e-8

    def norm(x: jax.Array) -> jax.Array:
        return jnp.sqrt(jnp.maximum(jnp.square(x).sum(-1), eps * eps))

    # Clipped to [-1, 1]: rounding gives cos(x, x) = 1.0000001 for about a third of random float32 vectors, which
    # put a cosine head's score just outside its label range (e.g. an STS score of 5.0000005).
    return jnp.clip((u * v).sum(-1) / (norm(u) * norm(v)), -1.0, 1.0)


def task_scores(
    params: Params, bert_config: BertConfig, hc: HeadConfig, task: str, batch: dict[str, jax.Array], rng: jax.Array | None = None
) -> jax.Array:
    """Scores of one task's batch (see module docstring for shapes). `rng=None` is deterministic.

    `params = {"bert": encoder params, "heads": {task: head params}}`. Pair batches run both sentences
    through the encoder as one [2*batch, seq] call.
    """
    return task_outputs(params, bert_config, hc, task, batch, rng)[0]


def task_outputs(
    params: Params, bert_config: BertConfig, hc: HeadConfig, task: str, batch: dict[str, jax.Array], rng: jax.Array | None = None
) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """(`task_scores`, the pooled sentence embeddings (u, v) [batch, hidden] each of a Siamese pair head, else None)."""
    if rng is not None:
        enc_rng, head_rng = jax.random.split(rng)
    else:
        enc_rng = head_rng = None
    head = params["heads"][task]
    kind = hc.kind(task)
    if kind in ("single", "cross"):
        out = encode(params["bert"], bert_config, batch["input_ids"], batch["attention_mask"],
                     token_type_ids=batch.get("token_type_ids"), dropout_rng=enc_rng)
        x = _dropout(pool(out, batch["attention_mask"], hc.pooling), bert_config.hidden_dropout_prob, head_rng)
        logits = x @ head["kernel"] + head["bias"]
        return (logits if get_task(task).kind == "classes" else logits[:, 0]), None
    ids = jnp.concatenate([batch["input_ids_1"], batch["input_ids_2"]], axis=0)
    mask = jnp.concatenate([batch["attention_mask_1"], batch["attention_mask_2"]], axis=0)
    emb = pool(encode(params["bert"], bert_config, ids, mask, dropout_rng=enc_rng), mask, hc.pooling)
    u, v = jnp.split(emb, 2, axis=0)
    return _pair_scores(head, kind, task, u, v, bert_config.hidden_dropout_prob, head_rng), (u, v)


def _pair_scores(head: Params, kind: str, task: str, u: jax.Array, v: jax.Array, dropout: float,
                 rng: jax.Array | None) -> jax.Array:
    """A Siamese pair head's scores [batch] from the two sentences' embeddings u, v [batch, hidden]."""
    lo, hi = get_task(task).label_range
    if kind == "cosine_mse":  # the report's cosine + MSE paraphrase head: cos - 1/2, positive when cos > 1/2
        return _cosine(u, v) - 0.5
    if kind == "cosine_relu":  # hi * max(cos, 0): for sts 5 * relu(cos)
        return hi * jax.nn.relu(_cosine(u, v))
    if kind == "cosine":  # binary: a logit; regression: lo + (hi - lo) * (1 + cos) / 2, for sts 2.5 * (1 + cos)
        cos = _cosine(u, v)
        if get_task(task).kind == "binary":
            return head["scale"] * cos + head["bias"]
        return (hi - lo) / 2 * (1.0 + cos) + lo
    feats = jnp.concatenate([u, v, jnp.abs(u - v), u * v], axis=-1)
    feats = _dropout(feats, dropout, rng)
    return (feats @ head["kernel"] + head["bias"])[:, 0]
