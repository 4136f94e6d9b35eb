"""WordPiece tokenizer: transformers' `BertTokenizerFast` built from the checkpoint's vocab.txt, offline."""

from __future__ import annotations

from pathlib import Path

from bert_jax.convert import resolve_checkpoint


def load_tokenizer(name_or_path: str | Path = "embedded"):
    """A `transformers.BertTokenizerFast` for a checkpoint directory (or `"embedded"`).

    Reads `vocab.txt` (and `tokenizer_config.json` when present, e.g. for `do_lower_case`) from disk only.
    """
    from transformers import BertTokenizerFast

    path = resolve_checkpoint(name_or_path)
    if not (path / "vocab.txt").is_file():
        raise FileNotFoundError(f"{path}: vocab.txt not found (the tokenizer needs the checkpoint's WordPiece vocabulary)")
    return BertTokenizerFast.from_pretrained(str(path), local_files_only=True)
