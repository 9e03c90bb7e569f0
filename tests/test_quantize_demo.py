"""Quantization accuracy on the demo model: held-out perplexity (Tiny Shakespeare documents the demo never
saw in training, shipped in tests/data) rises by at most 1% with int8 (weight-only, or with dynamic int8
activations) and 5% with int4."""

from __future__ import annotations

import contextlib
import math
import os

import pytest
import torch

from bamba import BambaForCausalLM
from bamba.data import load_tokenizer, pack_examples, tokenize_documents
from bamba.demo import demo_path
from bamba.evaluate import evaluate
from bamba.textfiles import iter_text_files

HELDOUT = os.path.join(os.path.dirname(__file__), "data", "heldout.txt")


@pytest.fixture(scope="module")
def rows():
    docs = tokenize_documents(list(iter_text_files([HELDOUT])), load_tokenizer(demo_path()))
    assert sum(len(d) for d in docs) > 10_000
    return list(pack_examples(docs, 1024))


def heldout_ppl(model: BambaForCausalLM, rows) -> float:
    with torch.no_grad():
        loss, _ = evaluate(model, rows, 0, 1, torch.device("cpu"), contextlib.nullcontext)
    return math.exp(loss)


@pytest.fixture(scope="module")
def fp32_ppl(rows):
    return heldout_ppl(BambaForCausalLM.from_pretrained(demo_path(), dtype=torch.float32), rows)


@pytest.mark.parametrize(
    "method, max_rise",
    [("int8_weight_only", 0.01), ("int4_weight_only", 0.05), ("int8_dynamic_activation_int8_weight", 0.01)],
)
def test_heldout_perplexity_rise(rows, fp32_ppl, method, max_rise):
    model = BambaForCausalLM.from_pretrained(demo_path(), dtype=torch.float32, quantization=method)
    ppl = heldout_ppl(model, rows)
    assert (
        fp32_ppl < 60
    )  # the demo model has learned something (unigram baseline on the same documents: ~457)
    assert ppl <= fp32_ppl * (1 + max_rise), (method, ppl, fp32_ppl)
