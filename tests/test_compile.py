"""A whole model under `torch.compile` (inductor, CPU): the same losses, gradients and cached decoding as
eagerly. Compiling the tiny model takes about a minute here; this guards every layer's fast paths (oneDNN
linears, the chunked scan, the decode steps) against ops that inductor cannot lower."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY

from bamba import BambaConfig, BambaForCausalLM, HybridMambaAttentionDynamicCache


@pytest.mark.filterwarnings("ignore:`torch.jit.script")  # raised inside torch.compile's own imports
def test_compiled_model_trains_and_decodes_as_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = BambaForCausalLM(BambaConfig(**TINY))
    ids = torch.randint(1, 97, (2, 24))
    loss = model(ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    compiled = torch.compile(model)
    compiled_loss = compiled(ids, labels=ids).loss
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss, loss)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], atol=1e-6, rtol=1e-4, msg=n)

    model.eval()
    with torch.no_grad():
        eager_cache = HybridMambaAttentionDynamicCache(model.config)
        compiled_cache = HybridMambaAttentionDynamicCache(model.config)
        for start, end in ((0, 20), (20, 21), (21, 22), (22, 23)):  # a prompt, then token by token
            chunk = ids[:, start:end]
            expected = model(chunk, past_key_values=eager_cache).logits
            got = compiled(chunk, past_key_values=compiled_cache).logits
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert compiled_cache.get_seq_length() == 23
