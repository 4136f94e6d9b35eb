"""The split train step (per-task programs + one update program) equals the fused step, and compiles
`tasks x buckets + 1` programs instead of one per combination of bucket lengths."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import bert_jax
from tests.conftest import assert_tree_allclose
from train import data as D
from train.config import TrainConfig
from train.step import init_model, init_state, make_train_step, optimizer


def _batches(tok, data_dir, lengths: dict[str, int], start: int = 0) -> dict:
    out = {}
    for t, n in lengths.items():
        enc = D.encode_task(D.load_task(data_dir, t, "train"), tok, 32)
        out[t] = D.make_batch(enc, np.arange(start, start + 4), 4, (n,))
    return out


def _run_state(cfg: TrainConfig, impl: str, schedule: list[dict], rng=jax.random.key(3)):
    """(final train state, per-step metrics, the step function) of `schedule` under `impl`."""
    spec, params = init_model(cfg, jax.random.key(0))
    tx = optimizer(cfg, total_steps=len(schedule))
    state = init_state(params, tx, cfg.combine, len(cfg.tasks))
    step = make_train_step(spec, tx, cfg.tasks, cfg.combine, cfg.pcgrad_reduction, cfg.finetune, impl=impl)
    metrics = []
    for b in schedule:
        state, m = step(state, b, rng)
        metrics.append({k: float(v) for k, v in m.items()})
    return state, metrics, step


def _run(cfg: TrainConfig, impl: str, schedule: list[dict], rng=jax.random.key(3)):
    state, metrics, step = _run_state(cfg, impl, schedule, rng)
    return jax.tree.map(np.asarray, state.params), metrics, step


@pytest.mark.parametrize("combine", ["sum", "mean", "pcgrad"])
def test_split_step_equals_fused_step(tiny_vocab_bert_dir, tiny_data_dir, combine):
    """Three steps with dropout on and different bucket lengths per task: same params (<= 1e-6)."""
    tok = bert_jax.load_tokenizer(tiny_vocab_bert_dir)
    schedule = [_batches(tok, tiny_data_dir, {"sst": 16, "para": 32, "sts": 32}, 0),
                _batches(tok, tiny_data_dir, {"sst": 32, "para": 32, "sts": 16}, 4),
                _batches(tok, tiny_data_dir, {"sst": 16, "para": 32, "sts": 32}, 8)]
    cfg = TrainConfig.from_dict(dict(checkpoint=str(tiny_vocab_bert_dir), combine=combine, lr=1e-3, hidden_dropout=0.1,
                      warmup_steps=1, schedule="linear", head_lr_scale=5.0))
    fused, mf, _ = _run(cfg, "fused", schedule)
    split, ms, _ = _run(cfg, "split", schedule)
    assert_tree_allclose(split, fused, atol=1e-6)
    for a, b in zip(ms, mf):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k


def test_split_step_compiles_per_task_and_bucket(tiny_vocab_bert_dir, tiny_data_dir):
    """4 step shapes over 2 buckets: the fused step compiles 4 programs, the split one 3 x 2 grads + 1 update."""
    tok = bert_jax.load_tokenizer(tiny_vocab_bert_dir)
    combos = [{"sst": a, "para": b, "sts": 16} for a in (16, 32) for b in (16, 32)]
    schedule = [_batches(tok, tiny_data_dir, c) for c in combos] + [_batches(tok, tiny_data_dir, {"sst": 16, "para": 16, "sts": 32})]
    cfg = TrainConfig.from_dict(dict(checkpoint=str(tiny_vocab_bert_dir), lr=1e-4, hidden_dropout=0.0, attention_dropout=0.0))
    *_, fused = _run(cfg, "fused", schedule)
    from train.step import _task_grad

    before = _task_grad._cache_size()  # the per-task programs are shared by every split step of the process
    *_, split = _run(cfg, "split", schedule)
    assert fused._cache_size() == 5
    grad_fn, update_fn = split.programs
    assert grad_fn._cache_size() - before == 2 + 2 + 2  # sst 16/32, para 16/32, sts 16/32
    assert update_fn._cache_size() == 1


def test_split_step_refuses_a_mesh_and_unknown_impls(tiny_vocab_bert_dir):
    cfg = TrainConfig(checkpoint=str(tiny_vocab_bert_dir))
    spec, params = init_model(cfg, jax.random.key(0))
    tx = optimizer(cfg)
    with pytest.raises(ValueError, match="fused' or 'split"):
        make_train_step(spec, tx, cfg.tasks, impl="typo")


def test_a_test_registered_combine_method_trains_in_both_steps(tiny_vocab_bert_dir, tiny_data_dir):
    """A new gradient-combination method is one registration (here, in the test file): a fixed weighted sum
    2 * g_sst + g_para + g_sts. Reference: each task's jax.grad by hand, weighted, one optimizer update."""
    import optax

    from train import combine as C
    from train.step import loss_fn

    def weighted(task_grads, key, options):
        return jax.tree.map(lambda a, b, c: 2.0 * a + b + c, *task_grads)

    C.register(C.CombineMethod("weighted-2-1-1", weighted))
    try:
        tok = bert_jax.load_tokenizer(tiny_vocab_bert_dir)
        batches = _batches(tok, tiny_data_dir, {"sst": 16, "para": 32, "sts": 32})
        cfg = TrainConfig.from_dict(dict(checkpoint=str(tiny_vocab_bert_dir), combine="weighted-2-1-1", lr=1e-3,
                          hidden_dropout=0.0, attention_dropout=0.0))
        spec, params = init_model(cfg, jax.random.key(0))
        tx = optimizer(cfg, total_steps=1)
        grads = [jax.grad(loss_fn)(params, spec, t, batches[t], None) for t in cfg.tasks]
        total = jax.tree.map(lambda a, b, c: 2.0 * a + b + c, *grads)
        updates, _ = tx.update(total, tx.init(params), params)
        want = jax.tree.map(np.asarray, optax.apply_updates(params, updates))
        for impl in ("fused", "split"):
            got, _, _ = _run(cfg, impl, [batches])
            assert_tree_allclose(got, want, atol=1e-6)
    finally:
        C.COMBINE_METHODS.pop("weighted-2-1-1")
    with pytest.raises(ValueError, match=r"combine must be one of \['mean', 'pcgrad', 'sum'\]"):
        TrainConfig(combine="weighted-2-1-1")


