"""A functional minBERT in Flax linen.

Parameters are a plain nested dict (no framework state); `encode` is a pure function of
(params, config, inputs, dropout_rng). Submodule names follow Hugging Face's `BertModel` so that
`convert.py` is a mechanical rename + transpose.

Param tree (H = hidden, I = intermediate, L = layers):
    embeddings/{word_embeddings, position_embeddings, token_type_embeddings}/embedding  [rows, H]
    embeddings/LayerNorm/{scale, bias}                                                  [H]
    encoder/layer_{l}/{query, key, value, attention_output}/{kernel [H, H], bias [H]}
    encoder/layer_{l}/intermediate/{kernel [H, I], bias [I]}, output/{kernel [I, H], bias [H]}
    encoder/layer_{l}/{attention_LayerNorm, output_LayerNorm}/{scale, bias}
    pooler/dense/{kernel [H, H], bias [H]}
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from bert_jax import matmul
from bert_jax.attention import keep_mask, self_attention
from bert_jax.config import BertConfig, is_traced

Params = dict[str, Any]


class BertOutput(NamedTuple):
    last_hidden_state: jax.Array  # [batch, seq, hidden]
    pooler_output: jax.Array  # [batch, hidden]


def _gelu_erf(x: jax.Array) -> jax.Array:
    """Exact GELU, 0.5 x (1 + erf(x / sqrt 2)): torch's formula. `jax.nn.gelu(approximate=False)` uses
    erfc, whose XLA CPU expansion is slower; values agree to float32 rounding."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(0.7071067811865476, x.dtype)))


def _activation(name: str):
    if name == "gelu":
        return _gelu_erf
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: jax.nn.gelu(x, approximate=True)
    return jax.nn.relu


class Dense(nn.Module):
    """`flax.linen.Dense` (same params: float32 `kernel` [in, out] ~ N(0, 0.02), `bias` [out] zeros) whose
    16-bit compute goes through `matmul.einsum` (16-bit products, float32 accumulation, forward and backward).
    Float32 compute is `nn.Dense`'s own: one dot_general, then the bias. x: [..., in] -> [..., out]."""

    features: int
    dtype: Any = jnp.float32  # compute dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.normal(0.02), (x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        if jnp.dtype(self.dtype) == jnp.float32:
            y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
            return y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        # the bias is added to the float32 product (its gradient: a float32 sum, not a 16-bit one, which XLA's CPU
        # backend turns into a slow reduce-window), then the result is rounded once
        y = matmul.einsum("ni,io->no", x.reshape(-1, x.shape[-1]), kernel, self.dtype) + bias
        return y.astype(self.dtype).reshape(*x.shape[:-1], self.features)


def _dense(config: BertConfig, features: int, name: str) -> Dense:
    return Dense(features, dtype=config.compute_dtype, name=name)


def _layer_norm(config: BertConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=config.compute_dtype, param_dtype=jnp.float32, name=name)


class Dropout(nn.Dropout):
    """`flax.linen.Dropout` with the same masks (same name, same rng stream, bit-identical keep mask) and
    a cheaper mask computation (`attention.keep_mask`). `broadcast_dims` is not supported (unused here)."""

    @nn.compact
    def __call__(self, inputs: jax.Array, deterministic: bool | None = None, rng: jax.Array | None = None) -> jax.Array:
        deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
        traced = is_traced(self.rate)  # a per-member rate of a vmapped population: always applied
        if deterministic or (not traced and self.rate == 0.0):
            return inputs
        if not traced and self.rate == 1.0:
            return jnp.zeros_like(inputs)
        if rng is None:
            rng = self.make_rng(self.rng_collection)
        keep_prob = 1.0 - self.rate
        keep = keep_mask(rng, keep_prob, inputs.shape)
        # a traced rate: multiply by the reciprocal (a division by a runtime scalar costs ~10% of a CPU train step)
        kept = (inputs * (1.0 / keep_prob)).astype(inputs.dtype) if traced else inputs / keep_prob  # bf16 stays bf16
        return jax.lax.select(keep, kept, jnp.zeros_like(inputs))


class BertEmbeddings(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array, deterministic: bool) -> jax.Array:
        c = self.config
        init = nn.initializers.normal(0.02)
        embed = lambda n, name: nn.Embed(n, c.hidden_size, dtype=jnp.float32, embedding_init=init, name=name)
        positions = jnp.arange(input_ids.shape[1])[None, :]
        x = (
            embed(c.vocab_size, "word_embeddings")(input_ids)
            + embed(c.max_position_embeddings, "position_embeddings")(positions)
            + embed(c.type_vocab_size, "token_type_embeddings")(token_type_ids)
        )
        x = _layer_norm(c, "LayerNorm")(x.astype(c.compute_dtype))
        return Dropout(c.hidden_dropout_prob)(x, deterministic=deterministic)


