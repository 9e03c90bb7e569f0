"""The `bamba export-gguf` section for src/bamba/cli.py: paste from the marked line down, call
`_add_export_gguf_command(sub)` in build_parser() beside the other sections, and delete this file. (The
imports below are cli.py's own, here only so that this file passes ruff.)"""

from __future__ import annotations

import argparse
import sys

# ----- export-gguf command (owner: the gguf helper) -------------------------------------------------------


def _add_export_gguf_command(sub: argparse._SubParsersAction) -> None:
    """`bamba export-gguf` (bamba.gguf_export)."""
    from .gguf_export import TYPES

    p = sub.add_parser(
        "export-gguf",
        help="write a checkpoint as one GGUF file for llama.cpp (and llama-cpp-python, ollama, LM Studio)",
    )
    p.add_argument("folder", help="checkpoint folder or hub repo id (float weights, with its tokenizer)")
    p.add_argument("out", help="the .gguf file to write")
    p.add_argument(
        "--type",
        choices=TYPES,
        default="f32",
        help="weights' type (default: f32); norms, biases and the SSM's A, D and conv stay f32",
    )
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=_cli_export_gguf)


def _cli_export_gguf(args: argparse.Namespace) -> int:
    from .gguf_export import export_gguf

    out = export_gguf(args.folder, args.out, type=args.type, force=args.force)
    print(f"wrote {out} ({args.type})", file=sys.stderr)
    return 0
