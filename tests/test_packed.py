"""Exactness of the padding-free (packed) path: one row holding many examples must give, for every example,
the logits, loss and parameter gradients of running that example alone.

The model is tiny with mamba_chunk_size=8 so example boundaries fall inside chunks, on chunk edges and span
several chunks; n_groups=2 and attention at the first and last layers. The reference is our own model run on
each example separately (transformers' PyTorch path does not take packed input); those separate runs are in
turn compared with transformers once, so the reference itself is anchored.
"""

from __future__ import annotations

import random

import pytest
import torch
from conftest import hf_model

from bamba import BambaForCausalLM
from bamba.data import DataCollatorWithFlattening

OVERRIDES = dict(mamba_n_groups=2, attn_layer_indices=[0, 2], mamba_chunk_size=8)
# Each case: example lengths. Boundaries inside a chunk, on a chunk edge (8, 16), 1-token examples, and
# examples spanning several chunks.
CASES = {
    "ones": [1, 1, 1],
    "chunk_edges": [8, 8, 3],
    "mixed": [7, 9, 16, 1, 5],
    "long": [30, 2, 17],
    **{f"random{seed}": [random.Random(seed).randint(1, 30) for _ in range(2 + seed)] for seed in range(4)},
}
# Which of the collator's extra inputs the packed forward receives (position_ids are always given).
VARIANTS = {
    "position_ids": dict(),
    "seq_idx": dict(return_seq_idx=True),
    "cu_seq_lens": dict(return_flash_attn_kwargs=True),
    "all": dict(return_seq_idx=True, return_flash_attn_kwargs=True),
}
ATOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(transformers model, our model) with the same random weights (A_log, D, dt_bias, norms perturbed)."""
    ref = hf_model(seed=3, **OVERRIDES)
    folder = tmp_path_factory.mktemp("packed") / "model"
    ref.save_pretrained(folder)
    ours = BambaForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    ours.train()  # dropout is 0: train mode changes nothing but what a trainer would run
    return ref, ours


def make_examples(lengths: list[int], seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 97, (n,), generator=g).tolist() for n in lengths]


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("case", list(CASES))
def test_packed_equals_separate(models, case, variant):
    _, model = models
    lengths = CASES[case]
    examples = make_examples(lengths, seed=len(case))
    n_targets = sum(n - 1 for n in lengths)  # each example predicts all its tokens but the first

    # Separate: each example alone, loss summed over its tokens and divided by the packed total.
    model.zero_grad(set_to_none=True)
    separate_logits, separate_sums = [], []
    for ex in examples:
        ids = torch.tensor([ex])  # (1, n)
        out = model(ids, labels=ids, num_items_in_batch=n_targets, use_cache=False)
        (out.loss * 1.0).backward()
        separate_logits.append(out.logits[0].detach())  # (n, vocab)
        separate_sums.append(out.loss.detach() * n_targets)
    separate_grads = grads(model)

    # Packed: one row from the collator.
    batch = DataCollatorWithFlattening(**VARIANTS[variant])([{"input_ids": ex} for ex in examples])
    assert batch["input_ids"].shape == (1, sum(lengths))
    out = model(**batch, use_cache=False)  # labels from the collator: -100 at each example's first token
    out.loss.backward()
    packed_grads = grads(model)

    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    for i, logits in enumerate(separate_logits):
        torch.testing.assert_close(
            out.logits[0, offsets[i] : offsets[i + 1]], logits, atol=ATOL, rtol=ATOL, msg=f"example {i}"
        )
    if n_targets == 0:  # only 1-token examples: the mean over no targets is nan, as in transformers
        assert torch.isnan(out.loss)
        return
    # packed mean loss == token-weighted mean of the separate losses
    torch.testing.assert_close(out.loss.detach(), sum(separate_sums) / n_targets, atol=ATOL, rtol=ATOL)
    assert packed_grads.keys() == separate_grads.keys()
    for name, g in separate_grads.items():
        torch.testing.assert_close(packed_grads[name], g, atol=ATOL, rtol=1e-4, msg=name)


def test_packing_without_boundaries_would_differ(models):
    """The check above can fail: the same row read as one sequence gives other logits after the first example."""
    _, model = models
    examples = make_examples([9, 12], seed=0)
    batch = DataCollatorWithFlattening()([{"input_ids": ex} for ex in examples])
    with torch.no_grad():
        packed = model(batch["input_ids"], position_ids=batch["position_ids"]).logits
        plain = model(batch["input_ids"]).logits
    torch.testing.assert_close(packed[:, :9], plain[:, :9], atol=ATOL, rtol=ATOL)
    assert (packed[:, 9:] - plain[:, 9:]).abs().max() > 1e-2


def test_separate_reference_matches_transformers(models):
    """Anchor the reference: our single-example logits and loss are transformers' for the same weights."""
    ref, model = models
    for ex in make_examples(CASES["long"], seed=4):
        ids = torch.tensor([ex])
        with torch.no_grad():
            ours = model(ids, labels=ids, use_cache=False)
            theirs = ref(ids, labels=ids, use_cache=False)
        torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ours.loss, theirs.loss, atol=1e-5, rtol=1e-5)


