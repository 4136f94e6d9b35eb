"""The PyTorch baseline (scripts/torch_baseline.py) against the JAX train step: same weights, same batches.

Dropout is off in both (hidden and attention rate 0) so both steps are deterministic. The JAX step does
not return gradients; after one step its CS224N-Adam first moment is ``mu = (1 - b1) g`` (zero init), so
``g = mu / (1 - b1)`` is exactly the gradient the step applied. The learning rate is large (1e-3) so
that the one-step parameter comparison (1e-5) would catch a wrong update (updates are ~1e-3).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from scripts import torch_baseline as tb
from tests.conftest import TINY, assert_tree_allclose
from train.config import TrainConfig
from train.step import init_model, init_state, make_train_step, optimizer

TASKS = ("sst", "para", "sts")
B, L = 4, 11


def _ids(rng, lengths):
    mask = (np.arange(L)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)
    ids = rng.integers(5, TINY["vocab_size"], size=(len(lengths), L)).astype(np.int32)
    ids[:, 0] = 2  # [CLS]
    ids[np.arange(len(lengths)), np.asarray(lengths) - 1] = 3  # [SEP]
    return ids * mask, mask


def _batches(seed: int) -> dict[str, dict[str, np.ndarray]]:
    """One padded batch per task; the last row of each is a padding row (valid 0) with a label that would count."""
    rng = np.random.default_rng(seed)
    valid = np.array([1, 1, 1, 0], np.float32)
    ids, mask = _ids(rng, [L, 7, 3, 5])
    out = {"sst": {"input_ids": ids, "attention_mask": mask, "labels": np.array([0, 4, 2, 1], np.int32), "valid": valid}}
    for task, labels in (("para", np.array([0, 1, 0, 1], np.float32)), ("sts", np.array([4.2, 0.4, 2.0, 5.0], np.float32))):
        i1, m1 = _ids(rng, [6, L, 4, 9])
        i2, m2 = _ids(rng, [L, 3, 8, 2])
        out[task] = {"input_ids_1": i1, "attention_mask_1": m1, "input_ids_2": i2, "attention_mask_2": m2,
                     "labels": labels, "valid": valid}
    return out


def _check_no_near_ties(model, batches):
    """The pair head's |u - v| has a kink at u = v: where an element of u - v is within float noise
    (~1e-7) of 0, the two frameworks may legitimately take opposite subgradients. The batches used
    here keep every |u - v| element above 1e-6 (checked, so a change of fixture cannot hide it)."""
    for t in ("para", "sts"):
        b = tb.to_torch_batch(batches[t])
        with torch.no_grad():
            u = model._embed(b["input_ids_1"], b["attention_mask_1"])
            v = model._embed(b["input_ids_2"], b["attention_mask_2"])
        gap = float((u - v).abs().min())
        assert gap > 1e-6, f"{t}: |u - v| element {gap:.1e} too close to the kink; pick another batch seed"


def _adam_mu(opt_state):
    states = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
              if isinstance(s, optax.ScaleByAdamState)]
    assert len(states) == 1
    return states[0].mu


def _cfg(ckpt, combine: str, **kw) -> TrainConfig:
    return TrainConfig.from_dict(dict(checkpoint=str(ckpt), tasks=TASKS, combine=combine, hidden_dropout=0.0, attention_dropout=0.0,
                       lr=1e-3, weight_decay=0.01, **kw))


def _torch(ckpt, cfg: TrainConfig, params_np, attn: str = "eager"):
    hc = cfg.heads
    model = tb.build_model(ckpt, hc.heads, pooling=hc.pooling, para_head=hc.para_head, sts_head=hc.sts_head,
                           hidden_dropout=0.0, attention_dropout=0.0, attn_implementation=attn, jax_params=params_np,
                           ranking_weight=hc.ranking_weight, ranking_scale=hc.ranking_scale)
    opt = tb.CS224NAdamW(model.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.b1, cfg.optim.b2), eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
    return model, opt


def _jax_pcgrad_orders(dropout_key, step: int, T: int) -> list[list[int]]:
    """The task orders `train.step` gives PCGrad at `step` (its key derivation, see make_train_step)."""
    key = jax.random.fold_in(jax.random.fold_in(dropout_key, step), 1_000_003)
    return [[int(j) for j in jax.random.permutation(jax.random.fold_in(key, i), T)] for i in range(T)]


def _is_fixed(orders) -> bool:
    return all([j for j in o if j != i] == [j for j in range(len(orders)) if j != i] for i, o in enumerate(orders))


def _compare(ckpt, cfg, params_np, state, metrics, model, t_metrics):
    for t in TASKS:
        assert abs(float(metrics[f"loss_{t}"]) - t_metrics[f"loss_{t}"]) <= 1e-5, (t, metrics, t_metrics)
    jax_grads = jax.tree.map(lambda m: np.asarray(m) / (1.0 - cfg.optim.b1), _adam_mu(state.opt_state))
    torch_grads = tb.to_jax_tree(model, params_np["bert"], "grad")
    assert max(float(np.abs(g).max()) for g in jax.tree.leaves(torch_grads["bert"])) > 1e-3  # non-trivial
    assert_tree_allclose(jax_grads, torch_grads, atol=1e-4)
    # one full CS224N AdamW step (lr 1e-3, wd 0.01): same parameters
    moved = max(float(np.abs(np.asarray(a) - b).max()) for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(params_np)))
    assert moved > 1e-4
    assert_tree_allclose(jax.tree.map(np.asarray, state.params), tb.to_jax_tree(model, params_np["bert"], "param"), atol=1e-5)
    return jax_grads


def test_summed_step_matches_jax(tiny_bert_dir):
    cfg = _cfg(tiny_bert_dir, "sum")
    spec, params = init_model(cfg, jax.random.key(3))
    params_np = jax.tree.map(np.array, params)  # the step donates its state
    model, opt = _torch(tiny_bert_dir, cfg, params_np)
    batches = _batches(seed=4)
    _check_no_near_ties(model, batches)
    step = make_train_step(spec, optimizer(cfg), cfg.tasks, "sum", "sum", True)
    state, metrics = step(init_state(params, optimizer(cfg)), batches, jax.random.key(11))
    t_metrics = tb.make_torch_step(model, opt, cfg.tasks, "sum")(batches)
    _compare(tiny_bert_dir, cfg, params_np, state, metrics, model, t_metrics)


def test_pcgrad_step_matches_jax_fixed_and_shuffled_order(tiny_bert_dir):
    """The JAX step draws PCGrad's task orders from its dropout key: with a key whose orders are the
    fixed order 0..T-1 it is fixed-order PCGrad, matched by the torch loop's default order; with a key
    giving other orders, torch is handed those orders. The two results differ (the order matters here)."""
    cfg = _cfg(tiny_bert_dir, "pcgrad")
    spec, params = init_model(cfg, jax.random.key(3))
    params_np = jax.tree.map(np.array, params)
    batches = _batches(seed=4)
    step = make_train_step(spec, optimizer(cfg), cfg.tasks, "pcgrad", "sum", True)
    keys = [jax.random.key(s) for s in range(64)]
    fixed = next(k for k in keys if _is_fixed(_jax_pcgrad_orders(k, 0, 3)))
    shuffled = next(k for k in keys if _jax_pcgrad_orders(k, 0, 3)[1] == [2, 1, 0])  # para visits sts first
    results = []
    for key, orders in ((fixed, None), (shuffled, _jax_pcgrad_orders(shuffled, 0, 3))):
        model, opt = _torch(tiny_bert_dir, cfg, params_np)
        _check_no_near_ties(model, batches)
        state, metrics = step(init_state(jax.tree.map(jnp.asarray, params_np), optimizer(cfg)), batches, key)
        t_metrics = tb.make_torch_step(model, opt, cfg.tasks, "pcgrad", "sum", pcgrad_orders=lambda s: orders)(batches)
        assert t_metrics["pcgrad_projections"] >= 2  # para conflicts with sst and sts
        results.append(_compare(tiny_bert_dir, cfg, params_np, state, metrics, model, t_metrics))
    diff = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])))
    assert diff > 1e-4, diff


def test_mean_pooling_and_cosine_heads_match(tiny_bert_dir):
    """pooling=mean, cosine para/sts heads (para has scale/bias params), sdpa attention: the summed step."""
    from train.heads import HeadConfig

    hc = HeadConfig(pooling="mean", para_head="cosine", sts_head="cosine")
    cfg = _cfg(tiny_bert_dir, "sum", heads=hc)
    spec, params = init_model(cfg, jax.random.key(3))
    params_np = jax.tree.map(np.array, params)
    model, opt = _torch(tiny_bert_dir, cfg, params_np, attn="sdpa")
    batches = _batches(seed=2)
    step = make_train_step(spec, optimizer(cfg), cfg.tasks, "sum", "sum", True)
    state, metrics = step(init_state(params, optimizer(cfg)), batches, jax.random.key(0))
    t_metrics = tb.make_torch_step(model, opt, TASKS, "sum")(batches)
    _compare(tiny_bert_dir, cfg, params_np, state, metrics, model, t_metrics)


@pytest.mark.parametrize("combine, impl", [("sum", "split"), ("pcgrad", "fused")])
def test_in_batch_ranking_step_matches_jax(tiny_bert_dir, combine, impl):
    """The recipe's heads (mean pooling, Siamese pair paraphrase head, 5 relu(cos) STS) plus in-batch negatives on
    the paraphrase pairs (weight 0.5, scale 20): same losses, gradients and parameters after one step, summed
    (per-task programs) and PCGrad (fused); the paraphrase loss is not the one without the ranking term."""
    from train.heads import HeadConfig

    hc = HeadConfig(pooling="mean", para_head="pair", sts_head="cosine_relu", ranking_weight=0.5, ranking_scale=20.0)
    cfg = _cfg(tiny_bert_dir, combine, heads=hc)
    spec, params = init_model(cfg, jax.random.key(3))
    params_np = jax.tree.map(np.array, params)
    model, opt = _torch(tiny_bert_dir, cfg, params_np)
    batches = _batches(seed=4)
    _check_no_near_ties(model, batches)
    with torch.no_grad():
        para = tb.to_torch_batch(batches["para"])
        plain = float(tb.task_loss("para", model.scores("para", para), para))
    step = make_train_step(spec, optimizer(cfg), cfg.tasks, combine, "sum", True, impl=impl)
    state, metrics = step(init_state(params, optimizer(cfg), combine, len(TASKS)), batches, jax.random.key(0))
    orders = None if combine == "sum" else _jax_pcgrad_orders(jax.random.key(0), 0, 3)
    t_metrics = tb.make_torch_step(model, opt, TASKS, combine, pcgrad_orders=lambda s: orders)(batches)
    assert float(metrics["loss_para"]) > plain + 0.1  # one valid positive pair, ranked among the three valid rows
    _compare(tiny_bert_dir, cfg, params_np, state, metrics, model, t_metrics)


def test_pcgrad_combine_hand_computed():
    """Two conflicting 2-d gradients, projections by hand: g1=(1,0), g2=(-1,1)."""
    g1, g2 = [torch.tensor([1.0, 0.0])], [torch.tensor([-1.0, 1.0])]
    out, n = tb.pcgrad_combine([g1, g2])
    # g1' = g1 - (-1/2) g2 = (0.5, 0.5); g2' = g2 - (-1/1) g1 = (0, 1); sum = (0.5, 1.5)
    assert n == 2
    np.testing.assert_allclose(out[0].numpy(), [0.5, 1.5], atol=1e-7)
    out, _ = tb.pcgrad_combine([g1, g2], reduction="mean")
    np.testing.assert_allclose(out[0].numpy(), [0.25, 0.75], atol=1e-7)
    out, n = tb.pcgrad_combine([[torch.tensor([1.0, 0.0])], [torch.tensor([0.0, 1.0])]])  # orthogonal: none
    assert n == 0


def test_cs224n_adamw_matches_reference_formula():
    """Three steps of the torch optimizer vs the course update written out in numpy float64."""
    rng = np.random.default_rng(0)
    p0 = rng.normal(size=(3, 2)).astype(np.float32)
    grads = [rng.normal(size=(3, 2)).astype(np.float32) for _ in range(3)]
    p = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    opt = tb.CS224NAdamW([p], lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.1)
    ref, m, v = p0.astype(np.float64), 0.0, 0.0
    for t, g in enumerate(grads, start=1):
        p.grad = torch.from_numpy(g)
        opt.step()
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g.astype(np.float64) ** 2
        alpha = 1e-2 * np.sqrt(1 - 0.999**t) / (1 - 0.9**t)
        ref = ref - alpha * m / (np.sqrt(v) + 1e-6)
        ref = ref - 1e-2 * 0.1 * ref
    np.testing.assert_allclose(p.detach().numpy(), ref, atol=1e-6)


def test_bench_step_cli_smoke(tiny_bert_dir, tmp_path):
    """`bert-jax bench --what step` on the tiny BERT: runs both arms, writes the documented JSON keys."""
    import json

    from scripts.cli import main

    out = tmp_path / "bench.json"
    rc = main(["bench", "--what", "step", "--checkpoint", str(tiny_bert_dir), "--reps", "3", "--warmup", "0",
               "--batch", "2", "--seq", "8", "--json", str(out), "--quiet", "--no-malloc-tuning"])
    assert rc == 0
    r = json.loads(out.read_text())
    for key in ("what", "a", "b", "a_median_s", "b_median_s", "a_over_b", "device"):
        assert key in r, key
    assert r["what"] == "step" and r["a"].startswith("JAX") and r["b"].startswith("PyTorch")
    assert len(r["a_times_s"]) == len(r["b_times_s"]) == 3 and r["a_median_s"] > 0 and r["b_median_s"] > 0
    assert abs(r["a_over_b"] - r["a_median_s"] / r["b_median_s"]) < 1e-12
    assert r["compile"]["xla_compiles"] >= 1 and r["jax_compiled_shapes"] == 1
    assert r["machine"]["cores"] >= 1 and r["machine"]["torch_threads"] >= 1


def test_fast_dropout_masks_equal_flax_bernoulli():
    """bert_jax's Dropout / keep_mask (a perf rewrite) must give exactly flax's / jax.random.bernoulli's masks."""
    import flax.linen as nn

    from bert_jax.attention import keep_mask
    from bert_jax.model import Dropout

    key = jax.random.key(7)
    for keep in (0.9, 0.7, 0.5, 0.05):
        assert bool((keep_mask(key, keep, (37, 41)) == jax.random.bernoulli(key, keep, (37, 41))).all())
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 5, 17)).astype(np.float32))
    ours = Dropout(0.3).apply({}, x, False, rngs={"dropout": key})
    theirs = nn.Dropout(0.3).apply({}, x, False, rngs={"dropout": key})
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    assert float((ours == 0).mean()) > 0.1
    # a traced (per-member) rate, as in a population: bf16 activations stay bf16, masks and scale as flax's
    xb = x.astype(jnp.bfloat16)
    traced = jax.jit(lambda r: Dropout(r).apply({}, xb, False, rngs={"dropout": key}))(jnp.float32(0.3))
    assert traced.dtype == jnp.bfloat16
    ref = nn.Dropout(0.3).apply({}, xb.astype(jnp.float32), False, rngs={"dropout": key})
    np.testing.assert_allclose(np.asarray(traced, np.float32), np.asarray(ref), rtol=8e-3)


