"""WordPiece tokenizer: transformers' `BertTokenizerFast` built from the checkpoint's vocab.txt, offline."""

from __future__ import annotations

import json
from pathlib import Path

from bert_jax.convert import resolve_checkpoint

# The files of a checkpoint (or run) directory that define its tokenizer; `tokenizer_files` copies them.
TOKENIZER_FILES = ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "added_tokens.json")


def load_tokenizer(name_or_path: str | Path = "embedded"):
    """A `transformers.BertTokenizerFast` for a checkpoint or run directory (or `"embedded"`).

    Reads `vocab.txt` (and `tokenizer_config.json` when present, e.g. for `do_lower_case`) from disk only.
    A vocabulary without the tokenizer's [CLS] or [SEP] token is refused (every input starts with one and
    ends with the other).
    """
    from transformers import BertTokenizerFast

    path = resolve_checkpoint(name_or_path)
    vocab = path / "vocab.txt"
    if not vocab.is_file():
        raise FileNotFoundError(f"{path}: vocab.txt not found (the tokenizer needs the checkpoint's WordPiece vocabulary)")
    try:
        tok = BertTokenizerFast.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: cannot load the tokenizer ({first[:300]})") from None
    words = set(vocab.read_text(encoding="utf-8", errors="replace").splitlines())
    missing = [t for t in (tok.cls_token, tok.sep_token) if t is None or str(t) not in words]
    if missing:
        raise ValueError(f"{vocab}: the vocabulary has no {' or '.join(map(str, missing))} token (BERT inputs are "
                         f"[CLS] ... [SEP]); use the checkpoint's own vocab.txt")
    return tok


def _normalizer_options(tok) -> dict:
    """The casing / accent options the tokenizer actually applies (its backend normalizer's state)."""
    try:
        state = json.loads(tok.backend_tokenizer.normalizer.__getstate__())
    except Exception:  # noqa: BLE001 - no backend normalizer: fall back on the init kwargs
        state = {}
    if state.get("type") != "BertNormalizer":
        return {"do_lower_case": bool(getattr(tok, "do_lower_case", True))}
    return {"do_lower_case": bool(state.get("lowercase", True)), "strip_accents": state.get("strip_accents"),
            "tokenize_chinese_chars": bool(state.get("handle_chinese_chars", True))}


def tokenizer_files(name_or_path: str | Path) -> dict[str, bytes]:
    """What a run directory keeps to tokenize exactly as `name_or_path` does: its `vocab.txt`,
    `special_tokens_map.json` / `tokenizer.json` / `added_tokens.json` when present, and a
    `tokenizer_config.json` (the checkpoint's, if any) that states the casing the tokenizer applies
    (`do_lower_case`, `strip_accents`, `tokenize_chinese_chars`), so a run never falls back on defaults."""
    path = resolve_checkpoint(name_or_path)
    tok = load_tokenizer(path)
    out = {name: (path / name).read_bytes() for name in TOKENIZER_FILES if (path / name).is_file()}
    config: dict = {}
    if "tokenizer_config.json" in out:
        try:
            loaded = json.loads(out["tokenizer_config.json"])
            config = loaded if isinstance(loaded, dict) else {}
        except ValueError:
            config = {}
    config.update(_normalizer_options(tok))
    config.setdefault("tokenizer_class", "BertTokenizer")
    out["tokenizer_config.json"] = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
    return out
