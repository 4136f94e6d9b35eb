"""Populations: K runs of one architecture trained as one program, a `jax.vmap`ped step over stacked states.

Members differ only in `MEMBER_FIELDS`: the learning rate, the hidden dropout rate, the seed and the loss
combination, where it is linear (`sum` vs `mean` is a per-member weight of the summed losses; a non-linear
method such as PCGrad is shared by every member). Everything else (tasks, heads, shapes, schedule, batch
sizes, data) is one config. The per-member values are arrays `[K]` (`Hyper`), the training state is a
`TrainState` whose every leaf has a leading member axis `[K, ...]`, and the step is
`train.step.fused_step` vmapped over both: one compiled program per batch shape for the whole population.

Data: every member sees the same batches, in the data order of `data_seed` (by default the first member's
seed); a member's seed sets its head initialisation and its dropout masks. Each member's `config.yaml`
records that `data_seed`, so `bert-jax train` with a member's config trains that member alone, to the same
parameters (up to float32 summation order; tests/test_population.py checks ≤ 1e-5).

Every member writes an ordinary run directory (config.yaml, checkpoints/, best/, metrics.jsonl), so
`evaluate`, `predict`, `ensemble` and `soup` read members like any run. All members are checkpointed at
the same steps (epoch ends, and on SIGINT / SIGTERM); `resume` restores the latest step they all have.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import math
import time
from pathlib import Path
from typing import Any, Callable, Literal, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import yaml

import bert_jax
from bert_jax import BertConfig
from bert_jax.tokenizer import tokenizer_files
from train import combine as combine_methods
from train import data as D
from train.checkpoint import METRICS, Checkpointer, DevScores, RunError, append_metrics, has_steps, write_run_files
from train.compilation import CompileEvents, frozen_heap
from train.config import TrainConfig, canonical_key
from train.loop import Loop, StepInfo, StepMetrics, StepRate, data_position, eval_due, first_non_finite
from train.rundir import RunLock, check_out_dir, check_tokenizer
from train.step import (TrainState, combine_and_update, fused_step, init_model, init_state, make_eval_fn, model_spec,
                        optimizer, task_keys, task_value_and_grad)
from train.tensorboard import TensorBoard, close_hooks, event_hooks
from train.trainer import (NonFiniteLoss, _all_finite, _check_resume_config, _rewind_metrics, check_position,
                           compile_record, dev_metrics, dev_scores, eval_pending, load_run_data, recorded_best)

MEMBER_FIELDS = ("optim.lr", "model.hidden_dropout", "seed", "combine")
_AXES = ", ".join(k.rpartition(".")[2] for k in MEMBER_FIELDS)  # `--population` names (flat aliases; dotted work too)


class Hyper(NamedTuple):
    """Per-member hyper-parameters, each `[K]`."""

    lr: jax.Array  # peak learning rate (the config's schedule, warm-up and head / layer multipliers apply)
    hidden_dropout: jax.Array
    loss_weight: jax.Array  # weight of the summed task losses (linear methods; 1 for sum, 1/tasks for mean)
    key: jax.Array  # dropout key (the single run's `fold_in(key(seed), 1)`)


def parse_axes(specs: Sequence[str]) -> list[dict[str, Any]]:
    """`["lr=1e-5,2e-5", "seed=0,1"]` -> the members, the cartesian product of the axes (the last varies fastest)."""
    axes: dict[str, list[Any]] = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        if not sep or not values:
            raise ValueError(f"--population {spec!r}: expected FIELD=V1,V2,... (fields: {_AXES})")
        if canonical_key(key) not in MEMBER_FIELDS:
            raise ValueError(f"--population {spec!r}: {key!r} cannot vary within a population; it can vary: "
                             f"{_AXES}")
        if canonical_key(key) in {canonical_key(k) for k in axes}:
            raise ValueError(f"--population: {key!r} is given twice")
        axes[key] = [_value(key, v) for v in values.split(",")]
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


def _value(key: str, text: str) -> Any:
    if canonical_key(key) in ("optim.lr", "model.hidden_dropout"):  # floats (YAML 1.1 would read `1e-5` as a string)
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"--population {key}: {text!r} is not a number") from None
    if key == "seed":
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"--population seed: {text!r} is not an integer") from None
    return yaml.safe_load(text)


def member_name(overrides: dict[str, Any]) -> str:
    """A run directory name for a member: `lr4e-05-seed1` (from `lr` or `optim.lr`)."""
    return "-".join(f"{k.rpartition('.')[2]}{v}" for k, v in overrides.items()) or "member"


def member_configs(base: TrainConfig, members: Sequence[dict[str, Any]]) -> list[TrainConfig]:
    """One config per member: `base` with the member's values, all with the same `data_seed`."""
    if not members:
        raise ValueError("a population needs at least one member")
    first = TrainConfig.from_dict(base.to_dict() | dict(members[0]))
    data_seed = base.data.data_seed if base.data.data_seed is not None else first.seed
    cfgs = [TrainConfig.from_dict(base.to_dict() | dict(m) | {"data_seed": data_seed}) for m in members]
    check_population(cfgs)
    return cfgs


