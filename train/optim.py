"""Optimizer factory (optax) reproducing the CS224N minBERT AdamW exactly.

The CS224N reference (``optimizer.py`` of minBERT) does, per step t (from 1)::

    m = b1 m + (1 - b1) g
    v = b2 v + (1 - b2) g^2
    alpha_t = lr * sqrt(1 - b2^t) / (1 - b1^t)        # bias correction
    p = p - alpha_t * m / (sqrt(v) + eps)               # eps on the UNcorrected sqrt(v)
    p = p - lr * wd * p                                 # decoupled decay, separate step

``optax.adamw`` differs in two ways:

1. eps placement: it uses ``m_hat / (sqrt(v_hat) + eps)``; the reference is
   ``m_hat / (sqrt(v_hat) + eps / sqrt(1 - b2^t))`` (a time-dependent eps,
   ~30x larger at t = 1 with b2 = 0.999).
2. decay fusion: it applies ``p - lr * (adam + wd * p)`` as one update. In
   float32, ``lr * wd * p`` (~1e-7 relative) is often below half an ulp of
   ``p``, so the reference's *separate* subtraction rounds it away where the
   fused update does not.

On the CS224N optimizer test (3 -> 2 linear layer, 1000 steps, float32, jitted
JAX) the max abs deviation from the reference weights is: ``optax.adamw``
9.4e-6 (eps placement alone 2.1e-6, decay fusion alone 7.7e-6), which still
passes the course tolerance ``atol=1e-6, rtol=1e-4`` because rtol dominates;
this module's chain 2.4e-7 (the residue is XLA vs. eager float32 rounding).
``tests/test_optim.py`` checks the course tolerance and a tight one.

Chain built by :func:`make_optimizer`::

    [clip_by_global_norm(grad_clip)]      # optional, like clip_grad_norm_ before step
    scale_by_cs224n_adam(b1, b2, eps)     # sqrt(1-b2^t)/(1-b1^t) * m / (sqrt(v) + eps)
    scale_by_learning_rate(schedule)      # * -lr(t)
    [scale_by_tree(lr_scale)]             # optional per-leaf lr multipliers (head lr, layer-wise decay)
    [decoupled_weight_decay(wd, schedule)]  # p1 = p + u; p_new = p1 - lr(t) wd p1; emit p_new - p
    [track_ema(ema_decay)]                # optional, outermost: a moving average of the params (`ema_params`)

With ``trainable_mask`` the non-trainable leaves get exactly zero updates
(``optax.multi_transform`` with ``optax.set_to_zero``) and no optimizer state;
gradient clipping then sees only the trainable leaves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

PyTree = Any

__all__ = ["OptimConfig", "make_schedule", "scale_by_cs224n_adam", "decoupled_weight_decay", "make_optimizer",
           "scale_by_tree", "lr_multipliers", "track_ema", "ema_params", "EmaState"]


@dataclass(frozen=True)
class OptimConfig:
    """The optimizer of a run (the `optim` section of `train.config.TrainConfig`); `build(total_steps)` makes it."""

    lr: float = 1e-5  # peak learning rate
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-6
    warmup_steps: int = 0
    total_steps: int | None = None  # the run's length, given to `build` (never a config key)
    schedule: str = "constant"  # "constant" or "linear" (decay to 0 at total_steps, after warmup)
    grad_clip: float | None = None  # max global grad norm; None = no clipping
    head_lr_scale: float = 1.0  # the heads' learning rate is lr * head_lr_scale
    layer_lr_decay: float = 1.0  # layer-wise lr decay: encoder layer l of L gets lr * decay ** (L - 1 - l)
    ema_decay: float = 0.0  # > 0: keep an exponential moving average of the weights (`track_ema`); the run's model

    def build(self, total_steps: int | None = None,
              trainable_mask: PyTree | Callable[[PyTree], PyTree] | None = None) -> optax.GradientTransformation:
        """This optimizer for a run of `total_steps` updates (see `make_optimizer`); the lr multipliers
        (`head_lr_scale`, `layer_lr_decay`) apply to the multitask params tree `{"bert": ..., "heads": ...}`."""
        scale = None
        if self.head_lr_scale != 1.0 or self.layer_lr_decay != 1.0:
            scale = lambda tree: lr_multipliers(tree, self.head_lr_scale, self.layer_lr_decay)
        return make_optimizer(replace(self, total_steps=total_steps), trainable_mask, lr_scale=scale)


def make_schedule(cfg: OptimConfig) -> optax.Schedule:
    """Learning rate as a function of the step count (0 for the first update).

    Warmup (if any) is linear from 0 to ``cfg.lr`` over ``warmup_steps``
    (same as HF ``get_linear_schedule_with_warmup``); ``"linear"`` then decays
    linearly to exactly 0 at ``total_steps`` and stays 0 afterwards.
    """
    if cfg.schedule not in ("constant", "linear"):
        raise ValueError(f"unknown schedule {cfg.schedule!r} (expected 'constant' or 'linear')")
    if cfg.warmup_steps < 0:
        raise ValueError("warmup_steps must be >= 0")
    if cfg.schedule == "linear":
        if cfg.total_steps is None:
            raise ValueError("schedule='linear' needs total_steps")
        if cfg.total_steps < cfg.warmup_steps:
            raise ValueError("total_steps must be >= warmup_steps")
        main = optax.linear_schedule(cfg.lr, 0.0, max(cfg.total_steps - cfg.warmup_steps, 1))
    else:
        main = optax.constant_schedule(cfg.lr)
    if cfg.warmup_steps == 0:
        return main
    warmup = optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
    return optax.join_schedules([warmup, main], [cfg.warmup_steps])


def scale_by_cs224n_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6) -> optax.GradientTransformation:
    """Adam direction in the CS224N / Kingma-Ba "efficient" form.

    Returns ``sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)`` (to be scaled
    by ``-lr``); moments are kept in float32 whatever the parameter dtype.
    """

    def init_fn(params):
        zeros = lambda p: jnp.zeros(jnp.shape(p), jnp.float32)
        return optax.ScaleByAdamState(
            count=jnp.zeros([], jnp.int32),
            mu=jax.tree_util.tree_map(zeros, params),
            nu=jax.tree_util.tree_map(zeros, params),
        )

    def update_fn(updates, state, params=None):
        del params
        mu = jax.tree_util.tree_map(lambda m, g: b1 * m + (1.0 - b1) * g.astype(jnp.float32), state.mu, updates)
        nu = jax.tree_util.tree_map(
            lambda v, g: b2 * v + (1.0 - b2) * jnp.square(g.astype(jnp.float32)), state.nu, updates
        )
        count = optax.safe_int32_increment(state.count)
        t = count.astype(jnp.float32)
        # 1 - b^t as -expm1(t log b): float32 `1 - b2**t` loses ~1e-5 relative
        # accuracy at small t (b2 = 0.999 is not exact in float32); on the CS224N
        # test that would cost 2.1e-6 max abs error after 1000 steps (vs 2.4e-7).
        bc1 = -jnp.expm1(t * math.log(b1))
        bc2 = -jnp.expm1(t * math.log(b2))
        step = jnp.sqrt(bc2) / bc1
        new_updates = jax.tree_util.tree_map(
            lambda m, v, g: (step * m / (jnp.sqrt(v) + eps)).astype(g.dtype), mu, nu, updates
        )
        return new_updates, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


def decoupled_weight_decay(
    weight_decay: float,
    learning_rate: float | optax.Schedule,
    mask: PyTree | Callable[[PyTree], PyTree] | None = None,
) -> optax.GradientTransformation:
    """Last link of the chain: the CS224N decoupled decay, applied exactly as there.

    Given the (already lr-scaled) Adam update ``u`` it returns ``p_new - p`` with::

        p1    = p + u
        p_new = p1 - lr(t) * wd * p1

    computed in the parameter dtype. Applied with ``optax.apply_updates`` this
    gives ``p_new`` bit for bit (``p_new - p`` is exact by Sterbenz's lemma as
    long as ``p_new`` is within a factor 2 of ``p``, i.e. always in practice).
    Why not simply ``u - lr * wd * p``: ``lr * wd * p`` (~1e-7 relative) is
    below half an ulp of ``p`` for many values, so the reference's separate
    subtraction rounds it away where a fused single update does not; on the
    CS224N test that alone moves the weights by ~8e-6 after 1000 steps.
    """

    def init_fn(params):
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("decoupled_weight_decay needs params (pass them to update)")
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        decay = jnp.asarray(lr, jnp.float32) * weight_decay

        def one(u, p):
            p1 = (p + u).astype(p.dtype)
            p_new = (p1 - (decay * p1).astype(p.dtype)).astype(p.dtype)
            return (p_new - p).astype(u.dtype)

        new_updates = jax.tree_util.tree_map(one, updates, params)
        return new_updates, optax.ScaleByScheduleState(count=optax.safe_int32_increment(state.count))

    tx = optax.GradientTransformation(init_fn, update_fn)
    return tx if mask is None else optax.masked(tx, mask)


def scale_by_tree(multipliers: PyTree | Callable[[PyTree], PyTree]) -> optax.GradientTransformation:
    """Multiply each update leaf by a fixed per-leaf float (a tree like the params, or ``params -> tree``):
    per-parameter learning-rate multipliers when placed after ``scale_by_learning_rate``."""

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        m = multipliers(updates) if callable(multipliers) else multipliers
        return jax.tree.map(lambda u, k: (u * k).astype(u.dtype), updates, m), state

    return optax.GradientTransformation(init_fn, update_fn)


class EmaState(NamedTuple):
    ema: PyTree  # float32, the params' shapes


def track_ema(decay: float) -> optax.GradientTransformation:
    """Keep an exponential moving average of the params after each update, ``ema = decay * ema + (1 - decay) *
    (p + u)`` from ``ema = p`` at init (Polyak averaging; no bias correction is needed from that start). The
    updates pass through unchanged; :func:`ema_params` reads the average from the optimizer state. Placed
    last in the chain, ``p + u`` is the new params exactly as ``optax.apply_updates`` makes them."""
    if not 0.0 < decay < 1.0:
        raise ValueError(f"ema_decay must be in (0, 1), got {decay}")

    def init_fn(params):
        return EmaState(ema=jax.tree.map(lambda p: jnp.array(p, dtype=jnp.float32, copy=True), params))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("track_ema needs params (pass them to update)")
        new = lambda e, p, u: decay * e + (1.0 - decay) * (p + u).astype(p.dtype).astype(jnp.float32)
        return updates, EmaState(ema=jax.tree.map(new, state.ema, params, updates))

    return optax.GradientTransformation(init_fn, update_fn)


def ema_params(opt_state: PyTree) -> PyTree | None:
    """The moving average kept by :func:`track_ema` in an optimizer state, or None when there is none."""
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, EmaState)) if isinstance(s, EmaState)]
    if len(found) > 1:
        raise ValueError("more than one moving average in the optimizer state")
    return found[0].ema if found else None


def lr_multipliers(params: PyTree, head_scale: float = 1.0, layer_decay: float = 1.0) -> PyTree:
    """Learning-rate multipliers for the multitask tree ``{"bert": ..., "heads": ...}``.

    Heads: ``head_scale``. Encoder (layer-wise decay, as ELECTRA / "How to fine-tune BERT"): with L layers,
    ``encoder/layer_l`` gets ``layer_decay ** (L - 1 - l)`` (the top layer 1), the embeddings
    ``layer_decay ** L``, the pooler 1.
    """
    layers = [k for k in params["bert"].get("encoder", {}) if k.startswith("layer_")]
    n = len(layers)

    def bert_scale(top: str, sub: str | None) -> float:
        if top == "embeddings":
            return layer_decay ** n
        if top == "encoder" and sub is not None and sub.startswith("layer_"):
            return layer_decay ** (n - 1 - int(sub[len("layer_"):]))
        return 1.0

    bert = {top: jax.tree_util.tree_map_with_path(
                lambda path, _, top=top: bert_scale(top, getattr(path[0], "key", None) if path else None), sub)
            for top, sub in params["bert"].items()}
    return {"bert": bert, "heads": jax.tree.map(lambda _: head_scale, params["heads"])}


def make_optimizer(
    cfg: OptimConfig,
    trainable_mask: PyTree | Callable[[PyTree], PyTree] | None = None,
    *,
    weight_decay_mask: PyTree | Callable[[PyTree], PyTree] | None = None,
    lr_scale: PyTree | Callable[[PyTree], PyTree] | None = None,
) -> optax.GradientTransformation:
    """CS224N AdamW (exact) with optional schedule, clipping and freezing.

    ``trainable_mask``: pytree of bools matching the params (or a callable
    ``params -> such a pytree``); ``False`` leaves are frozen (zero updates,
    no optimizer state). ``weight_decay_mask``: optional mask (``True`` = decay)
    restricting weight decay; the CS224N reference decays every parameter,
    which is the default here. ``lr_scale``: optional per-leaf learning-rate
    multipliers (see :func:`lr_multipliers`; weight decay keeps the base rate).
    ``update`` must be given the params.
    """
    schedule = make_schedule(cfg)
    parts = []
    if cfg.grad_clip is not None:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip))
    parts.append(scale_by_cs224n_adam(cfg.b1, cfg.b2, cfg.eps))
    parts.append(optax.scale_by_learning_rate(schedule))
    if lr_scale is not None:
        parts.append(scale_by_tree(lr_scale))
    if cfg.weight_decay:
        parts.append(decoupled_weight_decay(cfg.weight_decay, schedule, mask=weight_decay_mask))
    tx = optax.chain(*parts)

    if trainable_mask is not None:
        def labels(params):
            mask = trainable_mask(params) if callable(trainable_mask) else trainable_mask
            return jax.tree_util.tree_map(lambda m: "train" if bool(m) else "freeze", mask)

        tx = optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)
    return tx if not cfg.ema_decay else optax.chain(tx, track_ema(cfg.ema_decay))
