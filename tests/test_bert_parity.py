"""bert_jax vs transformers' PyTorch BertModel: whole outputs compared (penzai-style consistency tests)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import bert_jax
from bert_jax.parity import max_abs_diff, random_inputs, torch_outputs
from tests.conftest import TINY, save_tiny_bert


def _jax_outputs(directory, inputs, **overrides):
    config, params = bert_jax.load_pretrained(directory, **overrides)
    out = bert_jax.encode(params, config, inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"])
    return out.last_hidden_state, out.pooler_output


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "pytorch_model.bin"])
def test_tiny_random_bert_matches_torch(tmp_path, safe):
    d = save_tiny_bert(tmp_path / "m", seed=1, safe=safe)
    inputs = random_inputs(TINY["vocab_size"], batch=5, seq=17, seed=3)
    assert inputs["attention_mask"].min() == 0 and inputs["token_type_ids"].max() == 1  # padding and token types present
    diffs = max_abs_diff(_jax_outputs(d, inputs), torch_outputs(d, inputs), inputs["attention_mask"])
    assert diffs["last_hidden_state"] <= 1e-5 and diffs["pooler_output"] <= 1e-5, diffs


@pytest.mark.parametrize("act", ["gelu_new", "relu"])
def test_other_activations_match_torch(tmp_path, act):
    d = save_tiny_bert(tmp_path / "m", seed=2, hidden_act=act)
    inputs = random_inputs(TINY["vocab_size"], batch=3, seq=9, seed=4)
    diffs = max_abs_diff(_jax_outputs(d, inputs), torch_outputs(d, inputs), inputs["attention_mask"])
    assert max(diffs.values()) <= 1e-5, diffs


@pytest.mark.parametrize("remat", [False, True], ids=["scan", "scan+remat"])
def test_scanned_layers_match_torch_and_unrolled_gradients(tmp_path, remat):
    """`scan_layers` (one lax.scan over the layers, same params) = transformers' outputs; its gradients =
    the unrolled encoder's."""
    d = save_tiny_bert(tmp_path / "m", seed=5)
    inputs = random_inputs(TINY["vocab_size"], batch=3, seq=13, seed=6)
    diffs = max_abs_diff(_jax_outputs(d, inputs, scan_layers=True, remat=remat), torch_outputs(d, inputs),
                         inputs["attention_mask"])
    assert max(diffs.values()) <= 1e-5, diffs
    config, params = bert_jax.load_pretrained(d)

    def loss(p, cfg):
        out = bert_jax.encode(p, cfg, inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"])
        return (out.pooler_output ** 2).sum() + out.last_hidden_state[:, 1].sum()

    g_scan = jax.grad(loss)(params, config.replace(scan_layers=True, remat=remat))
    g_unrolled = jax.grad(loss)(params, config)
    assert jax.tree.structure(g_scan) == jax.tree.structure(g_unrolled)
    for a, b in zip(jax.tree.leaves(g_scan), jax.tree.leaves(g_unrolled)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)
    assert float(np.abs(np.asarray(g_scan["encoder"]["layer_0"]["query"]["kernel"])).max()) > 0


def test_embedded_checkpoint_matches_torch():
    d = bert_jax.resolve_checkpoint("embedded")
    config, _ = bert_jax.load_pretrained("embedded")
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (6, 384, 30522)
    inputs = random_inputs(config.vocab_size, batch=4, seq=48, seed=0)
    diffs = max_abs_diff(_jax_outputs(d, inputs), torch_outputs(d, inputs), inputs["attention_mask"])
    assert max(diffs.values()) <= 1e-4, diffs


def test_embedded_real_sentences_match_torch():
    tok = bert_jax.load_tokenizer("embedded")
    enc = tok(["A gripping, funny film.", "Is this the same question?"], ["dull", "Is it the same?"], padding=True, return_tensors="np")
    assert enc["input_ids"][0, 0] == tok.cls_token_id and tok.convert_ids_to_tokens(int(enc["input_ids"][0, 1])) == "a"
    inputs = {k: enc[k].astype(np.int32) for k in ("input_ids", "attention_mask", "token_type_ids")}
    d = bert_jax.resolve_checkpoint("embedded")
    diffs = max_abs_diff(_jax_outputs(d, inputs), torch_outputs(d, inputs), inputs["attention_mask"])
    assert max(diffs.values()) <= 1e-4, diffs


def test_export_roundtrip_loads_in_transformers(tiny_bert_dir, tmp_path):
    config, params = bert_jax.load_pretrained(tiny_bert_dir)
    out = bert_jax.save_pretrained(config, params, tmp_path / "export", vocab_file=tiny_bert_dir / "vocab.txt")
    inputs = random_inputs(TINY["vocab_size"], batch=3, seq=11, seed=5)
    exported = torch_outputs(out, inputs)
    original = torch_outputs(tiny_bert_dir, inputs)
    np.testing.assert_allclose(exported[0], original[0], atol=1e-6)
    np.testing.assert_allclose(exported[1], original[1], atol=1e-6)
    assert (out / "vocab.txt").read_text() == (tiny_bert_dir / "vocab.txt").read_text()


def test_dropout_only_with_rng(tiny_bert_dir):
    config, params = bert_jax.load_pretrained(tiny_bert_dir)
    x = random_inputs(TINY["vocab_size"], batch=2, seq=8, seed=0)
    run = lambda rng: np.asarray(bert_jax.encode(params, config, x["input_ids"], x["attention_mask"], x["token_type_ids"], rng).pooler_output)
    det1, det2 = run(None), run(None)
    np.testing.assert_array_equal(det1, det2)
    a, a2, b = run(jax.random.key(1)), run(jax.random.key(1)), run(jax.random.key(2))
    np.testing.assert_array_equal(a, a2)
    assert np.abs(a - b).max() > 1e-3 and np.abs(a - det1).max() > 1e-3


def test_bf16_compute_close_to_fp32():
    config, params = bert_jax.load_pretrained("embedded")
    x = random_inputs(config.vocab_size, batch=2, seq=32, seed=0)
    f32 = bert_jax.encode(params, config, x["input_ids"], x["attention_mask"]).pooler_output
    b16 = bert_jax.encode(params, config.replace(dtype="bfloat16"), x["input_ids"], x["attention_mask"]).pooler_output
    assert b16.dtype == np.dtype("bfloat16") and jax.tree.leaves(params)[0].dtype == np.float32
    assert np.abs(np.asarray(b16, np.float32) - np.asarray(f32)).max() < 0.1


# ---- errors: each names the file and the problem ----

def test_missing_config(tiny_bert_dir, tmp_path):
    d = shutil.copytree(tiny_bert_dir, tmp_path / "m")
    (d / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        bert_jax.load_pretrained(d)


def test_missing_weights(tiny_bert_dir, tmp_path):
    d = shutil.copytree(tiny_bert_dir, tmp_path / "m")
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no weights file \(model\.safetensors or pytorch_model\.bin\)"):
        bert_jax.load_pretrained(d)


def test_missing_vocab(tiny_bert_dir, tmp_path):
    d = shutil.copytree(tiny_bert_dir, tmp_path / "m")
    (d / "vocab.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"vocab\.txt not found"):
        bert_jax.load_tokenizer(d)


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        bert_jax.load_pretrained(tmp_path / "nope")


def _rewrite_weights(src, dst, edit):
    from safetensors.numpy import load_file, save_file

    d = shutil.copytree(src, dst)
    tensors = load_file(d / "model.safetensors")
    edit(tensors)
    save_file(tensors, d / "model.safetensors")
    return d


def test_misshaped_tensor_is_named(tiny_bert_dir, tmp_path):
    name = "encoder.layer.1.attention.self.key.weight"
    d = _rewrite_weights(tiny_bert_dir, tmp_path / "m", lambda t: t.__setitem__(name, np.zeros((32, 31), np.float32)))
    with pytest.raises(ValueError, match=rf"model\.safetensors: tensor '{name}' has shape \(32, 31\), expected \(32, 32\)"):
        bert_jax.load_pretrained(d)


def test_missing_tensor_is_named(tiny_bert_dir, tmp_path):
    d = _rewrite_weights(tiny_bert_dir, tmp_path / "m", lambda t: t.pop("pooler.dense.bias"))
    with pytest.raises(ValueError, match=r"missing tensor\(s\) pooler\.dense\.bias"):
        bert_jax.load_pretrained(d)


def test_extra_tensor_is_named(tiny_bert_dir, tmp_path):
    d = _rewrite_weights(tiny_bert_dir, tmp_path / "m", lambda t: t.__setitem__("classifier.weight", np.zeros((2, 32), np.float32)))
    with pytest.raises(ValueError, match=r"unexpected tensor 'classifier\.weight'"):
        bert_jax.load_pretrained(d)


def test_config_with_fewer_layers_than_weights(tiny_bert_dir, tmp_path):
    d = shutil.copytree(tiny_bert_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 1}))
    with pytest.raises(ValueError, match=r"encoder\.layer\.1\..*does not fit config\.json"):
        bert_jax.load_pretrained(d)


def test_parity_cli_exit_codes(tiny_bert_dir):
    cmd = [sys.executable, "-m", "scripts.cli", "parity", "--checkpoint", str(tiny_bert_dir), "--seq", "16"]
    ok = subprocess.run(cmd, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    report = json.loads(ok.stdout.strip().splitlines()[-1])
    assert report["ok"] and report["last_hidden_state"] <= 1e-5
    bad = subprocess.run(cmd + ["--tol", "0"], capture_output=True, text=True)  # nothing is bit-exact across frameworks
    assert bad.returncode == 1 and json.loads(bad.stdout.strip().splitlines()[-1])["ok"] is False


def test_cudnn_padding_as_key_lengths_equals_a_numpy_softmax(monkeypatch):
    """The cuDNN path passes the right-padded key mask as key lengths (cuDNN rejects a [b, 1, 1, s] bias). No cuDNN
    on a CPU: JAX's own implementation runs the very call that path makes, against a numpy masked softmax."""
    from bert_jax.attention import self_attention

    real = jax.nn.dot_product_attention
    calls = []

    def on_cpu(*a, implementation=None, **kw):
        calls.append((implementation, sorted(kw)))
        return real(*a, implementation=None, **kw)

    monkeypatch.setattr(jax.nn, "dot_product_attention", on_cpu)
    rng = np.random.default_rng(0)
    b, s, h, d = 3, 7, 2, 4
    q, k, v = (rng.standard_normal((b, s, h, d)).astype(np.float32) for _ in range(3))
    lengths = np.array([7, 4, 1])
    key_mask = (np.arange(s)[None, :] < lengths[:, None]).astype(np.int32)
    got = np.asarray(self_attention(q, k, v, key_mask, implementation="cudnn"))
    assert calls == [("cudnn", ["key_value_seq_lengths"])]
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d)
    logits = np.where(key_mask[:, None, None, :] == 1, logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = np.einsum("bhqk,bkhd->bqhd", p, v)
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(np.asarray(self_attention(q, k, v, key_mask)), want, atol=1e-5)  # the xla path too