def test_a_combine_method_with_state(tiny_vocab_bert_dir, tiny_data_dir, tmp_path):
    """A method with state across steps (the `TrainState.method_state` slot), registered in the test file:
    task t's gradient is divided by 1 + the sum of its earlier gradient norms (a GradNorm-like reweighting).
    Reference: two steps by hand (each task's jax.grad, the weights, the optimizer); the state is then
    checkpointed and restored with the run."""
    import jax.numpy as jnp
    import optax

    from train import combine as C
    from train.checkpoint import Checkpointer
    from train.step import loss_fn

    def history_weighted(task_grads, key, options, seen):
        norms = jnp.stack([optax.tree.norm(g) for g in task_grads])
        scaled = [jax.tree.map(lambda x, w=1.0 + seen[i]: x / w, g) for i, g in enumerate(task_grads)]
        return C.tree_sum(scaled), seen + norms

    C.register(C.CombineMethod("history-weighted", history_weighted,
                               init_state=lambda params, n_tasks: jnp.zeros((n_tasks,), jnp.float32)))
    try:
        tok = bert_jax.load_tokenizer(tiny_vocab_bert_dir)
        schedule = [_batches(tok, tiny_data_dir, {"sst": 16, "para": 32, "sts": 32}, 0),
                    _batches(tok, tiny_data_dir, {"sst": 16, "para": 32, "sts": 32}, 4)]
        cfg = TrainConfig.from_dict(dict(checkpoint=str(tiny_vocab_bert_dir), combine="history-weighted", lr=1e-3,
                          hidden_dropout=0.0, attention_dropout=0.0))
        spec, params = init_model(cfg, jax.random.key(0))
        tx = optimizer(cfg, total_steps=2)
        opt_state, seen = tx.init(params), np.zeros(3)
        for batches in schedule:
            grads = [jax.grad(loss_fn)(params, spec, t, batches[t], None) for t in cfg.tasks]
            norms = [float(np.sqrt(sum(np.sum(np.square(np.asarray(x))) for x in jax.tree.leaves(g)))) for g in grads]
            total = jax.tree.map(lambda a, b, c: a / (1 + seen[0]) + b / (1 + seen[1]) + c / (1 + seen[2]), *grads)
            updates, opt_state = tx.update(total, opt_state, params)
            params, seen = optax.apply_updates(params, updates), seen + np.asarray(norms)
        want = jax.tree.map(np.asarray, params)
        for impl in ("fused", "split"):
            state, _, _ = _run_state(cfg, impl, schedule)
            assert_tree_allclose(jax.tree.map(np.asarray, state.params), want, atol=1e-6)
            np.testing.assert_allclose(np.asarray(state.method_state), seen, rtol=1e-5)
        ckpt = Checkpointer(tmp_path / "run", keep=1)
        try:
            ckpt.save_state(state, {"epoch": 0})
            fresh = init_state(init_model(cfg, jax.random.key(0))[1], tx, cfg.combine, len(cfg.tasks))
            restored, _ = ckpt.restore_state(fresh)
        finally:
            ckpt.close()
        np.testing.assert_array_equal(np.asarray(restored.method_state), np.asarray(state.method_state))
        assert int(restored.step) == 2
    finally:
        C.COMBINE_METHODS.pop("history-weighted")
    with pytest.raises(ValueError, match="a method with state is not a fixed linear weighting"):
        C.CombineMethod("bad", history_weighted, loss_weight=lambda n: 1.0, init_state=lambda p, n: ())
