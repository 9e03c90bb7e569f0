"""The same code on a CUDA GPU: parity with transformers, cached decoding, packed input, quantized models
and a training step. These run only where a GPU is present (CI has none; see the README for where they ran)."""

from __future__ import annotations

import pytest
import torch
from conftest import hf_model

from bamba import BambaForCausalLM, quantize
from bamba.data import DataCollatorWithFlattening

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = "cuda"


@pytest.fixture
def folder(tmp_path):
    ref = hf_model(seed=7, mamba_n_groups=2, attn_layer_indices=[0, 2], mamba_chunk_size=8)
    ref.save_pretrained(tmp_path)
    return ref, str(tmp_path)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_logits_and_greedy_generation_match_transformers_on_cuda(folder, dtype, tol):
    ref, path = folder
    ref = ref.to(CUDA, dtype)
    ours = BambaForCausalLM.from_pretrained(path, dtype=dtype, device=CUDA)
    assert ours.device.type == "cuda"
    ids = torch.randint(3, 97, (2, 21), device=CUDA)
    with torch.no_grad():
        expected = ref(ids, use_cache=False).logits.float()
        got = ours(ids).logits.float()
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)
    if dtype == torch.float32:
        want = ref.generate(ids, max_new_tokens=10, do_sample=False)
        assert torch.equal(ours.generate(ids, max_new_tokens=10), want)


def test_cached_decoding_and_packed_input_on_cuda(folder):
    _, path = folder
    model = BambaForCausalLM.from_pretrained(path, device=CUDA)
    ids = torch.randint(3, 97, (1, 19), device=CUDA)
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :11], use_cache=True)
        cache, steps = out.past_key_values, [out.logits]
        for t in range(11, 19):
            steps.append(model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=1e-4)

    examples = [torch.randint(3, 97, (n,)).tolist() for n in (7, 1, 9, 16)]
    batch = DataCollatorWithFlattening(return_seq_idx=True)([{"input_ids": e} for e in examples])
    batch = {k: v.to(CUDA) if torch.is_tensor(v) else v for k, v in batch.items()}
    with torch.no_grad():
        packed = model(**batch, use_cache=False).logits[0]
        alone = torch.cat(
            [model(torch.tensor([e], device=CUDA), use_cache=False).logits[0] for e in examples]
        )
    torch.testing.assert_close(packed, alone, atol=1e-4, rtol=1e-4)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((b - a).pow(2).mean().sqrt() / a.pow(2).mean().sqrt()).item()


@pytest.mark.parametrize(
    "method, bound", [("int8_weight_only", 0.03), ("int4_weight_only", 0.4), ("int8dq", 0.05)]
)
def test_quantized_models_run_on_cuda(folder, method, bound):
    """Off the CPU the quantized layers take their references (dequantize, then F.linear): they agree with
    the CPU's packed kernels (which see bf16 activations), and stay within test_quantize's bounds of fp32."""
    _, path = folder
    fp = BambaForCausalLM.from_pretrained(path, device=CUDA)
    on_cpu = quantize(BambaForCausalLM.from_pretrained(path), method, group_size=32)
    q = quantize(BambaForCausalLM.from_pretrained(path, device=CUDA), method, group_size=32)
    ids = torch.randint(3, 97, (2, 13), device=CUDA)
    with torch.no_grad():
        a, b, c = fp(ids).logits, q(ids).logits, on_cpu(ids.cpu()).logits
    assert _rel(a, b) < bound
    assert _rel(c, b.cpu()) < 0.02
    assert q.generate(ids, max_new_tokens=4).shape == (2, 17)


def test_a_training_step_on_cuda(folder):
    _, path = folder
    model = BambaForCausalLM.from_pretrained(path, device=CUDA).train()
    ids = torch.randint(3, 97, (2, 24), device=CUDA)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(3):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
