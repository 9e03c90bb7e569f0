"""The serving engine: continuous batching equals running each prompt alone, and the prefix-state cache is
exact (greedy tokens identical, logprobs within 1e-4 of an uncached run)."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import TINY

from bamba import BambaConfig, BambaForCausalLM
from bamba.cache import HybridMambaAttentionDynamicCache
from bamba.engine import Engine, Request, SamplingParams
from bamba.generation import generate
from bamba.sampling import default_eos_ids


@pytest.fixture(scope="module")
def edge_attention(demo_fp32):
    """A random model with attention at the first and last layers (and Mamba between), the demo's vocab."""
    torch.manual_seed(3)
    cfg = BambaConfig(**{**TINY, "vocab_size": 2048, "num_hidden_layers": 4, "attn_layer_indices": [0, 3]})
    model = BambaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("A_log", "dt_bias", "D", "bias")) or "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model, demo_fp32[1]


def run(engine: Engine, prompts: list[list[int]], **params) -> list[list]:
    """Submit every prompt, step the engine until idle; each request's events."""
    events = [[] for _ in prompts]
    for i, p in enumerate(prompts):
        engine.submit(Request(str(i), p, SamplingParams(**params), events[i].append))
    while engine.step():
        pass
    return events


def tokens(events, index: int = 0) -> list[int]:
    return [t for e in events if e.index == index for t in e.token_ids]


def prompts_sharing_a_prefix(tok) -> list[list[int]]:
    base = tok.encode("ROMEO:\nWhat light through yonder window breaks? It is the east, and Juliet " * 3)
    return [
        base + tok.encode(" is the sun."),
        tok.encode("JULIET:\n"),
        base + tok.encode(" and the moon"),
        base[:40],
        base,
        tok.encode("To be, or not to be"),
    ]


@pytest.mark.parametrize("which", ["demo_fp32", "edge_attention"])
def test_batched_greedy_equals_each_prompt_alone(which, request):
    """Rows of different lengths joining and leaving one batch decode exactly what `generate` gives for
    each prompt alone (max_running 3 forces joins into a running batch)."""
    model, tok = request.getfixturevalue(which)
    prompts = prompts_sharing_a_prefix(tok)
    eos = default_eos_ids(model)
    engine = Engine(model, tok, max_running=3, prefill_chunk=16, eos_ids=eos, prefix_cache_bytes=0)
    out = run(engine, prompts, max_tokens=12, temperature=0)
    for p, events in zip(prompts, out):
        alone = generate(model, torch.tensor([p]), max_new_tokens=12)[0, len(p) :].tolist()
        got = tokens(events)
        assert got == alone[: len(got)]
        assert len(got) == 12 or events[-1].finish_reason == "stop" and got[-1] in eos
    assert engine.rows == [] and engine.cache.batch_size is None  # everything left the batch


@pytest.mark.parametrize("which", ["demo_fp32", "edge_attention"])
def test_prefix_cache_is_exact(which, request):
    """Greedy tokens identical and logprobs within 1e-4 with the prefix cache on (second round: restored
    from snapshots) and off; a hit really skips prefill work."""
    model, tok = request.getfixturevalue(which)
    prompts = prompts_sharing_a_prefix(tok)
    params = dict(max_tokens=10, temperature=0, logprobs=3)
    plain = Engine(model, tok, prefill_chunk=16, prefix_cache_bytes=0)
    cached = Engine(model, tok, prefill_chunk=16, prefix_cache_bytes=2**28)
    reference = run(plain, prompts, **params)
    first = run(cached, prompts, **params)
    prefilled = cached.prefilled_tokens
    assert prefilled < plain.prefilled_tokens  # the shared prefix was read once
    second = run(cached, prompts, **params)
    assert cached.prefilled_tokens == prefilled  # every prompt (and more) was cached: nothing prefilled
    for ref, a, b in zip(reference, first, second):
        assert tokens(ref) == tokens(a) == tokens(b)
        lp = [torch.tensor([x.logprob for e in ev for x in e.logprobs]) for ev in (ref, a, b)]
        torch.testing.assert_close(lp[1], lp[0], atol=1e-4, rtol=0)
        torch.testing.assert_close(lp[2], lp[0], atol=1e-4, rtol=0)


