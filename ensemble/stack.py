"""Stacked-parameter ensembles: K param trees of one architecture -> one tree with a leading member axis.

`stack([p_1, ..., p_K])` turns K trees whose leaves are `[*s]` into one tree whose leaves are `[K, *s]`;
`unstack` inverts it. Scores of every member come from one jitted call per batch: `task_scores` vmapped
over the member axis of the params (the batch is shared), giving `[K, batch, ...]`.

Members are grouped by what the evaluation computes (`eval_spec`: the ModelSpec without its training-only
fields, dropout and remat). Within a group every tree must have the same structure, shapes and dtypes; a
mismatch is a `StructureError` naming the first differing leaf.
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache, partial
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bert_jax import Params
from train import data as D
from train.heads import task_scores
from train.step import ModelSpec


class StructureError(ValueError):
    """Param trees that cannot be stacked (or averaged): different structure, shape or dtype."""


def leaf_path(path) -> str:
    """`('heads', 'sts', 'kernel')`-style key path as `heads/sts/kernel`."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _leaves(tree) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    flat, _ = jax.tree.flatten_with_path(tree)
    return {leaf_path(p): (tuple(np.shape(x)), np.dtype(getattr(x, "dtype", np.asarray(x).dtype))) for p, x in flat}


def first_mismatch(a: Params, b: Params, name_a: str = "a", name_b: str = "b") -> str | None:
    """A message naming the first leaf (in `a`'s order) where trees `a` and `b` differ, or None if they match."""
    la, lb = _leaves(a), _leaves(b)
    for path, (shape, dtype) in la.items():
        if path not in lb:
            return f"leaf {path} is in {name_a} but not in {name_b}"
        shape_b, dtype_b = lb[path]
        if shape != shape_b:
            return f"leaf {path} has shape {shape} in {name_a} but {shape_b} in {name_b}"
        if dtype != dtype_b:
            return f"leaf {path} has dtype {dtype} in {name_a} but {dtype_b} in {name_b}"
    for path in lb:
        if path not in la:
            return f"leaf {path} is in {name_b} but not in {name_a}"
    if jax.tree.structure(a) != jax.tree.structure(b):  # same leaves, different containers (e.g. an empty head)
        return f"tree structures differ: {jax.tree.structure(a)} in {name_a} vs {jax.tree.structure(b)} in {name_b}"
    return None


def check_same_structure(trees: Sequence[Params], names: Sequence[str] | None = None) -> None:
    """Raise `StructureError` naming the first differing leaf between `trees[0]` and any other tree."""
    if not trees:
        raise StructureError("nothing to stack: no param trees given")
    names = list(names) if names is not None else [f"member {i}" for i in range(len(trees))]
    for tree, name in zip(trees[1:], names[1:]):
        msg = first_mismatch(trees[0], tree, names[0], name)
        if msg is not None:
            raise StructureError(f"cannot stack {names[0]} and {name}: {msg}")


def stack(trees: Sequence[Params], names: Sequence[str] | None = None) -> Params:
    """K trees with leaves `[*s]` -> one tree with leaves `[K, *s]` (member axis first).

    Raises `StructureError` (naming the first differing leaf and the two members) when the trees differ
    in structure, shape or dtype.
    """
    check_same_structure(trees, names)
    return jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *trees)


def num_members(stacked: Params) -> int:
    leaves = jax.tree.leaves(stacked)
    if not leaves:
        raise StructureError("stacked tree has no leaves")
    return int(leaves[0].shape[0])


def unstack(stacked: Params) -> list[Params]:
    """Inverse of `stack`: leaves `[K, *s]` -> K trees with leaves `[*s]`."""
    return [jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(num_members(stacked))]


def eval_spec(spec: ModelSpec) -> ModelSpec:
    """The part of a ModelSpec that the deterministic evaluation depends on (dropout and remat zeroed).

    Two runs with equal `eval_spec` compute the same function of their params, so they can share one
    vmapped evaluation.
    """
    bert = spec.bert.replace(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, remat=False)
    return ModelSpec(bert=bert, heads=spec.heads)


def spec_difference(a: ModelSpec, b: ModelSpec) -> str | None:
    """'heads.sts_head: pair vs cosine'-style description of the first differing ModelSpec field, or None."""
    for part in ("bert", "heads"):
        x, y = getattr(a, part), getattr(b, part)
        for f in dataclasses.fields(x):
            vx, vy = getattr(x, f.name), getattr(y, f.name)
            if vx != vy:
                return f"{part}.{f.name}: {vx!r} vs {vy!r}"
    return None