class BertLayer(nn.Module):
    """One post-LN encoder layer: self-attention, add & norm, feed-forward, add & norm."""

    config: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array, key_mask: jax.Array, deterministic: bool) -> jax.Array:
        c = self.config
        b, t, _ = x.shape
        heads = lambda y: y.reshape(b, t, c.num_attention_heads, c.head_dim)
        q = heads(_dense(c, c.hidden_size, "query")(x))
        k = heads(_dense(c, c.hidden_size, "key")(x))
        v = heads(_dense(c, c.hidden_size, "value")(x))
        attn_rng = None
        if not deterministic and c.attention_probs_dropout_prob > 0:
            attn_rng = self.make_rng("dropout")
        ctx = self_attention(
            q, k, v, key_mask,
            dropout_rate=c.attention_probs_dropout_prob, dropout_rng=attn_rng, implementation=c.attention_impl,
        ).reshape(b, t, c.hidden_size)
        h = _dense(c, c.hidden_size, "attention_output")(ctx)
        h = Dropout(c.hidden_dropout_prob)(h, deterministic=deterministic)
        x = _layer_norm(c, "attention_LayerNorm")(h + x)
        h = _activation(c.hidden_act)(_dense(c, c.intermediate_size, "intermediate")(x))
        h = _dense(c, c.hidden_size, "output")(h)
        h = Dropout(c.hidden_dropout_prob)(h, deterministic=deterministic)
        return _layer_norm(c, "output_LayerNorm")(h + x)


class BertEncoder(nn.Module):
    """`num_hidden_layers` BertLayers, unrolled or (`scan_layers`) one `jax.lax.scan` over the layers.

    Both read the same params (`layer_0` ... `layer_{N-1}`, HF names). The scan stacks them into
    `[N, ...]` leaves inside the traced program (the gradient flows back through the stack), so XLA
    compiles one layer body instead of N: shorter compiles, same outputs. Its dropout masks come from
    one key split N ways, so they differ from the unrolled model's (same distribution).
    """

    config: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array, key_mask: jax.Array, deterministic: bool) -> jax.Array:
        c = self.config
        if not c.scan_layers or self.is_initializing():
            layer_cls = nn.remat(BertLayer, static_argnums=(3,)) if c.remat else BertLayer
            for i in range(c.num_hidden_layers):
                x = layer_cls(c, name=f"layer_{i}")(x, key_mask, deterministic)
            return x
        params = self.variables["params"]
        stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves),
                               *(params[f"layer_{i}"] for i in range(c.num_hidden_layers)))
        no_rng = jnp.zeros((c.num_hidden_layers,), jnp.uint32)  # placeholder scanned input when deterministic
        rngs = no_rng if deterministic else jax.random.split(self.make_rng("dropout"), c.num_hidden_layers)

        def layer(h: jax.Array, layer_params_and_rng: tuple[Params, jax.Array]) -> tuple[jax.Array, None]:
            layer_params, rng = layer_params_and_rng
            out = BertLayer(c, parent=None).apply({"params": layer_params}, h, key_mask, deterministic,
                                                  rngs=None if deterministic else {"dropout": rng})
            return out, None

        body = jax.checkpoint(layer) if c.remat else layer
        x, _ = jax.lax.scan(body, x, (stacked, rngs))
        return x


class BertModule(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(
        self, input_ids: jax.Array, attention_mask: jax.Array, token_type_ids: jax.Array, deterministic: bool
    ) -> BertOutput:
        c = self.config
        x = BertEmbeddings(c, name="embeddings")(input_ids, token_type_ids, deterministic)
        x = BertEncoder(c, name="encoder")(x, attention_mask, deterministic)
        pooled = jnp.tanh(PoolerDense(c, name="pooler")(x[:, 0]))
        return BertOutput(last_hidden_state=x, pooler_output=pooled)


class PoolerDense(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, cls_token: jax.Array) -> jax.Array:
        return _dense(self.config, self.config.hidden_size, "dense")(cls_token)


def encode(
    params: Params,
    config: BertConfig,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    token_type_ids: jax.Array | None = None,
    dropout_rng: jax.Array | None = None,
) -> BertOutput:
    """Run BERT. input_ids, attention_mask, token_type_ids: [batch, seq] ints.

    `dropout_rng=None` is deterministic (eval); with a key, hidden and attention dropout are active.
    Returns `BertOutput(last_hidden_state [batch, seq, hidden], pooler_output [batch, hidden])`.
    """
    if token_type_ids is None:
        token_type_ids = jnp.zeros_like(input_ids)
    rngs = None if dropout_rng is None else {"dropout": dropout_rng}
    return BertModule(config).apply(
        {"params": params}, input_ids, attention_mask, token_type_ids, dropout_rng is None, rngs=rngs
    )


def init_params(config: BertConfig, rng: jax.Array) -> Params:
    """Randomly initialised parameters (normal(0.02) weights, zero biases, unit LayerNorm scales)."""
    ids = jnp.zeros((1, 2), jnp.int32)
    return BertModule(config).init(rng, ids, jnp.ones_like(ids), ids, True)["params"]