def test_chat_turns_reread_only_the_new_message(demo_fp32):
    """The end of each reply is snapshot: the next turn's prompt (the conversation so far + a new
    message) prefills only the new part, and the reply equals an uncached run's."""
    model, tok = demo_fp32
    cached = Engine(model, tok, prefill_chunk=16, prefix_cache_bytes=2**28, eos_ids=default_eos_ids(model))
    plain = Engine(model, tok, prefill_chunk=16, prefix_cache_bytes=0, eos_ids=default_eos_ids(model))
    conversation: list[int] = []
    for turn in ["ROMEO:\nShall I", "\nJULIET:\nAy, and", "\nROMEO:\nThen"]:
        prompt = conversation + tok.encode(turn, add_special_tokens=not conversation)
        before = cached.prefilled_tokens
        reply = run(cached, [prompt], max_tokens=8, temperature=0)[0]
        assert tokens(reply) == tokens(run(plain, [prompt], max_tokens=8, temperature=0)[0])
        if conversation:  # everything up to the previous reply's last token came from the cache
            assert cached.prefilled_tokens - before <= len(prompt) - len(conversation) + 1
        conversation = prompt + tokens(reply)


def test_prompt_logprobs_match_the_model(edge_attention):
    """Echo logprobs: log_softmax of the model's own logits at every prompt position (first: none)."""
    model, tok = edge_attention
    prompt = prompts_sharing_a_prefix(tok)[0][:50]
    engine = Engine(model, tok, prefill_chunk=16)
    engine.submit(
        Request("p", prompt, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=2), lambda e: None)
    )
    request = engine.waiting[0]
    while engine.step():
        pass
    with torch.no_grad():
        logp = model(torch.tensor([prompt])).logits[0].float().log_softmax(-1)  # (l, vocab)
    assert request.prompt_logprobs[0] is None and len(request.prompt_logprobs) == len(prompt)
    got = torch.tensor([lp.logprob for lp in request.prompt_logprobs[1:]])
    want = logp[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    top = request.prompt_logprobs[5].top
    assert [i for i, _ in top[:2]] == logp[4].topk(2).indices.tolist()  # token 5, predicted at 4


def test_seeded_sampling_does_not_depend_on_the_batch(demo_fp32):
    """A seeded request draws the same tokens alone and beside other requests; n choices differ."""
    model, tok = demo_fp32
    prompt = tok.encode("ROMEO:\n")
    params = dict(max_tokens=10, temperature=1.0, top_p=0.9, seed=7)
    alone = run(Engine(model, tok), [prompt], **params)[0]
    crowd = run(Engine(model, tok), [tok.encode("JULIET:"), prompt, tok.encode("Ay")], **params)[1]
    assert tokens(alone) == tokens(crowd)
    two = run(Engine(model, tok), [prompt], **{**params, "n": 2})[0]
    assert tokens(two, 0) == tokens(alone) and tokens(two, 1) != tokens(alone)


def test_stop_strings_end_the_text_and_are_not_returned(demo_fp32):
    model, tok = demo_fp32
    prompt = tok.encode("ROMEO:\n")
    full = "".join(e.text for e in run(Engine(model, tok), [prompt], max_tokens=20, temperature=0)[0])
    stop = full[5:8]
    events = run(Engine(model, tok), [prompt], max_tokens=20, temperature=0, stop=[stop])[0]
    assert "".join(e.text for e in events) == full[: full.index(stop)]
    assert events[-1].finish_reason == "stop"


def test_an_aborted_request_frees_its_row(demo_fp32):
    model, tok = demo_fp32
    engine = Engine(model, tok)
    events = []
    engine.submit(
        Request("a", tok.encode("ROMEO:"), SamplingParams(max_tokens=1000, temperature=0), events.append)
    )
    for _ in range(4):
        engine.step()
    assert len(engine.rows) == 1
    engine.abort(engine.rows[0].request)
    engine.step()
    assert engine.rows == [] and not engine.step()


class Poisoned(torch.nn.Module):
    """The model, failing whenever a prefill holds token `poison`."""

    def __init__(self, model, poison: int) -> None:
        super().__init__()
        self.inner, self.poison, self.config = model, poison, model.config
        self.lm_head = model.lm_head

    def forward(self, input_ids, **kwargs):
        if input_ids.shape[1] > 1 and bool((input_ids == self.poison).any()):
            raise RuntimeError("poisoned prompt")
        return self.inner(input_ids, **kwargs)


def test_a_failing_request_fails_alone(demo_fp32):
    model, tok = demo_fp32
    engine = Engine(Poisoned(model, poison=5), tok)
    good = tok.encode("ROMEO:\n")
    out = run(engine, [[1, 5, 6, 7], good], max_tokens=6, temperature=0)
    assert out[0][-1].finish_reason == "error" and "poisoned prompt" in out[0][-1].error
    assert tokens(out[1]) == generate(model, torch.tensor([good]), max_new_tokens=6)[0, len(good) :].tolist()


def test_cache_rows_join_and_leave(edge_attention):
    """Row operations of the cache: a row restored from its state and joined to a batch of another length
    decodes as it would alone."""
    model, _ = edge_attention
    a, b = torch.arange(3, 20)[None], torch.arange(30, 37)[None]  # 17 and 7 tokens
    ca, cb = HybridMambaAttentionDynamicCache(model.config), HybridMambaAttentionDynamicCache(model.config)
    with torch.no_grad():
        model(a, past_key_values=ca, use_cache=True)
        model(b, past_key_values=cb, use_cache=True)
        restored = HybridMambaAttentionDynamicCache.from_row_state(model.config, cb.row_state(0, 7))
        ca.extend_batch(restored)  # (2 rows, 17 columns; b's 10 first are padding)
        mask = torch.ones(2, 18, dtype=torch.bool)
        mask[1, :10] = False
        nxt = torch.tensor([[50], [51]])
        batched = model(nxt, attention_mask=mask, past_key_values=ca, use_cache=True).logits[:, -1]
        alone = model(torch.cat([b, nxt[1:]], 1)).logits[0, -1]
        torch.testing.assert_close(batched[1], alone, atol=1e-5, rtol=1e-5)
        ca.select_batch(torch.tensor([1]))
        ca.drop_leading(10)
        assert ca.seen_tokens == 8 and ca.key_cache[0].shape[2] == 8
        again = model(torch.tensor([[52]]), past_key_values=ca, use_cache=True).logits[0, -1]
        torch.testing.assert_close(
            again, model(torch.cat([b, nxt[1:], torch.tensor([[52]])], 1)).logits[0, -1], atol=1e-5, rtol=1e-5
        )


def test_an_unexpected_engine_error_fails_the_requests_in_flight_and_the_engine_goes_on(
    demo_fp32, monkeypatch
):
    """A bug inside a step (not in the model) fails what is in flight; later requests are served."""
    model, tok = demo_fp32
    engine = Engine(model, tok)
    engine.start()
    try:
        real = Engine._decode
        monkeypatch.setattr(Engine, "_decode", lambda self: (_ for _ in ()).throw(KeyError("bug")))
        failed = threading.Event()
        engine.submit(
            Request(
                "a",
                tok.encode("ROMEO:"),
                SamplingParams(max_tokens=5, temperature=0),
                lambda e: e.error and failed.set(),
            )
        )
        assert failed.wait(30)
        monkeypatch.setattr(Engine, "_decode", real)
        done = threading.Event()
        events = []
        engine.submit(
            Request(
                "b",
                tok.encode("ROMEO:"),
                SamplingParams(max_tokens=5, temperature=0),
                lambda e: events.append(e) or (e.finish_reason and done.set()),
            )
        )
        assert done.wait(30) and events[-1].error is None and len(tokens(events)) == 5
    finally:
        engine.stop()


def test_sampling_from_nan_scores_fails_the_request_with_a_named_error(edge_attention):
    """A model whose weights hold NaN: a sampled request ends in an error that says so (sampling.draw),
    not torch's message about a probability tensor; greedy picks a token and goes on."""
    model, tok = edge_attention
    broken = BambaForCausalLM(model.config).eval()
    broken.load_state_dict(model.state_dict())
    with torch.no_grad():
        broken.lm_head.weight[0, 0] = float("nan")
    out = run(Engine(broken, tok, prefix_cache_bytes=0), [[5, 6, 7]], max_tokens=3, temperature=1.0, seed=0)
    assert out[0][-1].finish_reason == "error"
    assert out[0][-1].error.startswith("NonFiniteScores: the model's next-token scores are NaN"), out[0][-1]
