"""Heads, losses, metrics and leaderboard files, each against an independent reference.

- `task_scores` vs a torch re-implementation of every head on transformers' `BertModel` (same tiny
  checkpoint, same head weights);
- losses vs `torch.nn.functional` (padding rows removed before calling torch);
- metrics vs hand counts / numpy's correlation; `overall` vs a hand-computed number;
- the leaderboard files vs the CS224N starter's exact text.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bert_jax
from train.heads import HeadConfig, init_heads, task_scores
from train.losses import task_loss
from train.metrics import overall, predictions, summarize, task_metric
from train.predict import write_leaderboard_file

torch = pytest.importorskip("torch")
F = torch.nn.functional

B, L = 4, 9


@pytest.fixture(scope="module")
def tiny(tiny_bert_dir):
    """(jax BertConfig, jax encoder params, torch BertModel) of the same tiny checkpoint."""
    from transformers import BertModel

    config, params = bert_jax.load_pretrained(tiny_bert_dir)
    model = BertModel.from_pretrained(str(tiny_bert_dir)).eval()
    return config, params, model


def _ids(seed: int, lengths: list[int], vocab: int = 99) -> tuple[np.ndarray, np.ndarray]:
    """[CLS] w.. [SEP] rows of the given lengths, zero-padded to L."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(lengths), L), np.int32)
    mask = np.zeros((len(lengths), L), np.int32)
    for r, n in enumerate(lengths):
        ids[r, :n] = np.concatenate([[2], rng.integers(5, vocab, n - 2), [3]])
        mask[r, :n] = 1
    return ids, mask


def _batch(task: str, kind: str = "pair") -> dict[str, np.ndarray]:
    if kind == "cross":  # [CLS] a [SEP] b [SEP]: token type 1 from the second sentence on
        ids, mask = _ids(5, [9, 5, 7, 4])
        types = np.zeros_like(ids)
        for r, (n, sep) in enumerate(zip([9, 5, 7, 4], [4, 2, 3, 1])):
            ids[r, sep] = 3
            types[r, sep + 1 : n] = 1
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    if task in ("sst", "cfimdb"):
        ids, mask = _ids(0, [9, 4, 6, 2])
        return {"input_ids": ids, "attention_mask": mask}
    ids1, mask1 = _ids(1, [5, 9, 3, 7])
    ids2, mask2 = _ids(2, [8, 2, 6, 7])
    ids2[3], mask2[3] = ids1[3], mask1[3]  # an identical pair: cosine 1
    return {"input_ids_1": ids1, "attention_mask_1": mask1, "input_ids_2": ids2, "attention_mask_2": mask2}


def _perturbed_heads(hc: HeadConfig, hidden: int) -> dict:
    """init_heads, then every array replaced by random values (so biases and scales are tested too)."""
    heads = init_heads(hc, hidden, jax.random.key(3))
    rng = np.random.default_rng(4)
    return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=np.shape(x)) * (0.3 if np.ndim(x) else 1.0) + (2.0 if np.ndim(x) == 0 else 0.0),
                                              jnp.float32), heads)


def _torch_embed(model, ids: np.ndarray, mask: np.ndarray, pooling: str, types: np.ndarray | None = None) -> "torch.Tensor":
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long),
                    token_type_ids=None if types is None else torch.tensor(types, dtype=torch.long))
    if pooling == "cls":
        return out.pooler_output
    m = torch.tensor(mask, dtype=torch.float32)[..., None]
    return (out.last_hidden_state * m).sum(1) / m.sum(1)


def _torch_scores(model, head: dict, hc: HeadConfig, task: str, batch: dict) -> np.ndarray:
    """The report's heads written independently in torch."""
    t = {k: torch.tensor(np.asarray(v)) for k, v in head.items()}
    if task in ("sst", "cfimdb"):
        x = _torch_embed(model, batch["input_ids"], batch["attention_mask"], hc.pooling)
        return F.linear(x, t["kernel"].T, t["bias"]).numpy()
    kind = hc.para_head if task == "para" else hc.sts_head
    if kind == "cross":
        x = _torch_embed(model, batch["input_ids"], batch["attention_mask"], hc.pooling, batch["token_type_ids"])
        return F.linear(x, t["kernel"].T, t["bias"])[:, 0].numpy()
    u = _torch_embed(model, batch["input_ids_1"], batch["attention_mask_1"], hc.pooling)
    v = _torch_embed(model, batch["input_ids_2"], batch["attention_mask_2"], hc.pooling)
    if kind == "cosine_relu":
        return (5.0 * torch.clamp(F.cosine_similarity(u, v, dim=-1), min=0.0)).numpy()
    if kind == "cosine_mse":
        return (F.cosine_similarity(u, v, dim=-1) - 0.5).numpy()
    if kind == "cosine":
        cos = F.cosine_similarity(u, v, dim=-1)
        return (t["scale"] * cos + t["bias"]).numpy() if task == "para" else (2.5 * (cos + 1.0)).numpy()
    feats = torch.cat([u, v, (u - v).abs(), u * v], dim=-1)
    return F.linear(feats, t["kernel"].T, t["bias"])[:, 0].numpy()