# Member-rows x tokens per micro-batch of the CPU path (tuned on a 2-core x86 CPU with all-MiniLM-L6-v2:
# ~2-3k keeps the activations cache-sized and the XLA temp buffers small; see `make_stacked_eval_fn`).
CPU_CHUNK_TOKENS = 2560


def resolve_chunk_tokens(chunk_tokens: int | None | str) -> int | None:
    """`chunk_tokens` of `make_stacked_eval_fn`, with "auto" resolved: `CPU_CHUNK_TOKENS` on CPU, else None."""
    if chunk_tokens == "auto":
        return CPU_CHUNK_TOKENS if jax.default_backend() == "cpu" else None
    return chunk_tokens


def rows_per_chunk(k: int, batch: int, tokens_per_row: int, chunk_tokens: int | None) -> int:
    """Rows per micro-batch: the largest divisor r of `batch` with `k * r * tokens_per_row <= chunk_tokens` (>= 1)."""
    if chunk_tokens is None:
        return batch
    fits = [r for r in range(1, batch + 1) if batch % r == 0 and k * r * tokens_per_row <= chunk_tokens]
    return max(fits, default=1)


@lru_cache(maxsize=32)
def make_stacked_eval_fn(spec: ModelSpec, chunk_tokens: int | None | str = "auto") -> Callable[[Params, str, dict], jax.Array]:
    """A jitted deterministic `scores(stacked_params, task, batch) -> [K, batch, ...]` (task static).

    `stacked_params` has a leading member axis K on every leaf; the batch (numpy or jax, `[B, L]` ids /
    masks as `train.data.make_batch` gives) is shared by all members. Per member the result equals
    `task_scores(params_k, ...)`: sst `[K, B, 5]`, cfimdb `[K, B, 2]`, para / sts `[K, B]`.

    The members are `jax.vmap`ped. `chunk_tokens` (default "auto": `CPU_CHUNK_TOKENS` on the CPU backend,
    None elsewhere) splits the batch rows into micro-batches of r rows (`rows_per_chunk`: K * r * tokens
    per row <= chunk_tokens), run by a `lax.map` inside the same jitted call. On CPU the un-chunked
    vmapped program is slower than K sequential calls (its [K, B*L, ...] activations need K times the
    memory: page faults on fresh >32 MB buffers, cache misses, and XLA:CPU's batched dot is slower per
    flop than its plain dot); micro-batches reuse one small buffer set. Measured on 2 CPU cores
    (ensemble/timing.py): un-chunked 1.17-1.28x the sequential time, micro-batched 0.72-0.90x -- but the
    members run one after another *in the same micro-batches* are faster still (the gain is the
    micro-batching; vmap itself is ~1.1-1.2x on CPU). On an accelerator the plain vmap is the point.
    Cached per (spec, chunk_tokens), so equal specs share one jit cache.
    """
    chunk_tokens = resolve_chunk_tokens(chunk_tokens)

    def vmapped(stacked: Params, task: str, batch: dict) -> jax.Array:
        return jax.vmap(lambda p: task_scores(p, spec.bert, spec.heads, task, batch, None))(stacked)

    @partial(jax.jit, static_argnums=(1,))
    def scores(stacked: Params, task: str, batch: dict) -> jax.Array:
        k = jax.tree.leaves(stacked)[0].shape[0]
        ids = batch["input_ids"] if "input_ids" in batch else batch["input_ids_1"]
        b, length = ids.shape
        r = rows_per_chunk(k, b, length * (1 if "input_ids" in batch else 2), chunk_tokens)
        if r == b:
            return vmapped(stacked, task, batch)
        chunks = jax.tree.map(lambda x: x.reshape(b // r, r, *x.shape[1:]), batch)
        out = jax.lax.map(lambda c: vmapped(stacked, task, c), chunks)  # [B/r, K, r, ...]
        out = jnp.moveaxis(out, 0, 1)
        return out.reshape(k, b, *out.shape[3:])

    return scores


def stacked_predict(eval_fn, stacked: Params, enc: D.Encoded, batch_size: int, buckets: Sequence[int]) -> np.ndarray:
    """Every member's scores on every example of `enc`, in order: `[K, N, ...]` float32."""
    outs = [eval_fn(stacked, enc.task, b) for b in D.eval_batches(enc, batch_size, buckets)]  # async dispatch
    return np.concatenate([np.asarray(o) for o in outs], axis=1)[:, : len(enc)]
