"""The `bamba` command line (also `python -m bamba`): all argument parsing, over plain keyword-argument
functions that Python can call too. Errors a user can cause (bad path, dtype, prompt...) print one line
and exit non-zero, no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import torch

from .bench import bench
from .chat import chat, format_stats, generate_text
from .files import strict_json
from .info import format_info, model_info
from .quantize import SHORT_NAMES
from .runtime import tune_cpu_allocator
from .tokenizer import train_tokenizer_files
from .train import train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bamba", description="Run, train and benchmark Bamba models (pure PyTorch)."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_generate_commands(sub)  # generate, chat
    _add_info_command(sub)
    _add_train_command(sub)
    _add_train_tokenizer_command(sub)
    _add_bench_command(sub)
    _add_serve_command(sub)
    _add_export_gguf_command(sub)
    return parser


# ----- generate / chat commands -----------------------------------------------------------------------------
def _add_generate_commands(sub: argparse._SubParsersAction) -> None:
    """`bamba generate` and `bamba chat` (bamba.chat)."""
    p = sub.add_parser("generate", help="continue a prompt, streaming the text to stdout")
    _add_sampling_args(p)
    p.add_argument(
        "--verbose", action="store_true", help="print load time, first-token time, tok/s and GB/s to stderr"
    )
    p.add_argument(
        "--num-beams",
        type=int,
        default=1,
        help="beam search with this many beams, the text at the end (beam sampling unless --temperature 0)",
    )
    p.add_argument("prompt")
    p.set_defaults(func=_cli_generate)
    c = sub.add_parser("chat", help="an interactive loop (empty line or Ctrl-D to quit)")
    _add_sampling_args(c)
    c.add_argument("--system", default=None, help="a system message that starts the conversation")
    c.set_defaults(func=_cli_chat)


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    """The flags `bamba generate` and `bamba chat` share."""
    p.add_argument(
        "--model", default=None, help="checkpoint folder or hub repo id (default: the embedded demo model)"
    )
    p.add_argument("--max-new-tokens", type=int, default=200, help="default: 200")
    p.add_argument("--temperature", type=float, default=0.8, help="default: 0.8; 0 for greedy decoding")
    p.add_argument("--top-p", type=float, default=0.95, help="default: 0.95")
    p.add_argument("--top-k", type=int, default=None, help="default: none")
    p.add_argument("--seed", type=int, default=None, help="a fixed seed makes sampling repeatable")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: as stored)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cpu)")
    p.add_argument(
        "--quantize",
        choices=list(SHORT_NAMES),
        default=None,
        help="int8 / int4: weight-only; int8dq: int8 weights and int8 activations (see bamba.quantize)",
    )


def _sampling_options(args: argparse.Namespace) -> dict[str, Any]:
    """The values of `_add_sampling_args`' flags, as keyword arguments of generate_text and chat."""
    names = "model max_new_tokens temperature top_p top_k seed dtype device quantize".split()
    return {name: getattr(args, name) for name in names}