def test_mismatched_cu_seq_lens_are_refused():
    from conftest import TINY

    from bamba import BambaConfig, BambaForCausalLM

    model = BambaForCausalLM(BambaConfig(**TINY)).eval()
    ids = torch.randint(1, 97, (1, 10))
    with pytest.raises(ValueError, match="cu_seq_lens_q and cu_seq_lens_k differ"):
        model(ids, cu_seq_lens_q=torch.tensor([0, 4, 10]), cu_seq_lens_k=torch.tensor([0, 5, 10]))
    with pytest.raises(ValueError, match="cu_seq_lens must rise from 0 to batch\\*length=10"):
        model(ids, cu_seq_lens_q=torch.tensor([0, 4, 9]))
    with pytest.raises(ValueError, match="cu_seq_lens must rise from 0 to batch\\*length=10, found \\[\\]"):
        model(ids, cu_seq_lens_q=torch.tensor([], dtype=torch.long))


def test_bad_packing_inputs_are_refused():
    """A seq_idx id that comes back would join two sequences; conflicting boundaries, wrong shapes and
    1-D input_ids are refused with the argument named."""
    from conftest import TINY

    from bamba import BambaConfig, BambaForCausalLM

    model = BambaForCausalLM(BambaConfig(**TINY)).eval()
    ids = torch.randint(1, 97, (1, 10))
    with pytest.raises(ValueError, match="seq_idx must be non-decreasing"):
        model(ids, seq_idx=torch.tensor([[0, 0, 0, 1, 1, 1, 0, 0, 0, 0]]))
    with pytest.raises(ValueError, match="seq_idx must be an integer tensor of shape \\(1, 10\\)"):
        model(ids, seq_idx=torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="seq_idx and cu_seq_lens give different sequence boundaries"):
        model(ids, seq_idx=torch.tensor([[0] * 5 + [1] * 5]), cu_seq_lens_q=torch.tensor([0, 4, 10]))
    with pytest.raises(
        ValueError, match="position_ids must be \\(batch=1 or 1, length=10\\), found shape \\(1, 9\\)"
    ):
        model(ids, position_ids=torch.arange(9)[None])
    with pytest.raises(ValueError, match="input_ids must be 2-D"):
        model(ids[0])
    with pytest.raises(ValueError, match="labels contain 200, outside the vocabulary \\[0, 97\\)"):
        model(ids, labels=torch.full_like(ids, 200))
    # 1-D position_ids are one row for every batch row (they once met the heads' dimension in rotary)
    ids4 = torch.randint(1, 97, (2, 4))
    with torch.no_grad():
        torch.testing.assert_close(
            model(ids4, position_ids=torch.arange(4), use_cache=False).logits,
            model(ids4, position_ids=torch.arange(4)[None].expand(2, 4), use_cache=False).logits,
        )
    # Lists are taken as tensors, and boundaries given twice that agree are fine.
    with torch.no_grad():
        a = model(ids, cu_seq_lens_q=[0, 4, 10], use_cache=False).logits
        b = model(
            ids, seq_idx=torch.tensor([[3] * 4 + [7] * 6]), cu_seq_lens_q=torch.tensor([0, 4, 10])
        ).logits
    torch.testing.assert_close(a, b)


def test_packed_markers_that_contradict_each_other_or_a_cache_are_refused():
    """position_ids that restart inside a sequence marked by cu_seq_lens / seq_idx, a sequence running
    across rows, and a cache asked of packed input: each used to go through and give logits that match
    neither reading. Positions that continue across a boundary stay fine (rotary is relative)."""
    from conftest import TINY

    from bamba import BambaConfig, BambaForCausalLM, HybridMambaAttentionDynamicCache

    model = BambaForCausalLM(BambaConfig(**TINY)).eval()
    ids = torch.randint(1, 97, (1, 12))
    restarts = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4]])  # 4 + 3 + 5 tokens
    cu = torch.tensor([0, 3, 7, 12])  # 3 + 4 + 5 tokens
    with pytest.raises(
        ValueError, match="position_ids jump from 3 to 0 at row 0, token 4, inside a sequence"
    ):
        model(ids, position_ids=restarts, cu_seq_lens_q=cu, use_cache=False)
    with pytest.raises(ValueError, match="position_ids jump"):
        model(
            ids, position_ids=restarts, seq_idx=torch.tensor([[0] * 3 + [1] * 4 + [2] * 5]), use_cache=False
        )
    with torch.no_grad():
        by_cu = model(ids, cu_seq_lens_q=cu, use_cache=False).logits
        along = model(ids, cu_seq_lens_q=cu, position_ids=torch.arange(12)[None], use_cache=False).logits
    torch.testing.assert_close(along, by_cu, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="has a sequence running across rows of length 6"):
        model(ids.view(2, 6), cu_seq_lens_q=torch.tensor([0, 4, 12]), use_cache=False)

    # a cache: none by default for packed input; asked for, refused
    with torch.no_grad():
        assert model(ids, cu_seq_lens_q=cu).past_key_values is None
    for kw in (dict(use_cache=True), dict(past_key_values=HybridMambaAttentionDynamicCache(model.config))):
        with pytest.raises(ValueError, match="packed input .* cannot fill a cache"):
            model(ids, cu_seq_lens_q=cu, **kw)
