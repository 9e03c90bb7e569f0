"""`bamba train-tokenizer`: train a byte-level BPE tokenizer on text files (see `bamba.tokenizer.train_tokenizer`).

.txt files are read as they are; the documents of .jsonl files (their `text` fields) are first written to a
temporary text file, one blank line between documents, so the tokenizer never learns JSON syntax.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from .data import check_files, iter_text_files


def train_tokenizer_files(
    files: list[str], vocab_size: int, out_dir: str, min_frequency: int = 2
) -> dict[str, object]:
    """Train a tokenizer on .txt / .jsonl `files`, save it to `out_dir`; returns a summary."""
    from .tokenizer import train_tokenizer

    if not files:
        raise ValueError("give at least one .txt or .jsonl file")
    check_files(files)
    with tempfile.TemporaryDirectory(prefix="bamba-tok-") as tmp:
        plain = []
        for i, path in enumerate(files):
            if Path(path).suffix.lower() == ".jsonl":
                text_path = os.path.join(tmp, f"{i}.txt")
                with open(text_path, "w", encoding="utf-8") as f:
                    for doc in iter_text_files([path]):
                        f.write(doc + "\n\n")
                plain.append(text_path)
            else:
                plain.append(path)
        tokenizer = train_tokenizer(plain, vocab_size, out_dir, min_frequency=min_frequency)
    return {"out_dir": out_dir, "vocab_size": len(tokenizer)}


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train-tokenizer",
        help="train a byte-level BPE tokenizer on text files",
        description="Train a byte-level BPE tokenizer (pad=0, bos=1, eos=2) and save it in the Hugging Face layout.",
    )
    p.add_argument("files", nargs="+", metavar="FILE", help=".txt or .jsonl (`text` field) files")
    p.add_argument("--vocab-size", type=int, required=True, help="vocabulary size, special tokens included")
    p.add_argument("--out", required=True, help="output folder (tokenizer.json, tokenizer_config.json, ...)")
    p.add_argument("--min-frequency", type=int, default=2, help="merges seen fewer times are not learnt")

    def run(args: argparse.Namespace) -> int:
        summary = train_tokenizer_files(args.files, args.vocab_size, args.out, args.min_frequency)
        print(f"saved a tokenizer with {summary['vocab_size']} tokens to {summary['out_dir']}")
        return 0

    p.set_defaults(func=run)