def check_population(cfgs: Sequence[TrainConfig]) -> None:
    """Members may differ in `MEMBER_FIELDS` only, and in the combination method only between linear ones."""
    ref = cfgs[0].flat()
    for i, c in enumerate(cfgs[1:], 1):
        d = c.flat()
        diff = [k for k in ref if k not in MEMBER_FIELDS and ref[k] != d[k]]
        if diff:
            raise ValueError(f"population member {i} differs from member 0 in {diff[0]!r} ({d[diff[0]]!r} vs "
                             f"{ref[diff[0]]!r}); members may differ only in {', '.join(MEMBER_FIELDS)}")
    methods = sorted({c.combine for c in cfgs})
    nonlinear = [m for m in methods if combine_methods.get(m).loss_weight is None]
    if len(methods) > 1 and nonlinear:
        raise ValueError(f"population members combine losses by {methods}: a non-linear method ({nonlinear[0]}) "
                         f"must be shared by every member; only linear ones (a loss weight) may differ")
    for c in cfgs:
        if not 0 <= c.model.hidden_dropout < 1:
            raise ValueError(f"model.hidden_dropout must be in [0, 1), got {c.model.hidden_dropout}")


def hyper(cfgs: Sequence[TrainConfig]) -> Hyper:
    def weight(c: TrainConfig) -> float:
        w = combine_methods.get(c.combine).loss_weight
        return 1.0 if w is None else float(w(len(c.tasks)))

    return Hyper(lr=jnp.asarray([c.optim.lr for c in cfgs], jnp.float32),
                 hidden_dropout=jnp.asarray([c.model.hidden_dropout for c in cfgs], jnp.float32),
                 loss_weight=jnp.asarray([weight(c) for c in cfgs], jnp.float32),
                 key=jnp.stack([jax.random.fold_in(jax.random.key(c.seed), 1) for c in cfgs]))


def stack(trees: Sequence[Any]) -> Any:
    """K pytrees of one structure -> one pytree with a leading member axis `[K, ...]`."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def member(tree: Any, k: int) -> Any:
    """Member `k` of a stacked pytree."""
    return jax.tree.map(lambda x: x[k], tree)


Impl = Literal["vmap", "loop"]
IMPLS: tuple[str, ...] = ("vmap", "loop")


def default_impl() -> Impl:
    """"vmap" (all members side by side in one vmapped program) on an accelerator; "loop" (one compiled member
    program, called once per member) on a CPU, where XLA's batched matmuls of the vmapped step cost 1.28x the K
    plain steps (`bert-jax bench --what population`, README "Populations")."""
    return "loop" if jax.default_backend() == "cpu" else "vmap"


def init_population(states: Sequence[TrainState], impl: Impl) -> Any:
    """The population state a step of `impl` takes: the member states stacked (`[K, ...]` leaves, "vmap"), or a
    list of them ("loop")."""
    if impl == "loop":  # own buffers: members share the loaded encoder arrays, and each member's step donates its own
        return [jax.tree.map(jnp.copy, s) for s in states]
    return stack(states)


def member_state(population: Any, k: int) -> Any:
    """Member `k` of a population state (stacked or a list)."""
    return population[k] if isinstance(population, list) else member(population, k)


def make_population_step(cfg: TrainConfig, bert: BertConfig, total_steps: int, impl: Impl | None = None
                         ) -> Callable[[Any, dict[str, D.Batch], Hyper], tuple[Any, dict[str, jax.Array]]]:
    """`step(population, batches, hyper [K]) -> (population, metrics [K])`; the population state
    (`init_population`) is donated.

    Member k runs `fused_step` with `cfg`'s static settings and its own learning rate, dropout rate, loss
    weight and dropout key, all traced arguments (the model and optimizer accept arrays for them), so one
    compiled program serves every member. `impl` (default `default_impl()`): "vmap" = one jitted `jax.vmap` over
    the stacked member axis; "loop" = the jitted member step called once per member. With
    `cfg.step_impl == "split"` the step is per-task programs plus an update instead (`_split_population_step`).
    """
    impl = default_impl() if impl is None else impl
    if impl not in IMPLS:
        raise ValueError(f"population impl must be one of {IMPLS}, got {impl!r}")
    if cfg.step_impl == "split":
        return _split_population_step(cfg, bert, total_steps, impl)

    def one(state: TrainState, h: Hyper, batches: dict[str, D.Batch]):
        mcfg = _member_config(cfg, h)
        step = fused_step(model_spec(mcfg, bert), optimizer(mcfg, total_steps), cfg.tasks, cfg.combine,
                          cfg.pcgrad_reduction, cfg.finetune, loss_weight=h.loss_weight)
        return step(state, batches, h.key)

    if impl == "vmap":
        return jax.jit(lambda states, batches, hyper: jax.vmap(one, in_axes=(0, 0, None))(states, hyper, batches),
                       donate_argnums=(0,))
    single = jax.jit(one, donate_argnums=(0,))

    def loop(states: list[TrainState], batches: dict[str, D.Batch], hyper: Hyper):
        outs = [single(s, member(hyper, k), batches) for k, s in enumerate(states)]
        return [o[0] for o in outs], stack([o[1] for o in outs])

    return loop


def _member_config(cfg: TrainConfig, h: Hyper) -> TrainConfig:
    """`cfg` with a member's traced learning rate and dropout rate."""
    return dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=h.lr),
                               model=dataclasses.replace(cfg.model, hidden_dropout=h.hidden_dropout))


