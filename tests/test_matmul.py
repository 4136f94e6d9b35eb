"""16-bit products with float32 accumulation (`bert_jax.matmul`, `model.Dense`) against numpy and flax."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from bert_jax import matmul
from bert_jax.model import Dense


def _bf16(x: np.ndarray) -> np.ndarray:
    """Round to bfloat16 and back to float64 (what a bf16 operand holds)."""
    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)


@pytest.mark.parametrize("supported", [True, False], ids=["f32-accumulation", "fallback"])
def test_einsum_value_and_gradients_match_numpy(monkeypatch, supported):
    if not supported:  # a backend whose dot kernel rejects 16-bit x 16-bit -> f32: the plain 16-bit product
        monkeypatch.setattr(matmul, "mixed_dot_supported", lambda dtype: False)
    elif not matmul.mixed_dot_supported("bfloat16"):
        pytest.skip("this CPU's XLA backend cannot run a bf16 x bf16 -> f32 dot")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(37, 24)).astype(np.float32)  # [rows, in]
    w = rng.normal(size=(24, 11)).astype(np.float32)  # [in, out], a float32 kernel
    g = rng.normal(size=(37, 11)).astype(np.float32)  # cotangent of the output

    def f(x, w):
        return matmul.einsum("ni,io->no", x.astype(jnp.bfloat16), w, jnp.bfloat16)

    y, vjp = jax.vjp(f, x, w)
    dx, dw = vjp(jnp.asarray(g))
    assert y.dtype == jnp.float32 and dx.dtype == jnp.float32 and dw.dtype == jnp.float32
    xb, wb, gb = _bf16(x), _bf16(w), _bf16(g)
    if supported:  # exact products of bf16 values, float32 accumulation: ~1e-6 relative to float64
        tol_y = tol_g = 1e-5
        np.testing.assert_allclose(np.asarray(y), xb @ wb, rtol=tol_y, atol=tol_y * np.abs(xb @ wb).max())
        np.testing.assert_allclose(np.asarray(dw), xb.T @ gb, rtol=tol_g, atol=tol_g * np.abs(xb.T @ gb).max())
        # dx comes back as bf16 (x's dtype inside f), upcast by astype's transpose
        np.testing.assert_allclose(np.asarray(dx), _bf16(gb @ wb.T), rtol=1e-2, atol=1e-2 * np.abs(gb @ wb.T).max())
    else:  # 16-bit results: within bf16 rounding of the float64 products
        np.testing.assert_allclose(np.asarray(y), xb @ wb, rtol=2e-2, atol=2e-2 * np.abs(xb @ wb).max())
        np.testing.assert_allclose(np.asarray(dw), xb.T @ g, rtol=2e-2, atol=2e-2 * np.abs(xb.T @ g).max())


def test_dense_float32_is_flax_dense_bitwise():
    x = jax.random.normal(jax.random.key(1), (3, 5, 16))
    ours, flax_dense = Dense(8, name="d"), nn.Dense(8, kernel_init=nn.initializers.normal(0.02), name="d")
    p_ours = ours.init(jax.random.key(2), x)
    p_flax = flax_dense.init(jax.random.key(2), x)
    jax.tree.map(np.testing.assert_array_equal, p_ours, p_flax)  # same params, same init draws
    p_flax = jax.tree.map(lambda a: a + 0.1, p_flax)  # a non-zero bias too
    np.testing.assert_array_equal(ours.apply(p_flax, x), flax_dense.apply(p_flax, x))
    g_ours = jax.grad(lambda p: (ours.apply(p, x) ** 2).sum())(p_flax)
    g_flax = jax.grad(lambda p: (flax_dense.apply(p, x) ** 2).sum())(p_flax)
    jax.tree.map(np.testing.assert_array_equal, g_ours, g_flax)


def test_dense_bfloat16_keeps_float32_kernel_gradients():
    x = jax.random.normal(jax.random.key(3), (4, 6, 32))
    dense = Dense(16, dtype=jnp.bfloat16)
    params = jax.tree.map(lambda a: a + 0.05, dense.init(jax.random.key(4), x))
    y = dense.apply(params, x)
    assert y.dtype == jnp.bfloat16 and y.shape == (4, 6, 16)
    k, b = (np.asarray(params["params"][n], np.float64) for n in ("kernel", "bias"))
    ref = _bf16(np.asarray(x)) @ _bf16(k) + b  # bf16 operands, float64 sum, float32 bias
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=1e-2, atol=1e-2 * np.abs(ref).max())
    grads = jax.grad(lambda p: dense.apply(p, x).astype(jnp.float32).sum())(params)["params"]
    assert grads["kernel"].dtype == jnp.float32 and grads["bias"].dtype == jnp.float32
    xb = _bf16(np.asarray(x)).reshape(-1, 32)
    np.testing.assert_allclose(np.asarray(grads["kernel"]), xb.T @ np.ones((24, 16)), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(grads["bias"]), np.full(16, 24.0), rtol=0, atol=0)


def test_auto_dtype_is_bf16_only_where_the_cpu_has_bf16_dot_instructions(monkeypatch):
    assert jax.default_backend() == "cpu"
    monkeypatch.setattr(matmul, "mixed_dot_supported", lambda dtype: True)
    monkeypatch.setattr(matmul, "_cpu_flags", lambda: {"avx", "avx2", "fma"})  # the AVX2 EPYC (family 25 model 1)
    assert matmul.auto_dtype() == "float32"
    monkeypatch.setattr(matmul, "_cpu_flags", lambda: {"avx2", "avx512f"})  # AVX-512 without bf16 dot products
    assert matmul.auto_dtype() == "float32"
    monkeypatch.setattr(matmul, "_cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})  # Zen 4 EPYC (model 17)
    assert matmul.auto_dtype() == "bfloat16"
    monkeypatch.setattr(matmul, "_cpu_flags", lambda: {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
    assert matmul.auto_dtype() == "bfloat16"
    monkeypatch.setattr(matmul, "mixed_dot_supported", lambda dtype: False)  # bf16 dots, but XLA cannot run them
    assert matmul.auto_dtype() == "float32"


def test_bf16_gradient_products_run_on_the_16bit_kernel():
    """Both gradient products of a bf16 Dense (dx = g w^T, and the weight gradient dw = x^T g, which contracts
    its lhs's leading dimension) compile to XLA's 16-bit YNNPACK dot, not to float32 products on upcast inputs
    (`matmul.row_major_transpose`; ~4x slower on the AMX Xeon when the weight gradient was upcast)."""
    if jax.default_backend() != "cpu" or not matmul.mixed_dot_supported("bfloat16"):
        pytest.skip("XLA's CPU backend here has no 16-bit x 16-bit -> float32 dot")
    x, w = jnp.ones((96, 48), jnp.bfloat16), jnp.ones((48, 64), jnp.float32)

    def grads(x, w):
        return jax.grad(lambda x, w: (matmul.einsum("ni,io->no", x, w, jnp.bfloat16) ** 2).sum(), argnums=(0, 1))(x, w)

    text = jax.jit(grads).lower(x, w).compile().as_text()
    blocks = text.split("\n\n")
    dots = [b.strip().splitlines()[0] for b in blocks if " dot(" in b]
    assert len(dots) == 3, dots  # forward (for the square's gradient), dx, dw
    for header in dots:  # each product's computation reads bf16 operands (an upcast one would read f32)
        params = header.partition("(")[2].partition(")")[0]
        assert "f32[" not in params and params.count("bf16[") == 2, header
    assert text.count('"__ynn_fusion"') == 3