def _cli_generate(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    first = True

    def stream(piece: str) -> None:  # the prompt goes out with the first piece, once the model has loaded
        nonlocal first
        print((args.prompt if first else "") + piece, end="", flush=True)
        first = False

    stats: dict[str, float] = {}
    generate_text(
        args.prompt, **_sampling_options(args), stream=stream, stats=stats, num_beams=args.num_beams
    )
    print(args.prompt if first else "")  # the prompt alone when nothing was generated
    if args.verbose:
        print(format_stats(stats, time.perf_counter() - start), file=sys.stderr)
    return 0


def _cli_chat(args: argparse.Namespace) -> None:
    chat(system=args.system, **_sampling_options(args))


# ----- train command ----------------------------------------------------------------------------------------
def _add_train_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a Bamba model on text files (single process, or under torchrun)",
        description="Train (or continue training) a Bamba model on .txt / .jsonl files with padding-free packing. "
        "Distributed: torchrun --nproc-per-node N -m bamba train ...",
    )
    p.add_argument(
        "--out", required=True, dest="out_dir", help="output folder (checkpoints, final model, log)"
    )
    p.add_argument("--data", required=True, nargs="+", help=".txt (blank-line separated) or .jsonl files")
    p.add_argument(
        "--tokenizer", required=True, help="folder with tokenizer.json (see `bamba train-tokenizer`)"
    )
    p.add_argument("--config", help="preset name (demo, bench-small, ...) or path to a config.json")
    p.add_argument("--init-from", help="checkpoint folder whose weights (and config) to start from")
    p.add_argument("--row-tokens", type=int, default=2048, help="token budget of one packed row")
    p.add_argument("--batch-rows", type=int, default=1, help="rows per micro-batch per process")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument(
        "--max-steps", type=int, help="optimizer steps (default: one epoch, rounded up to whole steps)"
    )
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate")
    p.add_argument(
        "--min-lr-ratio",
        type=float,
        default=0.1,
        help="lr at the end of the cosine, as a fraction of the peak",
    )
    p.add_argument("--warmup-steps", type=int, help="linear warmup steps (default: 5%% of max steps)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.95), metavar=("BETA1", "BETA2"))
    p.add_argument("--clip", type=float, default=1.0, help="gradient norm clip (0: none)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="bfloat16: autocast")
    p.add_argument("--eval-fraction", type=float, default=0.05, help="documents held out for eval")
    p.add_argument("--eval-data", nargs="+", help="eval files (instead of a held-out fraction)")
    p.add_argument("--eval-every", type=int, default=200, help="steps between evals (0: only at the end)")
    p.add_argument(
        "--save-every", type=int, default=500, help="steps between checkpoints (0: only at the end)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--log-file", help="JSONL log (default: OUT/log.jsonl)")
    p.add_argument(
        "--no-resume", dest="resume", action="store_false", help="start over even if OUT has a checkpoint"
    )
    p.add_argument("--max-examples", type=int, help="read at most this many documents")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument(
        "--progress-every", type=int, default=10, help="steps between progress lines (not a terminal)"
    )
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP2 (fully_shard) instead of DDP")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute layers in backward")
    p.add_argument("--threads", type=int, help="torch CPU threads per process (default: torch's choice)")

    p.set_defaults(func=_cli_train)


def _cli_train(args: argparse.Namespace) -> int:
    kwargs = {k: v for k, v in vars(args).items() if k not in ("func", "command", "threads")}
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads {args.threads} must be >= 1")
        torch.set_num_threads(args.threads)
    kwargs["betas"] = tuple(kwargs["betas"])
    metrics = train(**kwargs)
    if int(os.environ.get("RANK", "0")) == 0:  # valid JSON: no NaN (a loss no step produced) -> null
        print(strict_json(metrics))
    return 0


# ----- serve command ----------------------------------------------------------------------------------------
def _add_serve_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server (continuous batching, prefix-state cache)",
        description="Serve a model over HTTP with OpenAI's API: /v1/completions, /v1/chat/completions, "
        "/v1/models, /health, /metrics, /tokenize, /detokenize, /tokenizer_info.",
    )
    p.add_argument("--model", default=None, help="checkpoint folder or hub repo id (default: the demo model)")
    p.add_argument(
        "--model-name", default=None, help="the name clients use (default: --model, or bamba-demo)"
    )
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: as stored)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cpu)")
    p.add_argument("--quantize", default=None, choices=["int8", "int4", "int8dq"], help="weight quantization")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: localhost only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or $BAMBA_API_KEY)")
    p.add_argument("--max-running", type=int, default=16, help="rows decoded together at most")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting at most (beyond: 429)")
    p.add_argument(
        "--prefix-cache-gib", type=float, default=1.0, help="memory for prefix-state snapshots (0: off)"
    )

    def run(args: argparse.Namespace) -> None:
        from .server import serve  # (FastAPI loads only for this command)

        serve(
            model=args.model,
            dtype=args.dtype,
            device=args.device,
            quantize=args.quantize,
            host=args.host,
            port=args.port,
            api_key=args.api_key or os.environ.get("BAMBA_API_KEY"),
            max_running=args.max_running,
            max_queue=args.max_queue,
            prefix_cache_gib=args.prefix_cache_gib,
            model_name=args.model_name,
        )

    p.set_defaults(func=run)