CASES = [("sst", "pair"), ("cfimdb", "pair"), ("para", "pair"), ("para", "cosine"), ("sts", "pair"), ("sts", "cosine"),
         ("para", "cross"), ("sts", "cross"), ("sts", "cosine_relu"), ("para", "cosine_mse")]


@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("task, kind", CASES)
def test_task_scores_match_torch(tiny, task, kind, pooling):
    config, bert_params, model = tiny
    hc = HeadConfig(pooling=pooling, para_head=kind if task == "para" else "pair", sts_head=kind if task == "sts" else "pair",
                    heads=("sst", "cfimdb", "para", "sts"))
    heads = _perturbed_heads(hc, config.hidden_size)
    batch = _batch(task, kind)
    got = np.asarray(task_scores({"bert": bert_params, "heads": heads}, config, hc, task, batch))
    want = _torch_scores(model, heads[task], hc, task, batch)
    expected_shape = {"sst": (B, 5), "cfimdb": (B, 2), "para": (B,), "sts": (B,)}[task]
    assert got.shape == expected_shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
    if kind in ("cosine", "cosine_relu") and task == "sts":
        assert np.all((got >= -1e-5) & (got <= 5 + 1e-5))  # on the label scale
        assert got[3] == pytest.approx(5.0, abs=1e-5)  # identical sentences -> 5


def test_head_parameter_shapes():
    hidden = 32
    pair = init_heads(HeadConfig(heads=("sst", "cfimdb", "para", "sts")), hidden, jax.random.key(0))
    assert pair["sst"]["kernel"].shape == (hidden, 5) and pair["sst"]["bias"].shape == (5,)
    assert pair["cfimdb"]["kernel"].shape == (hidden, 2)
    assert pair["para"]["kernel"].shape == (4 * hidden, 1) and pair["sts"]["kernel"].shape == (4 * hidden, 1)
    cos = init_heads(HeadConfig(para_head="cosine", sts_head="cosine"), hidden, jax.random.key(0))
    assert set(cos["para"]) == {"scale", "bias"} and cos["sts"] == {}
    cross = init_heads(HeadConfig(para_head="cross", sts_head="cosine_relu"), hidden, jax.random.key(0))
    assert cross["para"]["kernel"].shape == (hidden, 1) and cross["sts"] == {}
    assert HeadConfig(para_head="cross", sts_head="cross").cross_tasks == ("para", "sts")
    with pytest.raises(ValueError, match="para_head must be one of"):
        HeadConfig(para_head="cosine_relu")
    with pytest.raises(ValueError, match="pooling"):
        HeadConfig(pooling="max")
    with pytest.raises(ValueError, match="unknown task head"):
        HeadConfig(heads=("sst", "nli"))


def test_cosine_logit_starts_with_the_cosine_mse_threshold():
    """At init the "cosine" paraphrase logit is 5 cos - 2.5: positive above cos = 1/2, the "cosine_mse" head's
    threshold (hand-computed), so an untrained head does not call every pair of positive cosine a paraphrase."""
    h = init_heads(HeadConfig(para_head="cosine", sts_head="cosine"), 8, jax.random.key(0))["para"]
    cos = np.array([0.9, 0.5, 0.3, -0.2], np.float32)
    np.testing.assert_allclose(np.asarray(h["scale"]) * cos + np.asarray(h["bias"]), [2.0, 0.0, -1.0, -3.5], atol=1e-6)


