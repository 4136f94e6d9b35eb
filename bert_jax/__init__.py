"""bert_jax: a functional minBERT in JAX/Flax, numerically equal to Hugging Face's PyTorch BERT."""

from bert_jax.config import BertConfig
from bert_jax.convert import EMBEDDED, load_pretrained, resolve_checkpoint, save_pretrained
from bert_jax.model import BertOutput, Params, encode, init_params
from bert_jax.tokenizer import load_tokenizer

__all__ = [
    "EMBEDDED",
    "BertConfig",
    "BertOutput",
    "Params",
    "encode",
    "init_params",
    "load_pretrained",
    "load_tokenizer",
    "resolve_checkpoint",
    "save_pretrained",
]
