"""The multitask model (shared BERT + heads), the jitted train step, and the jitted eval call.

Params are `{"bert": encoder tree, "heads": {task: head tree}}`. One step consumes one batch of every
active task (round robin) and combines the task losses by `sum`, `mean` or PCGrad — the latter as
per-task `jax.grad` plus the projection of the shared (encoder) gradients, inside the same jit.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

import bert_jax
from bert_jax import BertConfig, Params
from train import combine as combine_methods
from train.compilation import StoredProgram
from train.config import TrainConfig
from train.heads import HeadConfig, init_heads, task_outputs, task_scores
from train.losses import in_batch_ranking, task_loss
from train.sharding import DataParallel

Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The static (hashable) description of a multitask model."""

    bert: BertConfig
    heads: HeadConfig


class TrainState(NamedTuple):
    params: Params
    opt_state: optax.OptState
    step: jax.Array  # int32 scalar
    method_state: Any = ()  # the gradient-combination method's state (`train.combine`); () when it has none


def model_spec(cfg: TrainConfig, bert: BertConfig) -> ModelSpec:
    return ModelSpec(bert=cfg.model.build(bert), heads=cfg.heads)


def init_model(cfg: TrainConfig, rng: jax.Array, pretrained: tuple[BertConfig, Params] | None = None
               ) -> tuple[ModelSpec, Params]:
    """Pretrained encoder from `cfg.checkpoint` (or `pretrained`, already loaded) + freshly initialised heads."""
    bert, bert_params = pretrained if pretrained is not None else bert_jax.load_pretrained(cfg.checkpoint)
    spec = model_spec(cfg, bert)
    return spec, {"bert": bert_params, "heads": init_heads(spec.heads, bert.hidden_size, rng)}


def optimizer(cfg: TrainConfig, total_steps: int | None = None) -> optax.GradientTransformation:
    """`cfg.optim` built for `total_steps`; a frozen-encoder run (`finetune=False`) trains the heads only."""
    mask = None if cfg.finetune else (lambda params: {"bert": jax.tree.map(lambda _: False, params["bert"]),
                                                      "heads": jax.tree.map(lambda _: True, params["heads"])})
    return cfg.optim.build(total_steps, mask)


def optimizer_key(cfg: TrainConfig, total_steps: int | None = None) -> str:
    """Everything `optimizer(cfg, total_steps)` is built from, stated fully: the key of the split step's stored
    update program (`make_split_train_step(tx_key=...)`), whose optimizer is a closure the store cannot see."""
    return repr((dataclasses.replace(cfg.optim, total_steps=total_steps), cfg.finetune))


def init_state(params: Params, tx: optax.GradientTransformation, combine: str = "sum",
               n_tasks: int | None = None) -> TrainState:
    """The state before the first step; `combine` (with `n_tasks` trained tasks): a method with state
    initializes its slot."""
    method = combine_methods.get(combine)
    method_state = () if method.init_state is None else method.init_state(params, n_tasks)
    return TrainState(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32), method_state=method_state)


def loss_fn(params: Params, spec: ModelSpec, task: str, batch: Batch, rng: jax.Array | None) -> jax.Array:
    """`task`'s training loss on `batch`: its head's loss, plus the in-batch ranking term where it applies
    (`HeadConfig.ranks`)."""
    scores, pair = task_outputs(params, spec.bert, spec.heads, task, batch, rng)
    loss = task_loss(task, scores, batch, spec.heads.kind(task))
    if pair is not None and spec.heads.ranks(task):
        loss = loss + spec.heads.ranking_weight * in_batch_ranking(*pair, batch["labels"], batch["valid"],
                                                                   spec.heads.ranking_scale)
    return loss