def _split_population_step(cfg: TrainConfig, bert: BertConfig, total_steps: int, impl: Impl
                           ) -> Callable[[Any, dict[str, D.Batch], Hyper], tuple[Any, dict[str, jax.Array]]]:
    """`make_population_step` with per-task programs (`step_impl="split"`, as `train.step.make_split_train_step`):
    one (loss, gradient) program per task and batch shape, and one combine-and-update program, each jitted once
    for the whole population (vmapped over the members, or called per member by "loop"). A population then
    compiles at most `tasks x buckets + 1` programs where the fused step compiles one per combination of the
    tasks' bucket lengths. A linear method's members weight the summed task gradients by their loss weight (the
    fused step differentiates the weighted loss sum: the same up to float32 summation order)."""
    tasks, method = cfg.tasks, combine_methods.get(cfg.combine)

    def task_grad(params, h: Hyper, batch: D.Batch, step: jax.Array, *, task: str):
        spec = model_spec(_member_config(cfg, h), bert)
        return task_value_and_grad(params, spec, task, tasks, batch, h.key, step, cfg.finetune)

    def update(state: TrainState, h: Hyper, losses: dict[str, jax.Array], grads: list):
        step_rng, _ = task_keys(h.key, state.step, tasks)
        tx = optimizer(_member_config(cfg, h), total_steps)
        if method.loss_weight is not None:  # a linear method: one gradient, the weighted sum
            total = jax.tree.map(lambda *g: h.loss_weight * sum(g), *grads)
            return combine_and_update(tx, "sum", cfg.pcgrad_reduction, state, losses, [total], step_rng)
        return combine_and_update(tx, cfg.combine, cfg.pcgrad_reduction, state, losses, grads, step_rng)

    def member_step(grad_fns, update_fn, state, h: Hyper, batches: dict[str, D.Batch]):
        losses, grads = {}, []
        for t in tasks:
            losses[t], g = grad_fns[t](state.params, h, batches[t], state.step)
            grads.append(g)
        return update_fn(state, h, losses, grads)

    if impl == "vmap":
        grad_fns = {t: jax.jit(jax.vmap(functools.partial(task_grad, task=t), in_axes=(0, 0, None, 0))) for t in tasks}
        update_fn = jax.jit(jax.vmap(update), donate_argnums=(0,))
        return lambda states, batches, hyper: member_step(grad_fns, update_fn, states, hyper, batches)
    grad_fns = {t: jax.jit(functools.partial(task_grad, task=t)) for t in tasks}
    update_fn = jax.jit(update, donate_argnums=(0,))

    def loop(states: list[TrainState], batches: dict[str, D.Batch], hyper: Hyper):
        outs = [member_step(grad_fns, update_fn, s, member(hyper, k), batches) for k, s in enumerate(states)]
        return [o[0] for o in outs], stack([o[1] for o in outs])

    return loop


