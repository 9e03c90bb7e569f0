"""Every decoder layer under `torch.compile` (inductor, CPU) with fullgraph=True: one graph per layer, so a
graph break inside a Mamba or attention layer fails here instead of running eagerly unseen; and the same
losses, gradients and cached decoding as eagerly. This guards the layers' fast paths (oneDNN linears, the
chunked scan, the decode steps) against ops that inductor cannot lower. (The model's own forward around
the layers graph-breaks on purpose: the token-id check and the loss's token count read tensors.)"""

from __future__ import annotations

import pytest
import torch
from conftest import TINY

from bamba import BambaConfig, BambaForCausalLM, HybridMambaAttentionDynamicCache

# one Mamba and one attention layer: the smallest model with both kinds
CFG = {**TINY, "num_hidden_layers": 2, "attn_layer_indices": [1]}


def compile_layers(model: BambaForCausalLM):
    """Compile each decoder layer in place (fullgraph); returns the counter of the graphs compiled."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    for layer in model.model.layers:
        layer.compile(backend=counter, fullgraph=True)
    return counter


@pytest.mark.filterwarnings("ignore:`torch.jit.script")  # raised inside torch.compile's own imports
def test_compiled_layers_train_as_eager():
    torch.manual_seed(0)
    model = BambaForCausalLM(BambaConfig(**CFG))
    ids = torch.randint(1, 97, (2, 16))
    loss = model(ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    counter = compile_layers(model)
    compiled_loss = model(ids, labels=ids).loss
    compiled_loss.backward()
    assert counter.frame_count >= 1  # the layers ran compiled (a fallback to eager compiles nothing)
    torch.testing.assert_close(compiled_loss, loss)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], atol=1e-6, rtol=1e-4, msg=n)  # measured 1.2e-7


@pytest.mark.filterwarnings("ignore:`torch.jit.script")
def test_compiled_layers_decode_as_eager():
    torch.manual_seed(0)
    model = BambaForCausalLM(BambaConfig(**CFG)).eval()
    ids = torch.randint(1, 97, (2, 15))
    pieces = ((0, 12), (12, 13), (13, 14), (14, 15))  # a prompt, then token by token
    with torch.no_grad():
        cache = HybridMambaAttentionDynamicCache(model.config)
        expected = [model(ids[:, s:e], past_key_values=cache).logits for s, e in pieces]
        counter = compile_layers(model)
        cache = HybridMambaAttentionDynamicCache(model.config)
        for (s, e), want in zip(pieces, expected):
            got = model(ids[:, s:e], past_key_values=cache).logits
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)  # measured 7e-8
    assert counter.frame_count >= 2  # the prompt's graphs and the decode step's
    assert cache.get_seq_length() == 15