def test_dropout_only_with_a_key(tiny):
    """rng=None is deterministic; a key turns dropout on; with both dropout rates 0 a key changes nothing."""
    config, bert_params, _ = tiny
    hc = HeadConfig()
    params = {"bert": bert_params, "heads": init_heads(hc, config.hidden_size, jax.random.key(0))}
    batch = _batch("sst")
    det = np.asarray(task_scores(params, config, hc, "sst", batch))
    np.testing.assert_array_equal(det, np.asarray(task_scores(params, config, hc, "sst", batch)))
    drop = config.replace(hidden_dropout_prob=0.5)
    a = np.asarray(task_scores(params, drop, hc, "sst", batch, jax.random.key(1)))
    b = np.asarray(task_scores(params, drop, hc, "sst", batch, jax.random.key(2)))
    assert not np.allclose(a, det) and not np.allclose(a, b)
    off = config.replace(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    np.testing.assert_allclose(np.asarray(task_scores(params, off, hc, "sst", batch, jax.random.key(1))), det, atol=1e-6)


def test_padding_rows_give_finite_loss_and_gradients(tiny):
    """A partial batch (all-padding rows, valid=0) must not poison the loss or the gradients with NaN
    (the mean-pooled embedding of an all-padding row is exactly 0, where a naive ‖x‖ has a NaN gradient)."""
    config, bert_params, _ = tiny
    hc = HeadConfig(pooling="mean", para_head="cosine", sts_head="cosine")
    params = {"bert": bert_params, "heads": _perturbed_heads(hc, config.hidden_size)}
    batch = _batch("sts")
    for k in ("input_ids_1", "attention_mask_1", "input_ids_2", "attention_mask_2"):
        batch[k][2:] = 0
    batch["valid"] = np.array([1, 1, 0, 0], np.float32)
    for task, labels in (("para", [1.0, 0.0, 0.0, 0.0]), ("sts", [4.0, 1.5, 0.0, 0.0])):
        batch["labels"] = np.array(labels, np.float32)
        loss, grads = jax.jit(jax.value_and_grad(lambda p, b: task_loss(task, task_scores(p, config, hc, task, b), b)))(params, batch)
        assert np.isfinite(float(loss))
        for path, g in jax.tree.flatten_with_path(grads)[0]:
            assert np.isfinite(np.asarray(g)).all(), f"{task} {jax.tree_util.keystr(path)}"
        # the valid rows alone give the same loss (padding rows contribute nothing)
        small = {k: v[:2] for k, v in batch.items()}
        np.testing.assert_allclose(float(loss), float(task_loss(task, task_scores(params, config, hc, task, small), small)), rtol=1e-5)


# ------------------------------------------------------------------------------------------- losses

def _loss_case(task: str, seed: int = 0):
    rng = np.random.default_rng(seed)
    n = 7
    valid = np.array([1, 1, 1, 1, 1, 0, 0], np.float32)
    if task in ("sst", "cfimdb"):
        c = 5 if task == "sst" else 2
        scores = rng.normal(size=(n, c)).astype(np.float32) * 3
        labels = rng.integers(0, c, n).astype(np.int32)
        scores[5:] = 1e4  # garbage in the padding rows
    elif task == "para":
        scores = rng.normal(size=n).astype(np.float32) * 3
        labels = rng.integers(0, 2, n).astype(np.float32)
        scores[5:] = -1e4
    else:
        scores = rng.uniform(-1, 6, n).astype(np.float32)
        labels = rng.uniform(0, 5, n).astype(np.float32)
        scores[5:] = 1e4
    return scores, {"labels": labels, "valid": valid}


def _torch_loss(task, scores, labels):
    s, y = torch.tensor(scores), torch.tensor(labels)
    if task in ("sst", "cfimdb"):
        return F.cross_entropy(s, y.long()).item()
    if task == "para":
        return F.binary_cross_entropy_with_logits(s, y).item()
    return F.mse_loss(s, y).item()


@pytest.mark.parametrize("task", ["sst", "cfimdb", "para", "sts"])
def test_losses_match_torch_with_masking(task):
    scores, batch = _loss_case(task)
    keep = batch["valid"] > 0
    got = float(task_loss(task, jnp.asarray(scores), {k: jnp.asarray(v) for k, v in batch.items()}))
    assert got == pytest.approx(_torch_loss(task, scores[keep], batch["labels"][keep]), rel=1e-5, abs=1e-6)
    # padding rows get exactly zero gradient
    g = jax.grad(lambda s: task_loss(task, s, batch))(jnp.asarray(scores))
    assert np.all(np.asarray(g)[~keep] == 0.0) and np.any(np.asarray(g)[keep] != 0.0)


def test_cosine_mse_head_loss_is_mse_of_the_cosine():
    """The report's "Cosine + MSE" paraphrase head: score = cos - 1/2, loss = MSE(cos, label) over valid rows."""
    scores, batch = _loss_case("para")
    scores = np.clip(scores, -1.5, 0.5)  # cos - 1/2 lies in [-1.5, 0.5]
    keep = batch["valid"] > 0
    want = F.mse_loss(torch.tensor(scores[keep] + 0.5), torch.tensor(batch["labels"][keep])).item()
    got = float(task_loss("para", jnp.asarray(scores), {k: jnp.asarray(v) for k, v in batch.items()}, "cosine_mse"))
    assert got == pytest.approx(want, rel=1e-5)
    assert got != pytest.approx(float(task_loss("para", jnp.asarray(scores), batch)), rel=1e-3)  # not the BCE


def test_losses_without_padding_and_all_padding():
    for task in ("sst", "para", "sts"):
        scores, batch = _loss_case(task, seed=1)
        batch["valid"] = np.ones_like(batch["valid"])
        assert float(task_loss(task, scores, batch)) == pytest.approx(_torch_loss(task, scores, batch["labels"]), rel=1e-5)
        batch["valid"] = np.zeros_like(batch["valid"])
        assert float(task_loss(task, scores, batch)) == 0.0


def test_bce_is_stable_for_large_logits():
    batch = {"labels": np.array([1.0, 0.0, 1.0], np.float32), "valid": np.ones(3, np.float32)}
    scores = np.array([200.0, -200.0, -200.0], np.float32)
    got = float(task_loss("para", scores, batch))
    assert got == pytest.approx(_torch_loss("para", scores, batch["labels"]), rel=1e-6)  # 200 / 3
    assert got == pytest.approx(200.0 / 3, rel=1e-6)


# ------------------------------------------------------------------------------------------ metrics

def test_accuracy_by_hand():
    scores = np.array([[0.1, 2.0, 0, 0, 0], [0, 0, 0, 0, 9.0], [5.0, 0, 0, 0, 0], [0, 0, 1.0, 0.5, 0]])
    labels = np.array([1, 4, 2, 2])  # argmax: 1, 4, 0, 2 -> 3 of 4 right
    assert task_metric("sst", scores, labels) == 0.75
    assert task_metric("cfimdb", np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([1, 1])) == 0.5
    # para: logit > 0 is a paraphrase; logit 0 (p = 0.5) is not, as the starter's sigmoid().round()
    logits = np.array([-1.0, 2.0, 0.0, 3.0, -0.5])
    labels = np.array([0.0, 1.0, 1.0, 0.0, 0.0])  # preds 0, 1, 0, 1, 0 -> 3 of 5
    assert task_metric("para", logits, labels) == pytest.approx(0.6)
    np.testing.assert_array_equal(predictions("para", logits), [0, 1, 0, 1, 0])


def test_pearson_by_hand_and_vs_numpy():
    # x = [1, 2, 3], y = [1, 2, 4]: cov = 3, |x - x̄| = sqrt 2, |y - ȳ| = sqrt(42) / 3 -> r = 9 / sqrt(84)
    assert task_metric("sts", np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 4.0])) == pytest.approx(9 / np.sqrt(84), rel=1e-12)
    rng = np.random.default_rng(0)
    y = rng.uniform(0, 5, 200)
    pred = (y + rng.normal(size=200)).astype(np.float32)
    assert task_metric("sts", pred, y.astype(np.float32)) == pytest.approx(np.corrcoef(pred.astype(np.float64), y)[0, 1], rel=1e-6)
    assert task_metric("sts", -pred, y) == pytest.approx(-np.corrcoef(pred.astype(np.float64), y)[0, 1], rel=1e-6)
    assert task_metric("sts", np.full(5, 2.5), np.arange(5.0)) == 0.0  # constant predictions: defined as 0