# ----- export-gguf command ----------------------------------------------------------------------------------
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


# ----- info, train-tokenizer, bench commands ----------------------------------------------------------------
def _add_info_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="parameters, layer layout and memory needs of a model")
    p.add_argument(
        "model", nargs="?", default=None, help="checkpoint folder or hub repo id (default: the demo model)"
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_info_command)


def _info_command(args: argparse.Namespace) -> int:
    info = model_info(args.model)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def _add_train_tokenizer_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train-tokenizer",
        help="train a byte-level BPE tokenizer on text files",
        description="Train a byte-level BPE tokenizer (pad=0, bos=1, eos=2) and save it in the Hugging Face layout.",
    )
    p.add_argument("files", nargs="+", metavar="FILE", help=".txt or .jsonl (`text` field) files")
    p.add_argument("--vocab-size", type=int, required=True, help="vocabulary size, special tokens included")
    p.add_argument("--out", required=True, help="output folder (tokenizer.json, tokenizer_config.json, ...)")
    p.add_argument("--min-frequency", type=int, default=2, help="merges seen fewer times are not learnt")
    p.set_defaults(func=_train_tokenizer_command)


def _train_tokenizer_command(args: argparse.Namespace) -> int:
    summary = train_tokenizer_files(args.files, args.vocab_size, args.out, args.min_frequency)
    print(f"saved a tokenizer with {summary['vocab_size']} tokens to {summary['out_dir']}")
    return 0


def _add_bench_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmark against transformers on the CPU (prefill, decode, memory)")
    p.add_argument(
        "--checkpoint", default=None, help="checkpoint folder (default .bench/bench-small, created)"
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="fewer decode steps, no 4096-token prompts")
    p.add_argument(
        "--variants",
        default="fp32,bf16,int8,int4,int8dq",
        help="comma list of fp32, bf16, int8, int4 (weight-only), int8dq (int8 weights and activations); "
        "fp32 is always measured, beside transformers (the ratios' baseline)",
    )
    p.add_argument("--long", action="store_true", help="also prefill a 32768-token prompt (chunked)")
    p.add_argument("--no-transformers", action="store_true", help="measure this project only")
    p.add_argument("--json", default=None, help="also write the full report here")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run everything this many times (pairs alternating) and report medians and ranges",
    )
    p.add_argument(
        "--allocator",
        choices=["default", "tuned"],
        default="tuned",
        help="tuned (bamba.runtime, as the command line runs) or glibc malloc as it comes, in both "
        "implementations' workers",
    )
    p.add_argument(
        "--llama-cpp",
        default=None,
        metavar="PATH",
        help="also measure llama.cpp (PATH: its build's bin folder or llama-bench binary) on the checkpoint "
        "exported to GGUF, beside each of ours",
    )
    p.set_defaults(func=_bench_command)


def _bench_command(args: argparse.Namespace) -> int:
    bench(**bench_arguments(args))
    return 0


def bench_arguments(args: argparse.Namespace) -> dict:
    """`bench`'s keyword arguments from the parsed `bamba bench` options (benchmarks/bench.py reads
    its own command line through this too)."""
    return dict(
        checkpoint=args.checkpoint,
        threads=args.threads,
        quick=args.quick,
        variants=tuple(v for v in args.variants.split(",") if v),
        long_prompt=args.long,
        transformers=not args.no_transformers,
        json_path=args.json,
        allocator=args.allocator,
        rounds=args.rounds,
        llama_cpp=args.llama_cpp,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
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