def _cross_batch(seed: int) -> dict[str, np.ndarray]:
    """A cross-encoded pair batch: [CLS] a [SEP] b [SEP] with token types 0 then 1; last row padding."""
    rng = np.random.default_rng(seed)
    ids, mask = _ids(rng, [L, 9, 6, 5])
    types = np.zeros_like(ids)
    for r, (n, sep) in enumerate(zip([L, 9, 6, 5], [4, 5, 2, 2])):
        ids[r, sep] = 3  # the first [SEP]
        types[r, sep + 1 : n] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types,
            "labels": np.array([1, 0, 1, 1], np.float32), "valid": np.array([1, 1, 1, 0], np.float32)}


def test_recipe_heads_and_per_group_learning_rates_match(tiny_bert_dir):
    """The accuracy recipe's model and optimizer in both frameworks: mean pooling, a cross-encoded
    paraphrase head (token types), STS 5 relu(cos), heads at 10x the encoder's lr, layer-wise lr decay
    0.7, a linear schedule: same losses, gradients and parameters after one step."""
    from train.heads import HeadConfig
    from train.optim import OptimConfig, lr_multipliers, make_schedule

    hc = HeadConfig(pooling="mean", para_head="cross", sts_head="cosine_relu")
    cfg = _cfg(tiny_bert_dir, "sum", heads=hc, head_lr_scale=10.0, layer_lr_decay=0.7, schedule="linear")
    spec, params = init_model(cfg, jax.random.key(3))
    params_np = jax.tree.map(np.array, params)
    hc_t = cfg.heads
    model = tb.build_model(tiny_bert_dir, hc_t.heads, pooling=hc_t.pooling, para_head=hc_t.para_head,
                           sts_head=hc_t.sts_head, hidden_dropout=0.0, attention_dropout=0.0, jax_params=params_np)
    scales = lr_multipliers(params_np, cfg.optim.head_lr_scale, cfg.optim.layer_lr_decay)
    groups = tb.param_groups(model, params_np["bert"], scales)
    assert sorted(g["lr_scale"] for g in groups) == pytest.approx(sorted({1.0, 10.0, 0.7, 0.7 ** 2}))  # 2 tiny layers
    opt = tb.CS224NAdamW(groups, lr=cfg.optim.lr, betas=(cfg.optim.b1, cfg.optim.b2), eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
    schedule = make_schedule(OptimConfig(lr=cfg.optim.lr, total_steps=4, schedule="linear"))
    batches = _batches(seed=4)
    batches["para"] = _cross_batch(seed=5)
    tx = optimizer(cfg, total_steps=4)
    step = make_train_step(spec, tx, cfg.tasks, "sum", "sum", True)
    state, metrics = step(init_state(params, tx), batches, jax.random.key(0))
    t_metrics = tb.make_torch_step(model, opt, TASKS, "sum", lr_at=lambda i: float(schedule(i)))(batches)
    _compare(tiny_bert_dir, cfg, params_np, state, metrics, model, t_metrics)
    # the embeddings moved by about 0.7**2 of what the top layer's biases did (first Adam step ~ lr * scale)
    emb = np.abs(np.asarray(state.params["bert"]["embeddings"]["LayerNorm"]["bias"]) - params_np["bert"]["embeddings"]["LayerNorm"]["bias"]).max()
    head = np.abs(np.asarray(state.params["heads"]["sst"]["bias"]) - params_np["heads"]["sst"]["bias"]).max()
    assert emb == pytest.approx(cfg.optim.lr * 0.49, rel=0.05) and head == pytest.approx(cfg.optim.lr * 10, rel=0.05)


def test_bench_dtype_compares_bf16_with_fp32(tiny_bert_dir, tmp_path):
    """`bert-jax bench --what dtype`: arm A computes in bf16, arm B in fp32, on the same batches."""
    import json

    from scripts.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "--what", "dtype", "--checkpoint", str(tiny_bert_dir), "--reps", "2", "--warmup", "0",
                 "--batch", "2", "--seq", "8", "--json", str(out), "--quiet", "--no-malloc-tuning"]) == 0
    r = json.loads(out.read_text())
    assert r["what"] == "dtype" and "bf16" in r["a"] and "fp32" in r["b"]
    assert (r["model_dtype_a"], r["model_dtype_b"]) == ("bfloat16", "float32")  # as the arms' models resolved it
    assert abs(r["a_over_b"] - r["a_median_s"] / r["b_median_s"]) < 1e-12