@dataclasses.dataclass
class _Member:
    """One member's run directory: its checkpointer, best dev overall and metrics file."""

    cfg: TrainConfig
    run: Path
    ckpt: Checkpointer
    best: float = -math.inf
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)

    def record(self, step: int, epoch: int, params, metrics: dict[str, float], extra: dict[str, Any],
               scores: DevScores) -> dict[str, Any]:
        is_best = metrics.get("overall", -math.inf) > self.best
        if is_best:
            self.best = metrics["overall"]
            self.ckpt.save_best(step, params, metrics, scores)
        self.metrics = metrics
        rec = {"step": step, "epoch": epoch, **metrics, "best": is_best, **extra}
        append_metrics(self.run, rec)
        return rec


def train_population(cfgs: Sequence[TrainConfig], runs: Sequence[str | Path], data_dir: str | Path | None,
                     resume: bool = False, log: Callable[[dict[str, Any]], None] = lambda e: None,
                     should_stop: Callable[[], bool] = lambda: False, log_every: int = 20,
                     impl: Impl | None = None, tensorboard: bool = True) -> list[dict[str, Any]]:
    """Train the members `cfgs` (see `member_configs`) into the run directories `runs`, as one vmapped program.

    Log events are `train.trainer.train`'s; step events carry per-member lists (`loss_members`, `loss_<task>`,
    `grad_norm`) and `loss`, their mean; eval events name their `member`.
    Returns one result per member (last dev metrics, `best_overall`, `best_checkpoint`, `step`, `stopped`,
    and the population's `wall_s` / `compile_s`). `impl`: see `make_population_step`. `tensorboard`: each
    member's events also go to its RUN/tensorboard (`train.tensorboard`)."""
    cfgs = [c.resolve_dtype() for c in cfgs]  # `dtype=auto`: this machine's dtype, written to each member's config.yaml
    check_population(cfgs)
    runs = [Path(r) for r in runs]
    if len(runs) != len(cfgs) or len(set(runs)) != len(runs):
        raise ValueError("one distinct run directory per population member is needed")
    with contextlib.ExitStack() as locks:
        for run in runs:
            locks.enter_context(RunLock(run, note=lambda msg: log({"event": "note", "message": msg})))
            check_out_dir(run, resume, overwrite=False)
        return _train(list(cfgs), runs, data_dir, resume, log, should_stop, log_every, impl, tensorboard)


def _train(cfgs: list[TrainConfig], runs: list[Path], data_dir, resume: bool, log, should_stop, log_every: int,
           impl: Impl | None, tensorboard: bool):
    t_start = time.perf_counter()
    cfg = cfgs[0]
    data_dir = D.resolve_data_dir(data_dir)
    for c, run in zip(cfgs, runs):
        if not resume and (has_steps(run / "checkpoints") or has_steps(run / "best")):
            raise RunError(f"{run}: run directory already has checkpoints (use --resume, or a new --out)")
        if resume:
            _check_resume_config(run, c)
            check_tokenizer(run, tokenizer_files(c.checkpoint), c.checkpoint)
    data = load_run_data(cfg, data_dir)
    pretrained = bert_jax.load_pretrained(cfg.checkpoint)
    inits = [init_model(c, jax.random.fold_in(jax.random.key(c.seed), 0), pretrained) for c in cfgs]
    spec = inits[0][0]  # members' specs differ only in the dropout rate, unused by the (deterministic) evaluation
    data.check_vocab(cfg, spec.bert.vocab_size)
    sched, total = data.sched, data.total
    per_epoch = sched.steps_per_epoch
    states = [init_state(p, optimizer(c, total), c.combine, len(c.tasks)) for c, (_, p) in zip(cfgs, inits)]
    for run in runs:
        run.mkdir(parents=True, exist_ok=True)
    members = [_Member(c, run, Checkpointer(run, keep=c.keep_checkpoints)) for c, run in zip(cfgs, runs)]
    try:
        return _loop(cfgs, members, states, data, spec, total, per_epoch, resume, log, should_stop, log_every, t_start,
                     impl, tensorboard)
    finally:
        for m in members:
            m.ckpt.close()


def _restore_members(members: list[_Member], states: list, data, per_epoch: int) -> None:
    """Restore every member's state (in place in `states`) from the latest checkpoint step all members have."""
    if not all(m.ckpt.latest_step() is not None for m in members):
        return
    common = min(m.ckpt.latest_step() for m in members)
    for k, m in enumerate(members):
        if common not in m.ckpt.latest.all_steps():
            raise RunError(f"{m.run}: no checkpoint at step {common}, the latest step every member has; "
                           f"train the population into a new --out")
        states[k], position = m.ckpt.restore_state(states[k], step=common)
        check_position(m.run / "checkpoints" / str(common), position, data.sched.sizes, data.fingerprint, per_epoch)
        m.best = position["best_overall"]


