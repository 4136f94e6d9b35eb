"""PCGrad ("Gradient Surgery for Multi-Task Learning", Yu et al. 2020) in pure JAX.

Semantics
---------
Given one gradient pytree per task, ``g_1 .. g_T`` (all with the same tree
structure), the projected gradient of task ``i`` is computed as::

    g_i' = g_i
    for j in order_i:                       # every other task, each once
        if g_i' . g_j < 0:                  # conflict with task j's ORIGINAL grad
            g_i' = g_i' - (g_i' . g_j / ||g_j||^2) g_j

* ``a . b`` is the dot product of the two pytrees with all leaves flattened
  together, i.e. ``sum over leaves of vdot(leaf_a, leaf_b)``, accumulated in
  float32 whatever the leaves' dtype.
* ``order_i`` is the task order. With ``key=None`` it is the fixed order
  ``0, 1, ..., T-1`` without ``i``. With a PRNG key it is a fresh random
  permutation per task, exactly::

      perm_i = jax.random.permutation(jax.random.fold_in(key, i), T)
      order_i = [j for j in perm_i if j != i]

* A task with ``||g_j||^2 == 0`` never causes a projection (no division by 0).
* ``T = len(task_grads)`` is static; the whole thing is jit-able.

The Gram-matrix trick
---------------------
``g_i'`` always stays a linear combination of the original gradients,
``g_i' = sum_k c_k g_k`` (it starts as ``e_i`` and every projection only
subtracts a multiple of an original ``g_j``). Hence every dot product the loop
needs is a function of the T x T Gram matrix ``G[k, j] = g_k . g_j`` of the
original gradients::

    g_i' . g_j = sum_k c_k G[k, j] = (c @ G)[j]
    ||g_j||^2  = G[j, j]

So we

1. compute ``G`` once, leaf by leaf (``T (T + 1) / 2`` fused multiply-reduce
   per leaf; no concatenated flat parameter vector is ever built),
2. run the PCGrad loops on scalars only, producing a T x T coefficient matrix
   ``C`` (row ``i`` holds the coefficients of ``g_i'``),
3. form the outputs as weighted sums of leaves: ``g_i' = sum_k C[i, k] g_k``.

For ``combine`` (sum / mean of the projected gradients) step 3 collapses to a
single weighted sum ``sum_k w_k g_k`` with ``w = C.sum(0)`` (or ``C.mean(0)``),
so the cost over the parameters is: one Gram matrix + one weighted sum. This is
mathematically identical to the naive per-pytree loop (tests check it against
an independent numpy implementation).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

PyTree = Any

__all__ = ["gram_matrix", "projection_coefficients", "project", "combine"]


def _check(task_grads: Sequence[PyTree]) -> list[list[jax.Array]]:
    if len(task_grads) == 0:
        raise ValueError("PCGrad needs at least one task gradient")
    treedef = jax.tree_util.tree_structure(task_grads[0])
    leaves = []
    for t, g in enumerate(task_grads):
        if jax.tree_util.tree_structure(g) != treedef:
            raise ValueError(
                f"task {t} gradient has tree structure {jax.tree_util.tree_structure(g)}, "
                f"expected {treedef}"
            )
        leaves.append([jnp.asarray(x) for x in jax.tree_util.tree_leaves(g)])
    return leaves


def gram_matrix(task_grads: Sequence[PyTree]) -> jax.Array:
    """T x T float32 matrix ``G[a, b] = sum over leaves vdot(g_a, g_b)``.

    Computed leaf-wise with element-wise multiply + reduce in float32 (not a
    matmul, so no reduced-precision TF32 path on GPUs).
    """
    leaves = _check(task_grads)
    T = len(leaves)
    n_leaves = len(leaves[0])
    entries = {}
    for a in range(T):
        for b in range(a, T):
            s = jnp.zeros((), jnp.float32)
            for l in range(n_leaves):
                x = leaves[a][l].astype(jnp.float32)
                y = leaves[b][l].astype(jnp.float32)
                s = s + jnp.sum(x * y)
            entries[a, b] = s
    rows = [jnp.stack([entries[min(a, b), max(a, b)] for b in range(T)]) for a in range(T)]
    return jnp.stack(rows)


def _task_order(key: jax.Array | None, i: int, T: int):
    """Order in which task ``i`` visits the tasks (including ``i``, skipped later)."""
    if key is None:
        return jnp.arange(T)
    return jax.random.permutation(jax.random.fold_in(key, i), T)


def projection_coefficients(gram: jax.Array, key: jax.Array | None) -> jax.Array:
    """PCGrad on the Gram matrix: returns ``C`` with ``g_i' = sum_k C[i, k] g_k``."""
    gram = jnp.asarray(gram, jnp.float32)
    T = gram.shape[0]
    sq_norms = jnp.diagonal(gram)
    eye = jnp.eye(T, dtype=jnp.float32)
    rows = []
    for i in range(T):
        order = _task_order(key, i, T)
        c = eye[i]
        for p in range(T):
            j = order[p]
            dot = jnp.sum(c * gram[:, j])  # = g_i' . g_j (elementwise: no TF32 matmul)
            nj = sq_norms[j]
            do_proj = (j != i) & (dot < 0) & (nj > 0)
            scale = jnp.where(do_proj, dot / jnp.where(nj > 0, nj, 1.0), 0.0)
            c = c - scale * eye[j]
        rows.append(c)
    return jnp.stack(rows)


def _weighted_sum(leaves: list[list[jax.Array]], w: jax.Array) -> list[jax.Array]:
    """Leaf-wise ``sum_k w[k] * leaves[k]`` in float32, cast back to the leaf dtype."""
    T = len(leaves)
    out = []
    for l in range(len(leaves[0])):
        acc = w[0] * leaves[0][l].astype(jnp.float32)
        for k in range(1, T):
            acc = acc + w[k] * leaves[k][l].astype(jnp.float32)
        out.append(acc.astype(leaves[0][l].dtype))
    return out


def project(task_grads: Sequence[PyTree], key: jax.Array | None = None) -> list[PyTree]:
    """PCGrad-projected gradient of every task (see module docstring).

    ``key=None``: fixed order ``0..T-1``; otherwise a fresh permutation per task
    drawn as ``jax.random.permutation(jax.random.fold_in(key, i), T)``.
    """
    leaves = _check(task_grads)
    treedef = jax.tree_util.tree_structure(task_grads[0])
    C = projection_coefficients(gram_matrix(task_grads), key)
    return [
        jax.tree_util.tree_unflatten(treedef, _weighted_sum(leaves, C[i]))
        for i in range(len(leaves))
    ]


def combine(task_grads: Sequence[PyTree], key: jax.Array | None = None, reduction: str = "sum") -> PyTree:
    """PCGrad then sum (``reduction="sum"``) or mean (``"mean"``) over tasks.

    Done as one weighted sum of the original gradients (coefficients
    ``C.sum(0)`` / ``C.mean(0)``), never materialising the T projected trees.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    leaves = _check(task_grads)
    treedef = jax.tree_util.tree_structure(task_grads[0])
    C = projection_coefficients(gram_matrix(task_grads), key)
    w = C.sum(0) if reduction == "sum" else C.mean(0)
    return jax.tree_util.tree_unflatten(treedef, _weighted_sum(leaves, w))