def test_bench_phases_times_the_same_losses_in_both_frameworks(tiny_bert_dir, tmp_path):
    """`bert-jax bench --what phases`: the forward it times is the same summed loss in JAX and PyTorch (dropout off:
    equal to float32 precision), and every phase has both frameworks' times; every bench kind has default reps."""
    import json

    from scripts.bench_cmd import DEFAULT_REPS, KINDS
    from scripts.cli import main

    assert set(DEFAULT_REPS) == set(KINDS)
    out = tmp_path / "bench.json"
    assert main(["bench", "--what", "phases", "--checkpoint", str(tiny_bert_dir), "--reps", "2", "--warmup", "0",
                 "--batch", "2", "--seq", "8", "--json", str(out), "--quiet", "--no-malloc-tuning",
                 "hidden_dropout=0", "attention_dropout=0"]) == 0
    r = json.loads(out.read_text())
    assert r["what"] == "phases" and r["hidden_dropout"] == 0
    assert r["forward_loss"]["jax"] == pytest.approx(r["forward_loss"]["torch"], rel=1e-5, abs=1e-6)
    for phase in ("forward", "forward_backward", "step"):
        p = r["phases"][phase]
        assert p["jax_s"] > 0 and p["torch_s"] > 0 and p["jax_over_torch"] == pytest.approx(p["jax_s"] / p["torch_s"])
    assert r["phases"]["step"]["jax_s"] == r["a_median_s"]
