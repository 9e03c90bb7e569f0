"""Held-out loss / perplexity of a model on a corpus, against a unigram baseline, and under quantization.

Uses the trainer's own tokenization and held-out split (same seed and fraction as `bamba train`), so for
the demo model it reports the held-out figures of its recipe:

    python benchmarks/eval_heldout.py --model src/bamba/demo --corpus ../shared/data/tinyshakespeare.txt \
        --quantize int8_weight_only int4_weight_only [--write-heldout tests/data/heldout.txt]

The unigram baseline is add-one-smoothed token frequencies of the training split, scored on the same
held-out targets (every token of a document but its first, BOS).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from collections import Counter

import torch

from bamba import BambaForCausalLM
from bamba.data import load_tokenizer, pack_examples, split_eval, tokenize_documents
from bamba.evaluate import evaluate
from bamba.textfiles import iter_text_files


def heldout_loss(model: BambaForCausalLM, docs: list[list[int]], row_tokens: int = 1024) -> float:
    """Mean next-token cross-entropy over the documents (packed, padding-free), as the trainer's eval."""
    rows = list(pack_examples(docs, row_tokens))
    with torch.no_grad():
        loss, _ = evaluate(model, rows, 0, 1, torch.device("cpu"), contextlib.nullcontext)
    return loss


def unigram_loss(train_docs: list[list[int]], eval_docs: list[list[int]], vocab: int) -> float:
    counts = Counter(t for d in train_docs for t in d[1:])
    total = sum(counts.values())
    targets = [t for d in eval_docs for t in d[1:]]
    return -sum(math.log((counts[t] + 1) / (total + vocab)) for t in targets) / len(targets)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--eval-fraction", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quantize", nargs="*", default=[])
    ap.add_argument("--write-heldout", default=None, help="write the held-out documents as text")
    args = ap.parse_args()
    tok = load_tokenizer(args.model)
    docs = tokenize_documents(list(iter_text_files([args.corpus])), tok)
    train_docs, eval_docs = split_eval(docs, args.eval_fraction, args.seed)
    results = {"heldout_docs": len(eval_docs), "heldout_targets": sum(len(d) - 1 for d in eval_docs)}
    results["unigram_loss"] = unigram_loss(train_docs, eval_docs, len(tok))
    for method in [None, *args.quantize]:
        model = BambaForCausalLM.from_pretrained(args.model, dtype=torch.float32, quantization=method)
        results[f"loss_{method or 'fp32'}"] = heldout_loss(model, eval_docs)
    for key in [k for k in results if k.endswith("_loss") or k.startswith("loss_")]:
        print(f"{key:<28} {results[key]:.4f}  (perplexity {math.exp(results[key]):.2f})")
    print(json.dumps(results))
    if args.write_heldout:
        with open(args.write_heldout, "w") as f:
            f.write("\n\n".join(tok.decode(d, skip_special_tokens=True) for d in eval_docs) + "\n")


if __name__ == "__main__":
    main()