def test_overall_by_hand():
    assert overall(0.5, 0.8, 0.6) == pytest.approx((0.5 + 0.8 + 0.8) / 3)  # = 0.7
    assert overall(0.5, 0.8, 0.6) == pytest.approx(0.7)
    assert overall(0.0, 0.0, -1.0) == 0.0 and overall(1.0, 1.0, 1.0) == pytest.approx(1.0)
    assert summarize({"sst": 0.5, "para": 0.8, "sts": 0.6})["overall"] == pytest.approx(0.7)
    assert "overall" not in summarize({"sst": 0.5, "para": 0.8})


# ------------------------------------------------------------------------------------ leaderboard files

def test_leaderboard_files_in_the_starters_format(tmp_path):
    sst = write_leaderboard_file(tmp_path, "sst", "dev", ["a1", "b2"], np.array([[0, 0, 3.0, 0, 0], [0, 0, 0, 0, 1.0]], np.float32))
    para = write_leaderboard_file(tmp_path, "para", "test", ["q1", "q2", "q3"], np.array([2.0, -1.0, 0.0], np.float32))
    sts = write_leaderboard_file(tmp_path, "sts", "test", ["s1", "s2"], np.array([3.5, 0.25], np.float32))
    assert [p.name for p in (sst, para, sts)] == ["sst-dev-output.csv", "para-test-output.csv", "sts-test-output.csv"]
    # exactly what the CS224N starter's f.write(f"id \t Predicted_... \n") / f.write(f"{p} , {s} \n") produce
    assert sst.read_text() == "id \t Predicted_Sentiment \na1 , 2 \nb2 , 4 \n"
    assert para.read_text() == "id \t Predicted_Is_Paraphrase \nq1 , 1 \nq2 , 0 \nq3 , 0 \n"
    assert sts.read_text() == "id \t Predicted_Similiary \ns1 , 3.5 \ns2 , 0.25 \n"
    assert not list(tmp_path.glob("*.tmp"))


