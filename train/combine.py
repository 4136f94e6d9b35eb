"""Gradient-combination methods: how one train step turns the per-task gradients into the update.

Each method is one registered `CombineMethod`; `TrainConfig.combine` names one (an unknown name fails at
config load, listing the known ones). A new method (CAGrad, GradNorm, ...) is one module that calls
`register(CombineMethod(...))`, imported below so that the registry always holds it.

Gradients are pytrees `{"bert": encoder, "heads": {task: head}}`, one per task in `tasks` order.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax

from bert_jax import Params
from train import pcgrad
from train.registry import Registry


@dataclasses.dataclass(frozen=True)
class CombineMethod:
    """`combine(task_grads, key, options) -> grads`: the update gradient from the per-task gradients (`key`: a
    PRNG key for methods with randomness, e.g. PCGrad's task order; `options`: the config's method options,
    e.g. `pcgrad_reduction`). `loss_weight(n_tasks)`: for a linear method (a fixed weight per task loss),
    that weight, so a fused step can differentiate `sum_t w * loss_t` once instead of once per task; None for a
    method that needs each task's gradient.

    A method with state across steps (GradNorm's task weights, running statistics) sets
    `init_state(params, n_tasks) -> state` (a pytree of arrays); its `combine` then takes the state as a
    fourth argument and returns `(grads, new_state)`. The state lives in `TrainState.method_state`, so it
    is checkpointed and restored with the run (a stateless method's slot is empty, and not saved)."""

    name: str
    combine: Callable[..., Any]
    loss_weight: Callable[[int], float] | None = None
    doc: str = ""
    init_state: Callable[[Params, int], Any] | None = None

    def __post_init__(self) -> None:
        if self.init_state is not None and self.loss_weight is not None:
            raise ValueError(f"combine method {self.name!r}: a method with state is not a fixed linear "
                             f"weighting (set loss_weight=None)")


COMBINE_METHODS: Registry[CombineMethod] = Registry(
    "combine method", lambda name, known: f"combine must be one of {sorted(known)}, got {name!r}")
register = COMBINE_METHODS.register
get = COMBINE_METHODS.lookup  # the registered method `name`; an unknown name is a ValueError listing the known ones


def tree_sum(trees: Sequence[Params]) -> Params:
    return jax.tree.map(lambda *xs: sum(xs), *trees)


def _sum(task_grads, key, options):
    return tree_sum(task_grads)


def _mean(task_grads, key, options):
    return jax.tree.map(lambda g: g / len(task_grads), tree_sum(task_grads))


def _pcgrad(task_grads, key, options):
    shared = pcgrad.combine([g["bert"] for g in task_grads], key, options.get("pcgrad_reduction", "sum"))
    # each head only appears in its own task's loss, so the sum over tasks is that task's gradient
    return {"bert": shared, "heads": tree_sum([g["heads"] for g in task_grads])}


register(CombineMethod("sum", _sum, loss_weight=lambda n: 1.0, doc="sum of the task gradients (= gradient of the summed losses)"))
register(CombineMethod("mean", _mean, loss_weight=lambda n: 1.0 / n, doc="mean of the task gradients"))
register(CombineMethod("pcgrad", _pcgrad, doc="gradient surgery on the shared encoder (Yu et al. 2020); heads summed"))
