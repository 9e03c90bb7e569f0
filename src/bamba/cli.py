"""The `bamba` command line (also `python -m bamba`).

Each command is a thin layer over a plain keyword-argument Python function. Modules that own a command
register it with `add_cli(subparsers)`, which sets `func` to a callable taking the parsed namespace.
Errors a user can cause (bad path, dtype, prompt...) print one line and exit non-zero, no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command modules, each exposing add_cli(subparsers)
COMMAND_MODULES = ["bamba.generation", "bamba.info", "bamba.train", "bamba.tokenizer_cli", "bamba.bench"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bamba", description="Run, train and benchmark Bamba models (pure PyTorch)."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        module.add_cli(sub)
    return parser


# ----- generate / chat commands (owner: the generation helper) ------------------------------------------


# ----- train command (owner: the train helper) ----------------------------------------------------------


# ----- info, train-tokenizer, bench commands (owner: the bench helper) -----------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from .runtime import tune_cpu_allocator

    tune_cpu_allocator()  # big temporaries are reused instead of page-faulted in again (bamba.runtime)
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except (ValueError, OSError, RuntimeError) as e:  # what a user can cause: one line, exit status 2
        message = " ".join(str(e).split()) or type(e).__name__  # one line
        print(f"bamba {args.command}: error: {message}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
