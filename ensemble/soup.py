"""Weight-space ensembles ("model soups", Wortsman et al. 2022): averages of the params of same-architecture runs.

Averaging params only makes sense for runs fine-tuned from the same pretrained checkpoint (they stay in
one loss basin); that cannot be checked here, the architecture can: the runs must have the same
`eval_spec` and identically shaped param trees (else `StructureError` naming the first difference).

  uniform soup  mean of all the ingredients' params
  greedy soup   ingredients sorted by their own dev overall (best first); starting from the best, each
                next one is kept if the soup with it scores a dev overall >= the best so far, else left
                out (and the next one is tried) -- the greedy soup of Wortsman et al.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from bert_jax import Params
from ensemble.stack import StructureError, check_same_structure, eval_spec, spec_difference
from train.step import ModelSpec


def check_compatible(specs: Sequence[ModelSpec], names: Sequence[str]) -> None:
    """Raise `StructureError` when two ingredients compute different functions (e.g. cosine vs pair head)."""
    for spec, name in zip(specs[1:], names[1:]):
        diff = spec_difference(eval_spec(specs[0]), eval_spec(spec))
        if diff is not None:
            raise StructureError(f"cannot average {names[0]} and {name}: different model ({diff})")


def uniform_soup(trees: Sequence[Params], names: Sequence[str] | None = None) -> Params:
    """Leaf-wise mean of the trees (float32 accumulation of float32 params)."""
    check_same_structure(trees, names)
    n = len(trees)
    return jax.tree.map(lambda *xs: sum(jnp.asarray(x, jnp.float32) for x in xs) / n, *trees)


def greedy_soup(
    trees: Sequence[Params],
    dev_overall: Callable[[Params], float],
    scores: Sequence[float] | None = None,
    names: Sequence[str] | None = None,
) -> tuple[Params, list[int], list[dict]]:
    """Greedy soup. `dev_overall(params)` scores one model; `scores` are the ingredients' own scores
    (computed with `dev_overall` when None).

    Returns (soup params, indices of the kept ingredients in the order added, history) where history has
    one entry per tried ingredient: {"index", "overall" (soup with it), "kept"}.
    """
    check_same_structure(trees, names)
    if scores is None:
        scores = [dev_overall(t) for t in trees]
    order = sorted(range(len(trees)), key=lambda i: -scores[i])
    kept = [order[0]]
    best = float(scores[order[0]])
    history = [{"index": order[0], "overall": best, "kept": True}]
    for i in order[1:]:
        s = float(dev_overall(uniform_soup([trees[j] for j in kept + [i]])))
        ok = s >= best
        history.append({"index": i, "overall": s, "kept": ok})
        if ok:
            kept.append(i)
            best = s
    return uniform_soup([trees[j] for j in kept]), kept, history


__all__ = ["StructureError", "check_compatible", "greedy_soup", "uniform_soup"]
