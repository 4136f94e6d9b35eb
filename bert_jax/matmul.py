"""Two-operand products in a 16-bit compute dtype with float32 accumulation, forward and backward.

XLA's CPU backend runs a dot whose inputs and output are both bfloat16 as a float32 dot on upcast inputs
(measured on the AMX Xeon, family 6 model 207: [2048, 384] @ [384, 1536] at 164 GFLOP/s), but a dot of
bfloat16 inputs with a float32 result (`preferred_element_type=float32`) on the 16-bit matrix units
(1,265 GFLOP/s, 7.7× faster). JAX's own transpose of such a dot multiplies the float32 cotangent by a
bfloat16 operand, which is the slow mixed case again. `einsum` therefore carries its own backward: the
cotangent is rounded to the compute dtype once and both gradient products are 16-bit × 16-bit → float32,
the accumulation precision every mixed-precision recipe uses (cuBLAS does the same on a GPU).

Only for 16-bit compute: float32 callers use plain `jnp.einsum` (bitwise today's programs). The model uses it for
its 2-D dense products (`model.Dense`); batched products (attention's) stay 16-bit in and out, because XLA's CPU
dot kernel, which takes batched dots, rejects a 16-bit x 16-bit -> float32 dot at run time.

Measured (`bert-jax bench --what dtype --config cpu-recipe --batch 16 --seq 64 --reps 10`, family 6 model 207): the
bf16 train step went from 1.002× the fp32 step's time to 0.690× (commit c827c4e).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def _terms(spec: str) -> tuple[str, str, str]:
    inputs, out = spec.replace(" ", "").split("->")
    a, b = inputs.split(",")
    return a, b, out


@functools.cache
def mixed_dot_supported(dtype: str) -> bool:
    """Whether the default backend runs a `dtype` x `dtype` -> float32 dot (XLA's CPU backend runs it through
    its YNNPACK fusions where the CPU has them; its fallback dot kernel rejects mixed types at run time, so a
    CPU without them would fail mid-run). Probed once per process on two small products, forward and
    backward; GPUs and TPUs support it natively."""
    if jax.default_backend() != "cpu":
        return True

    def probe(x: jax.Array, w: jax.Array) -> jax.Array:
        y = jnp.einsum("ni,io->no", x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)
        gw = jnp.einsum("no,ni->io", y.astype(dtype), x.astype(dtype), preferred_element_type=jnp.float32)
        return y.sum() + gw.sum()

    try:
        with jax.ensure_compile_time_eval():
            for n, i, o in ((3, 5, 7), (64, 384, 96)):
                got = float(jax.jit(probe)(np.ones((n, i), np.float32), np.ones((i, o), np.float32)))
                if got != n * i * o + i * o * n * i:
                    return False
    except Exception:  # XlaRuntimeError: "Unsupported element type for DotThunk::Execute"
        return False
    return True


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def _einsum_f32acc(spec: str, a: jax.Array, b: jax.Array, dtype: jnp.dtype) -> jax.Array:
    return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def einsum(spec: str, a: jax.Array, b: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """`jnp.einsum(spec, a, b)` with both operands cast to `dtype` and a float32 result (float32 accumulation).

    `spec` names two operands and an output (the model's: `"ni,io->no"`; a batched spec compiles, but XLA's CPU
    backend rejects batched mixed dots at run time, see the module docstring); every index of an
    operand must also appear in the other operand or in the output (no index summed inside one operand), so
    that each gradient is again one einsum. Gradients come back in each operand's own dtype: a float32
    kernel gets a float32 gradient, accumulated in float32 from 16-bit products. Where the backend cannot run
    such a product (`mixed_dot_supported`), the product is 16-bit in and out and then upcast (JAX's own rule).
    """
    if not mixed_dot_supported(jnp.dtype(dtype).name):
        return jnp.einsum(spec, a.astype(dtype), b.astype(dtype)).astype(jnp.float32)
    return _einsum_f32acc(spec, a, b, dtype)


def _fwd(spec: str, a: jax.Array, b: jax.Array, dtype: jnp.dtype):
    a16, b16 = a.astype(dtype), b.astype(dtype)
    out = jnp.einsum(spec, a16, b16, preferred_element_type=jnp.float32)
    # residuals: the 16-bit operands (what the gradient products read) and the operands' own dtypes
    return out, (a16, b16, jnp.zeros((), a.dtype), jnp.zeros((), b.dtype))


def row_major_transpose(x: jax.Array) -> jax.Array:
    """`x.T` of a 2-D array, materialized in row-major order.

    XLA gives a transpose the column-major layout of a free view, and folds a transpose into the dot that reads
    it. Its CPU backend runs a 16-bit dot whose lhs is column-major, or contracts the lhs's leading dimension (a
    weight gradient `x.T @ g`), as a float32 Eigen product on upcast inputs; YNNPACK's 16-bit kernel takes only a
    row-major lhs contracted on its last dimension. Flattening the transpose behind an optimization barrier
    makes XLA write the row-major copy, and the dot reading it is YNNPACK's: on the AMX Xeon (family 6 model
    207, one core) [384, 960] @ [960, 1536] bf16 -> f32 takes 1.9 ms with the copy vs 8.4 ms (589 vs 134 GFLOP/s).
    """
    return jax.lax.optimization_barrier(x.T.reshape(-1)).reshape(x.shape[::-1])


def _grad_product(terms_a: str, a: jax.Array, terms_b: str, b: jax.Array, terms_out: str) -> jax.Array:
    """`einsum(f"{terms_a},{terms_b}->{terms_out}", a, b)` with float32 accumulation. A 2-D product is one dot whose
    lhs is the operand holding the output's rows, contracted on its last dimension: transposed into row-major
    order first when it is contracted on its leading one (`row_major_transpose`: a weight gradient `x.T @ g`)."""
    if len(terms_a) == len(terms_b) == len(terms_out) == 2:
        rows = terms_out[0]
        (tl, lhs), (tr, rhs) = ((terms_a, a), (terms_b, b)) if rows in terms_a else ((terms_b, b), (terms_a, a))
        k = tl.replace(rows, "")
        if tl[0] == k:
            lhs = row_major_transpose(lhs)
        return jax.lax.dot_general(lhs, rhs, (((1,), (tr.index(k),)), ((), ())), preferred_element_type=jnp.float32)
    return jnp.einsum(f"{terms_a},{terms_b}->{terms_out}", a, b, preferred_element_type=jnp.float32)


def _bwd(spec: str, dtype: jnp.dtype, res, g: jax.Array):
    a16, b16, a_like, b_like = res
    ta, tb, to = _terms(spec)
    g16 = g.astype(dtype)
    da = _grad_product(to, g16, tb, b16, ta)
    db = _grad_product(to, g16, ta, a16, tb)
    return da.astype(a_like.dtype), db.astype(b_like.dtype)


_einsum_f32acc.defvjp(_fwd, _bwd)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


# /proc/cpuinfo flags of CPUs with bf16 dot-product instructions (VDPBF16PS, or AMX tiles)
BF16_DOT_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def auto_dtype() -> str:
    """The compute dtype `dtype=auto` stands for on this process's default backend: "bfloat16" on a GPU or TPU,
    and on a CPU with 16-bit dot-product instructions (`avx512_bf16`, or AMX's `amx_bf16`) whose XLA backend runs
    the 16-bit x 16-bit -> float32 product (`mixed_dot_supported`); "float32" on every other CPU (AVX2 only).

    Measured (`bench --what dtype --config cpu-recipe --batch 16 --seq 64`, bf16 step time / fp32 step time): the
    AMX Xeon (family 6 model 207) 0.690, and since the weight gradients run on the 16-bit kernel (commit dcd2269)
    the AVX-512-bf16 EPYC (family 25 model 17, no AMX) 0.615. `make train` on the AMX Xeon: 17.5 vs 23.4 min, dev
    overall 0.7464 vs 0.7470 (fp32).
    """
    backend = jax.default_backend()
    if backend in ("gpu", "cuda", "rocm", "tpu"):
        return "bfloat16"
    if backend == "cpu" and _cpu_flags() & BF16_DOT_FLAGS and mixed_dot_supported("bfloat16"):
        return "bfloat16"
    return "float32"
