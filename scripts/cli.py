"""`bert-jax` command line: one sub-command per job. Side effects (files, printing) live here."""

from __future__ import annotations

import argparse
import json
import sys


def _parity(args: argparse.Namespace) -> int:
    from bert_jax.parity import compare

    diffs = compare(args.checkpoint, batch=args.batch, seq=args.seq, seed=args.seed)
    worst = max(diffs.values())
    ok = worst <= args.tol
    print(json.dumps({"checkpoint": args.checkpoint, **diffs, "tolerance": args.tol, "ok": ok}))
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bert-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("parity", help="max abs difference of bert_jax vs transformers' BertModel")
    p.add_argument("--checkpoint", default="embedded", help="'embedded' or a local HF BERT directory")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tol", type=float, default=1e-4)
    p.set_defaults(func=_parity)
    return parser


class UserError(Exception):
    """An error caused by the user's input: printed as one line, no traceback."""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (UserError, FileNotFoundError, ValueError) as e:
        print(f"bert-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