def test_cosine_of_a_vector_with_itself_stays_in_range():
    """cos(x, x) = 1 exactly (float32 rounding gave 1.0000001 for 588 of these 2000 vectors), so the STS cosine heads'
    scores stay on the 0..5 scale; other pairs keep numpy's float64 cosine."""
    from train.heads import _cosine

    x = np.random.default_rng(0).standard_normal((2000, 384)).astype(np.float32)
    y = np.random.default_rng(1).standard_normal((2000, 384)).astype(np.float32)
    assert np.asarray(_cosine(jnp.asarray(x), jnp.asarray(x))).max() == 1.0
    assert np.asarray(_cosine(jnp.asarray(x), jnp.asarray(-x))).min() == -1.0
    want = (x * y).sum(-1, dtype=np.float64) / np.linalg.norm(x.astype(np.float64), axis=-1) / np.linalg.norm(
        y.astype(np.float64), axis=-1)
    np.testing.assert_allclose(np.asarray(_cosine(jnp.asarray(x), jnp.asarray(y))), want, atol=1e-6)


def _ranking_by_hand(u, v, labels, valid, scale):
    """In-batch negatives from the definition, one anchor at a time in float64 (an independent reference)."""
    terms = []
    for i in range(len(u)):
        if valid[i] == 0 or labels[i] < 0.5:
            continue
        cands = [j for j in range(len(v)) if valid[j] > 0]
        cos = {j: float(u[i] @ v[j] / (np.linalg.norm(u[i]) * np.linalg.norm(v[j]))) for j in cands}
        log_z = np.log(sum(np.exp(scale * c) for c in cos.values()))
        terms.append(log_z - scale * cos[i])
    return float(np.mean(terms)) if terms else 0.0


def test_in_batch_ranking_by_hand_and_vs_torch():
    from scripts.torch_baseline import in_batch_ranking as torch_ranking
    from train.losses import in_batch_ranking

    rng = np.random.default_rng(0)
    u, v = rng.normal(size=(2, 6, 5)).astype(np.float32)
    labels = np.array([1, 0, 1, 1, 0, 1], np.float32)
    valid = np.array([1, 1, 1, 1, 0, 0], np.float32)  # the last two are padding: no anchors, no candidates
    v[4] = 100 * u[0]  # a padding row that would win anchor 0's softmax if it counted
    got = float(in_batch_ranking(jnp.asarray(u), jnp.asarray(v), labels, valid, 20.0))
    want = _ranking_by_hand(u.astype(np.float64), v.astype(np.float64), labels, valid, 20.0)
    assert got == pytest.approx(want, rel=1e-5) and want > 0.1
    t = torch_ranking(torch.tensor(u), torch.tensor(v), torch.tensor(labels), torch.tensor(valid), 20.0).item()
    assert t == pytest.approx(want, rel=1e-5)
    # a batch without a valid positive pair adds nothing (and no NaN)
    assert float(in_batch_ranking(jnp.asarray(u), jnp.asarray(v), np.zeros(6, np.float32), valid, 20.0)) == 0.0
    # gradients reach only valid rows' embeddings
    gu, gv = jax.grad(lambda a, b: in_batch_ranking(a, b, labels, valid, 20.0), argnums=(0, 1))(jnp.asarray(u), jnp.asarray(v))
    assert np.all(np.asarray(gu)[4:] == 0) and np.all(np.asarray(gv)[4:] == 0) and np.abs(np.asarray(gv)[:4]).max() > 1e-3


def test_ranking_weight_needs_a_siamese_paraphrase_head():
    with pytest.raises(ValueError, match="cross"):
        HeadConfig(para_head="cross", ranking_weight=1.0)
    with pytest.raises(ValueError, match="ranking_weight"):
        HeadConfig(ranking_weight=-1.0)
    hc = HeadConfig(ranking_weight=0.5)
    assert hc.ranks("para") and not hc.ranks("sts") and not hc.ranks("sst")
    assert not HeadConfig().ranks("para")