def _loop(cfgs, members: list[_Member], states, data, spec, total: int, per_epoch: int, resume: bool, log, should_stop,
          log_every: int, t_start: float, impl: Impl | None, tensorboard: bool) -> list[dict[str, Any]]:
    if resume:
        _restore_members(members, states, data, per_epoch)
    start = int(states[0].step)
    vocab = bert_jax.resolve_checkpoint(cfgs[0].checkpoint) / "vocab.txt"
    pending_eval = False
    for m in members:
        write_run_files(m.run, m.cfg, spec, vocab)
        last = _rewind_metrics(m.run / METRICS, start)
        m.best = recorded_best(m.best, last, start)
        pending_eval |= eval_pending(last, start, per_epoch, total, cfgs[0].eval_every)
    hooks = [TensorBoard(m.run, member=k) for k, m in enumerate(members)] if tensorboard else []
    log = event_hooks(log, hooks)
    impl = default_impl() if impl is None else impl
    state = init_population(states, impl)
    del states
    step_fn = make_population_step(cfgs[0], spec.bert, total, impl)
    eval_fn = make_eval_fn(spec)
    hp = hyper(cfgs)
    log({"event": "start", "total_steps": total, "steps_per_epoch": per_epoch, "start_step": start,
         "skipped": data.skipped, "train_sizes": data.sched.sizes, "members": [m.run.name for m in members]})
    compiles = CompileEvents()
    step_metrics = StepMetrics()
    rate = StepRate(start)

    # the hooks, in the order they run at an epoch end: log the step metrics, checkpoint, evaluate
    def log_steps(info: StepInfo) -> None:
        host = step_metrics.pull()
        bad = first_non_finite(host)
        if bad is not None:
            s, m = bad
            names = [members[i].run.name for i in range(len(members)) if not math.isfinite(m["loss"][i])]
            raise NonFiniteLoss(f"non-finite loss at step {s} (members {', '.join(names) or '?'}); the last good "
                                f"checkpoints are kept")
        if host:
            s, m = host[-1]
            log({"event": "step", "step": s, "epoch": s // per_epoch, **m, "loss": sum(m["loss"]) / len(m["loss"]),
                 "loss_members": m["loss"], "steps_per_s": rate.tick(s), "per_step": host})

    def save(info: StepInfo) -> None:
        if not bool(_all_finite(info.state)):
            raise NonFiniteLoss(f"non-finite training state at step {info.step}, not saved; the last good "
                                f"checkpoints are kept")
        for k, m in enumerate(members):
            m.ckpt.save_state(member_state(info.state, k),
                              data_position(info.step, per_epoch, m.best, data.sched.sizes, data.fingerprint))

    def evaluate_all(info: StepInfo) -> None:
        if not info.boundary or not eval_due(info.step, per_epoch, total, cfgs[0].eval_every):
            return
        extra = {"wall_s": round(time.perf_counter() - t_start, 1), **compile_record(compiles)}
        for k, m in enumerate(members):
            params, metrics, scores = dev_metrics(eval_fn, member_state(info.state, k), data.dev,
                                                  m.cfg.data.eval_batch_size, m.cfg.data.scoring_buckets)
            rec = m.record(info.step, info.epoch, params, metrics, extra, dev_scores(m.cfg, data.dev, scores))
            log({"event": "eval", "member": m.run.name, **rec})

    loop = Loop(data.sched, total, should_stop)
    loop.add_hook(step_metrics.add, every=1)
    loop.add_hook(log_steps, every=log_every)
    for hook in (log_steps, save, evaluate_all):
        loop.add_hook(hook, epoch_end=True)
    try:
        with frozen_heap(), compiles:  # see train.trainer
            if pending_eval:
                evaluate_all(StepInfo(start, (start - 1) // per_epoch, state, None, boundary=True))
            state, step, stopped = loop.run(lambda st, g, batches: step_fn(st, batches, hp), state, start)
        if stopped:
            log({"event": "stopped", "reason": "signal", "step": step})
    finally:
        close_hooks(hooks)
    wall = round(time.perf_counter() - t_start, 1)
    out = []
    for m in members:
        best_step = m.ckpt.best_step()
        out.append({"member": m.run.name, **m.metrics, "best_overall": m.best, "step": step, "stopped": stopped,
                    "best_checkpoint": str(m.run / "best" / str(best_step)) if best_step is not None else None,
                    "wall_s": wall, **compile_record(compiles)})
    return out
