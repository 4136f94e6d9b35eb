"""Per-task losses over padded batches: rows with `valid == 0` contribute nothing.

All return a scalar mean over the valid rows of a [batch] / [batch, classes] score array.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def _masked_mean(per_row: jax.Array, valid: jax.Array) -> jax.Array:
    return (per_row * valid).sum() / jnp.maximum(valid.sum(), 1.0)


def cross_entropy(logits: jax.Array, labels: jax.Array, valid: jax.Array) -> jax.Array:
    """Softmax cross-entropy; logits [batch, classes], integer labels [batch]."""
    return _masked_mean(optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels.astype(jnp.int32)), valid)


def binary_cross_entropy(logit: jax.Array, labels: jax.Array, valid: jax.Array) -> jax.Array:
    """Sigmoid BCE on logits [batch] with 0/1 labels [batch] (torch's BCEWithLogitsLoss)."""
    return _masked_mean(optax.sigmoid_binary_cross_entropy(logit.astype(jnp.float32), labels.astype(jnp.float32)), valid)


def mean_squared_error(pred: jax.Array, target: jax.Array, valid: jax.Array) -> jax.Array:
    return _masked_mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)), valid)


def in_batch_ranking(u: jax.Array, v: jax.Array, labels: jax.Array, valid: jax.Array, scale: float) -> jax.Array:
    """In-batch negatives ("multiple negatives ranking", sentence-transformers' MultipleNegativesRankingLoss):
    for every valid row i with label 1, softmax cross-entropy of `scale` * cos(u_i, v_j) over the valid rows j,
    the target being j = i; the mean over those rows (0 when a batch has none). u, v: [batch, hidden]."""
    def unit(x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        return x / jnp.sqrt(jnp.maximum(jnp.square(x).sum(-1, keepdims=True), 1e-16))

    logits = scale * unit(u) @ unit(v).T  # [batch, batch]
    logits = jnp.where(valid[None, :] > 0, logits, -1e9)  # padding rows are no candidates
    per_row = -jnp.diagonal(jax.nn.log_softmax(logits, axis=-1))
    return _masked_mean(per_row, valid * (labels > 0.5))


def task_loss(task: str, scores: jax.Array, batch: dict[str, jax.Array], head: str | None = None) -> jax.Array:
    """`task`'s loss (by its kind in the task registry, or by its `head` kind's own loss) of a padded batch's scores."""
    from train.tasks import get_task  # train.tasks builds its losses from this module

    return get_task(task).loss(scores, batch["labels"], batch["valid"], head)