def task_keys(rng: jax.Array, step: jax.Array, tasks: tuple[str, ...]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The step's key and each task's dropout key (one derivation for the fused and the split step)."""
    rng = jax.random.fold_in(rng, step)
    return rng, {t: jax.random.fold_in(rng, i) for i, t in enumerate(tasks)}


def combine_and_update(tx: optax.GradientTransformation, combine: str, pcgrad_reduction: str, state: TrainState,
                       losses: dict[str, jax.Array], task_grads: list[Params], step_rng: jax.Array):
    """Combine per-task gradients (the registered method `combine`, see `train.combine`), apply the optimizer,
    return (state, metrics)."""
    method = combine_methods.get(combine)
    args = (task_grads, jax.random.fold_in(step_rng, 1_000_003), {"pcgrad_reduction": pcgrad_reduction})
    if method.init_state is None:
        grads, method_state = method.combine(*args), state.method_state
    else:
        grads, method_state = method.combine(*args, state.method_state)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {**{f"loss_{t}": l for t, l in losses.items()}, "loss": sum(losses.values()), "grad_norm": optax.tree.norm(grads)}
    return TrainState(params, opt_state, state.step + 1, method_state), metrics


def make_split_train_step(
    spec: ModelSpec,
    tx: optax.GradientTransformation,
    tasks: tuple[str, ...],
    combine: str = "sum",
    pcgrad_reduction: str = "sum",
    finetune: bool = True,
    tx_key: str | None = None,
) -> Callable[[TrainState, dict[str, Batch], jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
    """The train step as per-task programs plus one combine-and-update program (`step_impl="split"`).

    Same signature and math as `make_train_step`'s fused step, but compiled as
    `grad(task)`: one task's loss and gradient at one batch shape, jitted per (task, bucket length), and
    `update`: combine (sum / mean / PCGrad) + AdamW, jitted once (its shapes never change; the state is
    donated). A run compiles at most `tasks x buckets + 1` programs, where the fused step compiles
    one per combination of the tasks' bucket lengths (up to `buckets ** tasks`). Dropout keys are the fused
    step's, so both give the same parameters up to float32 summation order.

    `tx_key`: `optimizer_key(cfg, total_steps)` of the config `tx` was built from; given, `update` is a
    `StoredProgram` too (a second run loads it without tracing), keyed by it with the tasks and the method.
    """

    def update(state: TrainState, losses: dict[str, jax.Array], task_grads: list[Params], rng: jax.Array):
        step_rng, _ = task_keys(rng, state.step, tasks)
        return combine_and_update(tx, combine, pcgrad_reduction, state, losses, task_grads, step_rng)

    update_fn = jax.jit(update, donate_argnums=(0,))
    if tx_key is not None:
        update_fn = StoredProgram(update_fn, "update", salt=repr((tx_key, tasks, combine, pcgrad_reduction)))

    def step(state: TrainState, batches: dict[str, Batch], rng: jax.Array):
        losses, grads = {}, []
        for t in tasks:
            losses[t], g = _task_grad(state.params, batches[t], rng, state.step, spec=spec, task=t, tasks=tasks,
                                      finetune=finetune)
            grads.append(g)
        return update_fn(state, losses, grads, rng)

    def prepare(state: TrainState, examples: dict[str, list[Batch]], rng: jax.Array) -> int:
        """Load (or compile) the programs of the steps whose batches have the shapes of `examples` (task -> one
        batch per shape, `Schedule.shape_examples`) without running a step; returns how many are ready. With
        the executable store off this does nothing (each program compiles on its first call)."""
        ready, outs = 0, {}
        for t in tasks:
            for b in examples.get(t, ()):
                compiled = _task_grad.prepare(state.params, b, rng, state.step, spec=spec, task=t, tasks=tasks,
                                              finetune=finetune)
                if compiled is not None:
                    ready, outs[t] = ready + 1, compiled.out_info  # (loss, gradient), abstract
        if isinstance(update_fn, StoredProgram) and len(outs) == len(tasks):
            losses = {t: outs[t][0] for t in tasks}
            ready += update_fn.prepare(state, losses, [outs[t][1] for t in tasks], rng) is not None
        return ready

    step.programs = (_task_grad, update_fn)  # for inspection (tests, compile accounting)
    step.prepare = prepare
    return step


def trained_params(params: Params, finetune: bool) -> Params:
    """`params` as the loss sees them: the encoder behind a stop-gradient unless `finetune`."""
    return params if finetune else {"bert": jax.lax.stop_gradient(params["bert"]), "heads": params["heads"]}


def task_value_and_grad(params: Params, spec: ModelSpec, task: str, tasks: tuple[str, ...], batch: Batch,
                        rng: jax.Array, step: jax.Array, finetune: bool) -> tuple[jax.Array, Params]:
    """(loss, gradient) of one task's batch with the step's dropout key for `task` (un-jitted: the split step's
    per-task program, and a split population's per member)."""
    _, keys = task_keys(rng, step, tasks)
    return jax.value_and_grad(lambda p: loss_fn(trained_params(p, finetune), spec, task, batch, keys[task]))(params)


@functools.partial(jax.jit, static_argnames=("spec", "task", "tasks", "finetune"))
def _task_grad_jit(params: Params, batch: Batch, rng: jax.Array, step: jax.Array, *, spec: ModelSpec, task: str,
                   tasks: tuple[str, ...], finetune: bool) -> tuple[jax.Array, Params]:
    """(loss, gradient) of one task's batch: the split step's per-task program. Module level, so every split
    step of the process (sum, mean, PCGrad; any optimizer) shares its compiled programs per (spec, task, shape)."""
    return task_value_and_grad(params, spec, task, tasks, batch, rng, step, finetune)


# its executables persist across processes (train.compilation): a second run loads them without tracing
_task_grad = StoredProgram(_task_grad_jit, "task_grad")


def make_train_step(
    spec: ModelSpec,
    tx: optax.GradientTransformation,
    tasks: tuple[str, ...],
    combine: str = "sum",
    pcgrad_reduction: str = "sum",
    finetune: bool = True,
    dp: DataParallel | None = None,
    impl: str = "fused",
    tx_key: str | None = None,
) -> Callable[[TrainState, dict[str, Batch], jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
    """A jitted `step(state, batches, rng) -> (state, metrics)`; `state` is donated.

    `batches` maps every task in `tasks` to one batch. `metrics` holds each task's loss and `loss`
    (the sum of the task losses), plus `grad_norm` of the applied gradient.

    `impl="fused"`: one program for the whole step (one compile per combination of the tasks' batch
    shapes); `impl="split"`: `make_split_train_step` (per-task programs; single device only; `tx_key` as there).

    With `dp` (see `train.sharding`) the step is jitted over its mesh with explicit shardings: `state`
    must already be placed (`dp.put(state)`), `batches` are global numpy batches (every process passes
    the same; each batch size divisible by the mesh size), split by rows over the `data` axis; metrics
    are replicated. The math is the single-device step's on the global batch.
    """

    if impl == "split":
        if dp is not None:
            raise ValueError("step_impl='split' runs on one device; use step_impl=fused with --mesh")
        return make_split_train_step(spec, tx, tasks, combine, pcgrad_reduction, finetune, tx_key)
    if impl != "fused":
        raise ValueError(f"step_impl must be 'fused' or 'split', got {impl!r}")
    step = fused_step(spec, tx, tasks, combine, pcgrad_reduction, finetune, gather=None if dp is None else dp.gather)
    if dp is None:
        return jax.jit(step, donate_argnums=(0,))
    return _sharded_step(step, dp)


def fused_step(
    spec: ModelSpec,
    tx: optax.GradientTransformation,
    tasks: tuple[str, ...],
    combine: str = "sum",
    pcgrad_reduction: str = "sum",
    finetune: bool = True,
    gather: Callable[[Params], Params] | None = None,
    loss_weight: jax.Array | float | None = None,
) -> Callable[[TrainState, dict[str, Batch], jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
    """The fused step as a plain (un-jitted) `step(state, batches, rng) -> (state, metrics)`: `make_train_step`
    jits it, `train.population` vmaps it over a population's members.

    `gather`: FSDP all-gather of the weights before compute. `loss_weight`: the weight of the summed task
    losses of a linear method (default: the registered method's, 1 for sum, 1/tasks for mean); a population
    passes each member's as an array.
    """
    method = combine_methods.get(combine)
    weight = None if method.loss_weight is None else (method.loss_weight(len(tasks)) if loss_weight is None else loss_weight)

    def frozen(params: Params) -> Params:
        return trained_params(params if gather is None else gather(params), finetune)

    def one_task(params, task, batch, rng):
        return loss_fn(frozen(params), spec, task, batch, rng)

    def step(state: TrainState, batches: dict[str, Batch], rng: jax.Array):
        rng, keys = task_keys(rng, state.step, tasks)
        if weight is not None:  # a linear method: one gradient of the weighted loss sum
            def total(params):
                losses = {t: one_task(params, t, batches[t], keys[t]) for t in tasks}
                return weight * sum(losses.values()), losses

            (_, losses), grads = jax.value_and_grad(total, has_aux=True)(state.params)
            # the loss was already combined: hand the update one "task" gradient to sum
            return combine_and_update(tx, "sum", pcgrad_reduction, state, losses, [grads], rng)
        losses, task_grads = {}, []
        for t in tasks:
            losses[t], g = jax.value_and_grad(one_task)(state.params, t, batches[t], keys[t])
            task_grads.append(g)
        return combine_and_update(tx, combine, pcgrad_reduction, state, losses, task_grads, rng)

    return step


def _sharded_step(step: Callable, dp: DataParallel) -> Callable:
    """`step` jitted over `dp.mesh`; the state shardings are read off the first state it is given."""
    jitted: dict[str, Callable] = {}
    rng_cache: list = []  # (rng, placed rng): the trainer passes the same key every step

    def call(state: TrainState, batches: dict[str, Batch], rng: jax.Array):
        if "fn" not in jitted:
            st = dp.shardings(state)
            jitted["fn"] = jax.jit(step, in_shardings=(st, dp.batch, dp.replicated),
                                   out_shardings=(st, dp.replicated), donate_argnums=(0,))
        if not rng_cache or rng_cache[0][0] is not rng:
            rng_cache[:] = [(rng, dp.put(rng, dp.replicated))]
        return jitted["fn"](state, {t: dp.put_batch(b) for t, b in batches.items()}, rng_cache[0][1])

    call.jitted = jitted  # for inspection (tests): jitted["fn"] once called
    return call


@functools.partial(jax.jit, static_argnames=("spec", "task"))
def _scores_jit(params: Params, batch: Batch, *, spec: ModelSpec, task: str) -> jax.Array:
    """Deterministic scores of one task's batch (the dev-set scorer of a single-device run)."""
    return task_scores(params, spec.bert, spec.heads, task, batch, None)


_scores = StoredProgram(_scores_jit, "scores")


def make_eval_fn(spec: ModelSpec, dp: DataParallel | None = None) -> Callable[[Params, str, Batch], jax.Array]:
    """A jitted deterministic `scores(params, task, batch)` (task is static).

    On one device its executables are `train.compilation.StoredProgram`s (one per task and batch shape).
    With `dp`, `params` must be placed on its mesh (`dp.put(params)`) and `batch` is a global numpy batch
    of any size (padded internally to a multiple of the mesh size); scores are replicated.
    """

    if dp is None:
        def single(params: Params, task: str, batch: Batch) -> jax.Array:
            return _scores(params, batch, spec=spec, task=task)

        # AOT, like a jitted function's: `.lower(params, task, batch).compile()` is then called as `(params, batch)`
        single.lower = lambda params, task, batch: _scores_jit.lower(params, batch, spec=spec, task=task)
        # load (or compile) the executable of a batch of this shape without scoring it (StoredProgram.prepare)
        single.prepare = lambda params, task, batch: _scores.prepare(params, batch, spec=spec, task=task)
        return single

    def scores(params: Params, task: str, batch: Batch) -> jax.Array:
        return task_scores(dp.gather(params), spec.bert, spec.heads, task, batch, None)

    jitted = jax.jit(scores, static_argnums=(1,), out_shardings=dp.replicated)

    def call(params: Params, task: str, batch: Batch) -> jax.Array:
        padded, n = dp.pad_batch(batch)
        out = jitted(params, task, dp.put_batch(padded))
        return out if n == len(out) else out[:n]

    return call
