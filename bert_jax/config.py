"""BERT hyper-parameters as a frozen dataclass, read from / written to a Hugging Face config.json."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu")


# BertConfig fields that are bert-jax options, not part of a Hugging Face config.json.
BERT_JAX_OPTIONS = ("dtype", "attention_impl", "remat", "scan_layers")
# Integer fields with their smallest allowed value; float fields with their allowed range.
_INT_FIELDS = {"vocab_size": 1, "hidden_size": 1, "num_hidden_layers": 1, "num_attention_heads": 1,
               "intermediate_size": 1, "max_position_embeddings": 1, "type_vocab_size": 1, "pad_token_id": 0}
_PROB_FIELDS = ("hidden_dropout_prob", "attention_probs_dropout_prob")


def is_traced(x: Any) -> bool:
    """True for a JAX tracer: a dropout rate may be an array inside a traced (vmapped) function."""
    return isinstance(x, jax.core.Tracer)


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Architecture of a BERT encoder (the fields of a HF `BertConfig` that shape the model).

    `dtype` is the compute dtype ("float32" or "bfloat16"); parameters are always float32.
    `attention_impl` picks `jax.nn.dot_product_attention`'s implementation ("xla" or "cudnn");
    "cudnn" needs a GPU and a 16-bit dtype and has no attention dropout (see `attention.py`).
    `remat` recomputes each layer's activations in the backward pass (less memory). `scan_layers`
    runs the encoder layers as one `jax.lax.scan` (one compiled layer body; see `model.BertEncoder`).
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    # bert-jax options (not part of the HF config).
    dtype: str = "float32"
    attention_impl: str = "xla"
    remat: bool = False
    scan_layers: bool = False

    def __post_init__(self) -> None:
        # Types and ranges first (a malformed config.json must fail here, naming the key, not deep in the model).
        for name, least in _INT_FIELDS.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise ValueError(f"{name} must be an integer, got {v!r} ({type(v).__name__})")
            if v < least:
                raise ValueError(f"{name} must be >= {least}, got {v}")
        for name in (*_PROB_FIELDS, "layer_norm_eps"):
            v = getattr(self, name)
            if name in _PROB_FIELDS and is_traced(v):
                continue  # a per-member rate of a vmapped population (train/population.py): checked where it is set
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r} ({type(v).__name__})")
        for name in _PROB_FIELDS:
            if not is_traced(getattr(self, name)) and not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.layer_norm_eps <= 0:
            raise ValueError(f"layer_norm_eps must be > 0, got {self.layer_norm_eps}")
        if self.pad_token_id >= self.vocab_size:
            raise ValueError(f"pad_token_id {self.pad_token_id} must be < vocab_size {self.vocab_size}")
        for name in ("remat", "scan_layers"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.hidden_act, str):
            raise ValueError(f"hidden_act must be a string, got {self.hidden_act!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (one of {_ACTIVATIONS})")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype {self.dtype!r} must be float32, bfloat16 or float16")
        if self.attention_impl not in ("xla", "cudnn"):
            raise ValueError(f"attention_impl {self.attention_impl!r} must be 'xla' or 'cudnn'")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    def replace(self, **changes: Any) -> "BertConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], **overrides: Any) -> "BertConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"position_embedding_type {d['position_embedding_type']!r} is not supported (absolute only)")
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def from_json_file(cls, path: str | Path, **overrides: Any) -> "BertConfig":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: config.json not found") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a JSON object of BERT config keys, got a {type(d).__name__}")
        if d.get("model_type", "bert") != "bert":
            raise ValueError(f"{path}: model_type is {d.get('model_type')!r}, expected 'bert'")
        try:
            return cls.from_hf_dict(d, **overrides)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: {e}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        hf_fields = [f.name for f in dataclasses.fields(self) if f.name not in BERT_JAX_OPTIONS]
        d = {k: getattr(self, k) for k in hf_fields}
        d.update(model_type="bert", architectures=["BertModel"], position_embedding_type="absolute")
        return d
