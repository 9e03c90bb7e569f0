"""The command line: generate / info on a tiny folder, and one-line errors with a non-zero exit."""

from __future__ import annotations

import importlib
import io
import subprocess
import sys
from collections.abc import Callable

import pytest
import torch

from bamba import BambaConfig, BambaForCausalLM
from bamba.cli import main
from bamba.tokenizer import Tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from conftest import TINY

    root = tmp_path_factory.mktemp("cli")
    corpus = root / "c.txt"
    corpus.write_text("to be or not to be, that is the question\n" * 40)
    train_tokenizer([str(corpus)], vocab_size=300, out_dir=str(root / "m"), min_frequency=1)
    torch.manual_seed(0)
    BambaForCausalLM(
        BambaConfig(**{**TINY, "vocab_size": 300, "max_position_embeddings": 64})
    ).save_pretrained(root / "m")
    return str(root / "m")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bamba", *args], capture_output=True, text=True, timeout=120)


def test_generate_streams_text(folder, capsys):
    assert main(["generate", "--model", folder, "--max-new-tokens", "5", "--temperature", "0", "to be"]) == 0
    greedy = capsys.readouterr().out
    assert main(["generate", "--model", folder, "--max-new-tokens", "5", "--seed", "1", "to be"]) == 0
    assert main(["generate", "--model", folder, "--max-new-tokens", "5", "--seed", "1", "to be"]) == 0
    a, b = capsys.readouterr().out.split("\n")[:2]
    assert a == b and a.startswith("to be")  # same seed, same text; the prompt is echoed first
    assert greedy.startswith("to be") and greedy.endswith("\n")


def test_generate_sampling_flags_and_dtype(folder, capsys, monkeypatch):
    """--top-k 1, or a --top-p that keeps only the likeliest token, sample what greedy decoding gives;
    without them the same seed draws other text. --dtype loads the model in that dtype."""
    import bamba.chat

    args = ["generate", "--model", folder, "--max-new-tokens", "8"]
    outputs = {}
    for name, extra in [
        ("greedy", ["--temperature", "0"]),
        ("top_k_1", ["--temperature", "1", "--seed", "5", "--top-k", "1"]),
        ("top_p_tiny", ["--temperature", "1", "--seed", "5", "--top-p", "1e-6"]),
        ("sampled", ["--temperature", "1", "--seed", "5", "--top-p", "1"]),
    ]:
        assert main([*args, *extra, "to be"]) == 0
        outputs[name] = capsys.readouterr().out
    assert outputs["top_k_1"] == outputs["top_p_tiny"] == outputs["greedy"] != outputs["sampled"]
    dtypes = []
    real = bamba.chat.generate
    monkeypatch.setattr(
        bamba.chat, "generate", lambda lm, *a, **k: dtypes.append(lm.dtype) or real(lm, *a, **k)
    )
    for dtype in ("bfloat16", "float16"):
        assert main([*args, "--temperature", "0", "--dtype", dtype, "to be"]) == 0
    assert dtypes == [torch.bfloat16, torch.float16]


def test_generate_with_beams(folder, capsys):
    """--num-beams: beam search (plain with --temperature 0), the text printed at the end, as generate's."""
    from bamba.generation import generate
    from bamba.tokenizer import Tokenizer

    args = ["generate", "--model", folder, "--max-new-tokens", "8", "--temperature", "0", "--num-beams", "3"]
    assert main([*args, "to be"]) == 0
    out = capsys.readouterr().out
    tok, model = Tokenizer.from_pretrained(folder), BambaForCausalLM.from_pretrained(folder)
    ids = torch.tensor([tok.encode("to be")])
    beams = generate(model, ids, max_new_tokens=8, num_beams=3, eos_token_id=tok.eos_token_id)
    greedy = generate(model, ids, max_new_tokens=8, eos_token_id=tok.eos_token_id)
    assert not torch.equal(beams, greedy)  # (so the output below shows the beams were used)
    assert out == "to be" + tok.decode(beams[0, ids.shape[1] :].tolist(), skip_special_tokens=True) + "\n"


@pytest.mark.parametrize(
    "short, method",
    [
        ("int8", "int8_weight_only"),
        ("int4", "int4_weight_only"),
        ("int8dq", "int8_dynamic_activation_int8_weight"),
    ],
)
def test_generate_quantize_names(folder, capsys, monkeypatch, short, method):
    """Each --quantize name quantizes the loaded model with its method, then generates."""
    module = importlib.import_module("bamba.quantize")  # `bamba.quantize` is also the function
    formats = []

    def spy(model, *args, **kwargs):
        out = real(model, *args, **kwargs)
        formats.append(out.quantization_config["format"])
        return out

    real = module.quantize
    monkeypatch.setattr(module, "quantize", spy)
    args = ["generate", "--model", folder, "--max-new-tokens", "5", "--temperature", "0", "--quantize", short]
    assert main([*args, "to be"]) == 0
    assert formats == [method] and capsys.readouterr().out.startswith("to be")


def test_generate_verbose_reports_speed(folder, capsys):
    args = [
        "generate",
        "--model",
        folder,
        "--max-new-tokens",
        "6",
        "--temperature",
        "0",
        "--verbose",
        "to be",
    ]
    assert main(args) == 0
    err = capsys.readouterr().err
    n_prompt = len(Tokenizer.from_pretrained(folder).encode("to be"))
    assert f"prompt {n_prompt} tokens, first token after " in err, err
    assert " tok/s, weights read at " in err and "GB/s" in err, err


def test_generate_text_stats(folder):
    from bamba.chat import generate_text
    from bamba.linear import weight_bytes

    stats: dict = {}
    text = generate_text("to be", model=folder, max_new_tokens=6, temperature=0, stats=stats)
    assert stats["new_tokens"] >= 1 and stats["decode_s"] >= 0 and stats["first_token_s"] > 0
    model = BambaForCausalLM.from_pretrained(folder)
    embed = model.model.embed_tokens.weight
    assert stats["decode_bytes"] == weight_bytes(model) - embed.numel() * embed.element_size()  # untied
    assert isinstance(text, str)


def test_info(folder, capsys, tmp_path):
    """The figures `bamba info` reads from headers only are those of the model and of a filled cache."""
    from bamba import HybridMambaAttentionDynamicCache
    from bamba.info import model_info

    assert main(["info", folder]) == 0
    out = capsys.readouterr().out
    assert "MAM" in out and "parameters" in out and "quantized" not in out
    info = model_info(folder)
    model = BambaForCausalLM.from_pretrained(folder)
    n = sum(p.numel() for p in model.parameters())
    assert info["parameters"] == n and f"parameters   {n:,} (float32 on disk" in out
    assert info["stored_bytes"] == sum(t.numel() * t.element_size() for t in model.state_dict().values())
    cache = HybridMambaAttentionDynamicCache(model.config)
    with torch.no_grad():
        model(torch.randint(1, 300, (1, 10)), past_key_values=cache)  # one sequence of 10 tokens
    state = sum(
        t.numel() * t.element_size() for t in (*cache.conv_states, *cache.ssm_states) if t is not None
    )
    kv = sum(t.numel() * t.element_size() for t in (*cache.key_cache, *cache.value_cache) if t is not None)
    assert info["mamba_state_bytes_per_sequence_fp32"] == state
    assert info["kv_cache_bytes_per_token_fp32"] * 10 == kv
    BambaForCausalLM.from_pretrained(folder, quantization="int8dq").save_pretrained(tmp_path)
    assert main(["info", str(tmp_path)]) == 0
    n = len(BambaForCausalLM.from_pretrained(str(tmp_path)).quantization_config["modules"])
    assert n == 3 * 3 + 2 * 2 + 4 + 1  # 3 MLPs, 2 Mamba in/out projections, attention q/k/v/o, lm_head
    assert f"quantized    int8_dynamic_activation_int8_weight: {n} Linear layers" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "--model", "/no/such/folder", "hi"], "no such checkpoint folder"),
        (["generate", "--dtype", "int3", "hi"], "dtype='int3' is not a floating-point torch dtype"),
        (["generate", "--device", "cuda", "hi"], "CUDA is not available"),
        (["generate", "--device", "toaster", "hi"], "--device='toaster' is not one device"),
        (["generate", "   "], "the prompt is empty"),
        (["generate", "to be " * 40], "longer than the model's context"),
        (["generate", "--temperature", "nan", "hi"], "--temperature nan must be a finite number >= 0"),
        (["generate", "--temperature", "inf", "hi"], "--temperature inf must be a finite number >= 0"),
        (["generate", "--seed", str(10**23), "hi"], "--seed 100000000000000000000000 must be in [0, 2**63)"),
        (["generate", "caf\udce9"], "the prompt is not valid UTF-8 text (byte b'\\xe9' at character 3)"),
        (
            ["train-tokenizer", ".", "--out", "x", "--vocab-size", "300"],
            ". is a folder; give the .txt or .jsonl files in it",
        ),
        (["bench", "--no-transformers", "--json", "."], "is a folder; give a file path"),
        (["bench", "--no-transformers", "--variants", ","], "variants: none given"),
        (["generate", "--device", "meta", "hi"], "a meta device holds no data"),
        (["generate", "--num-beams", "0", "hi"], "--num-beams 0 must be an integer >= 1"),
        (["generate", "--model", "", "hi"], "an empty path is not a checkpoint folder"),  # was the demo
        (["info", ""], "an empty path is not a checkpoint folder"),
        (["bench", "--threads", "0", "--no-transformers"], "threads=0: expected an integer >= 1"),
    ],
)
def test_errors_are_one_line_and_nonzero(folder, capsys, args, message):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    if "--model" not in args and args[0] == "generate":
        args = [args[0], "--model", folder, *args[1:]]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_python_dash_m_bamba(folder):
    r = run_cli("info", folder, "--json")
    assert r.returncode == 0 and '"parameters"' in r.stdout
    r = run_cli("generate", "--model", "/nope", "x")
    assert r.returncode == 2 and r.stderr.startswith("bamba generate: error:") and "Traceback" not in r.stderr


def test_chat_loop_uses_the_template_and_keeps_history(folder, monkeypatch):
    import bamba.chat as g
    from bamba.chat import chat
    from bamba.tokenizer import Tokenizer

    seen: list[str] = []
    real = g.generate

    def recording_generate(model, ids, **kw):
        seen.append(Tokenizer.from_pretrained(folder).decode(ids[0].tolist()))
        return real(model, ids, **kw)

    monkeypatch.setattr(g, "generate", recording_generate)
    real_load = g.load_for_cli

    def load_with_long_context(*args):
        lm, tok = real_load(*args)
        lm.config.max_position_embeddings = 4096  # the fixture's 64 would truncate the history
        return lm, tok

    monkeypatch.setattr(g, "load_for_cli", load_with_long_context)

    lines = iter(["to be", "or not"])
    prompts: list[str] = []
    out: list[str] = []

    def fake_input(prompt: str) -> str:
        prompts.append(prompt)
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    chat(model=folder, max_new_tokens=3, temperature=0, input_fn=fake_input, output_fn=out.append)
    assert prompts == ["> ", "> ", "> "]  # two turns, then EOF ends the loop
    assert out.count("\n") == 3  # after each reply, and after the last "> " at EOF
    assert "<|user|>\nto be" in seen[0] and seen[0].rstrip().endswith("<|assistant|>")
    assert seen[1].startswith(seen[0]) and "<|user|>\nor not" in seen[1]  # the history is kept


def _scripted_lines(lines: list[str]) -> Callable[[str], str]:
    """An input_fn giving `lines`, then EOF."""
    it = iter(lines)

    def read(prompt: str) -> str:
        line = next(it, None)
        if line is None:
            raise EOFError
        return line

    return read


def _recording_generate(monkeypatch, **override) -> list[list[int]]:
    """Record the prompt ids of each generate call the chat makes (with `override` applied to its options)."""
    import bamba.chat as g

    prompts: list[list[int]] = []
    real = g.generate

    def recording(model, ids, **kw):
        prompts.append(ids[0].tolist())
        return real(model, ids, **{**kw, **override})

    monkeypatch.setattr(g, "generate", recording)
    return prompts


def test_chat_leaves_out_whole_old_turns_to_fit_the_context(folder, monkeypatch, capsys):
    """Past the model's context (64 tokens here) less the reply's budget, the oldest turns are left out,
    whole: every prompt is the template's rendering of the system message and the latest turns. (The
    prompt's oldest tokens were cut, starting it inside an earlier message without its system part.)"""
    from bamba.chat import chat
    from bamba.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(folder)
    prompts = _recording_generate(monkeypatch, max_new_tokens=2)
    lines = ["to be or not", "that is the question", "to be", "or not to be", "the question"]
    system = {"role": "system", "content": "be brief"}
    chat(
        model=folder,
        max_new_tokens=4,
        temperature=0,
        system="be brief",
        input_fn=_scripted_lines(lines),
        output_fn=lambda s: None,
    )
    assert len(prompts) == 5 and all(len(p) <= 64 - 4 for p in prompts)
    text = [tok.decode(p) for p in prompts]
    assert "be brief" in text[0] and "to be or not" in text[0]
    left_out = 0
    for i, t in enumerate(text):  # each: system + whole turns (replies not checked) + the newest line
        user_lines = [line for line in lines[: i + 1] if f"<|user|>\n{line}" in t]
        assert user_lines[-1] == lines[i] and user_lines == lines[i + 1 - len(user_lines) : i + 1]
        assert t.startswith(tok.apply_chat_template([system], tokenize=False))
        left_out = max(left_out, i + 1 - len(user_lines))
    assert left_out > 0
    err = capsys.readouterr().err
    assert "the oldest turn is left out of the prompt (1 so far)" in err


def test_chat_refuses_a_line_it_cannot_take_and_goes_on(folder, monkeypatch, capsys):
    """A line that is not UTF-8, or whose prompt alone exceeds the context, is refused with a message and
    the chat goes on (it ended the session, or cut the prompt's start)."""
    from bamba.chat import chat

    prompts = _recording_generate(monkeypatch, max_new_tokens=1)
    long_line = " ".join(["to be or not to be"] * 40)  # far beyond 64 tokens
    bad = "to be \udcff"  # an undecodable byte, as input() gives it (surrogateescape)
    chat(
        model=folder,
        max_new_tokens=100,
        temperature=0,
        input_fn=_scripted_lines([bad, long_line, "to be"]),
        output_fn=lambda s: None,
    )
    err = capsys.readouterr().err
    assert "the input line is not valid UTF-8 text" in err and "type it again" in err
    assert "beyond the model's context (64 tokens); type a shorter one" in err
    assert len(prompts) == 1  # only "to be" was answered: its prompt whole, though the budget is 100
    # and its reply within the context (it could run past max_position_embeddings)
    assert f"this reply can take {64 - len(prompts[0])} tokens, not 100" in err
    # a refused line leaves the history as it was (it first left out every earlier turn)
    prompts.clear()
    chat(
        model=folder,
        max_new_tokens=4,
        temperature=0,
        input_fn=_scripted_lines(["to be", long_line, "or"]),
        output_fn=lambda s: None,
    )
    assert len(prompts) == 2 and "left out" not in capsys.readouterr().err
    assert prompts[1][: len(prompts[0])] == prompts[0]  # the first turn is still there


def test_chat_template_refusals_are_one_line_and_system_is_passed(folder, monkeypatch, capsys):
    import bamba.chat as g

    real_load = g.load_for_cli

    def load_strict(*args):
        lm, tok = real_load(*args)
        tok.chat_template = (
            "{% if messages[0]['role'] != 'system' %}{{ raise_exception('a system message is needed') }}"
            "{% endif %}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
        )
        return lm, tok

    monkeypatch.setattr(g, "load_for_cli", load_strict)
    prompts = _recording_generate(monkeypatch, max_new_tokens=1)
    args = ["chat", "--model", folder, "--max-new-tokens", "2"]
    monkeypatch.setattr("sys.stdin", io.StringIO("to be\n"))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "the chat template refused the conversation: a system message is needed (--system gives" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    monkeypatch.setattr("sys.stdin", io.StringIO("to be\n"))
    assert main([*args, "--system", "be brief"]) == 0
    assert len(prompts) == 1


def test_chat_passes_top_k_and_seeds_the_conversation_once(folder, monkeypatch):
    import bamba.chat as g
    from bamba.chat import chat

    calls: list[dict] = []
    real = g.generate

    def recording_generate(model, ids, **kw):
        calls.append(kw)
        return real(model, ids, **kw)

    monkeypatch.setattr(g, "generate", recording_generate)
    lines = iter(["to be", "to be"])

    def two_lines(prompt: str) -> str:
        line = next(lines, None)
        if line is None:
            raise EOFError
        return line

    chat(model=folder, max_new_tokens=2, top_k=3, seed=5, input_fn=two_lines, output_fn=lambda s: None)
    assert [c["top_k"] for c in calls] == [3, 3]
    assert calls[0]["generator"] is calls[1]["generator"] and calls[0]["seed"] is None
    with pytest.raises(ValueError, match="--max-new-tokens -1 must be >= 0"):
        chat(model=folder, max_new_tokens=-1, input_fn=two_lines)  # before loading or reading a line
    with pytest.raises(ValueError, match="--top-k -1 must be >= 0"):
        chat(model=folder, top_k=-1, input_fn=two_lines)


def test_a_tokenizer_without_pad_leaves_the_checkpoints_pad_id(folder, monkeypatch):
    """generate(pad_token_id=None) now means no pad id (as transformers); the command line passes the
    tokenizer's pad id only when it has one, so the checkpoint's stays the default."""
    import bamba.chat as gen
    from bamba.chat import generate_text
    from bamba.generation import _with_generation_config

    seen = []
    real = gen.generate.__wrapped__  # below the generation_config wrapper, which turns None into NOT_SET

    def recording(*args, **kwargs):
        seen.append(kwargs.get("pad_token_id", "left out"))
        return real(*args, **kwargs)

    lm, tok = gen.load_for_cli(folder, None, None, None)
    monkeypatch.setattr(type(tok), "pad_token_id", property(lambda self: None))
    monkeypatch.setattr(gen, "load_for_cli", lambda *a: (lm, tok))
    monkeypatch.setattr(gen, "generate", _with_generation_config(recording))
    generate_text("to be", model=folder, max_new_tokens=2, temperature=0)
    assert seen == ["left out"]


def test_chat_without_a_template_replies_after_a_leading_newline(folder, monkeypatch):
    """Without a chat template a reply ends at its first blank line. A reply that starts with a newline
    goes on (the stop string "\\n\\n" matched across the prompt's final newline there and ended the
    reply before it started)."""
    import bamba.chat as g
    from bamba.chat import chat

    real_load = g.load_for_cli
    tokens: list[int] = []  # the scripted replies, token by token
    seen: list[str] = []
    real = g.generate

    def recording_generate(model, ids, **kw):
        seen.append(kw["tokenizer"].decode(ids[0].tolist()))
        return real(model, ids, **kw)

    def load_scripted(*args):
        lm, tok = real_load(*args)
        tok.chat_template = None
        for piece in ("\n", "to be", "\n", "\n", "\n", "\n", "or", "\n", "\n"):
            tokens.extend(tok.encode(piece, add_special_tokens=False))
        calls = iter(range(10**6))

        def script(module, inputs, output):  # each forward picks the next scripted token
            logits = torch.full_like(output.logits, -1e4)
            logits[:, -1, tokens[min(next(calls), len(tokens) - 1)]] = 0.0
            output.logits = logits
            return output

        lm.register_forward_hook(script)
        return lm, tok

    monkeypatch.setattr(g, "load_for_cli", load_scripted)
    monkeypatch.setattr(g, "generate", recording_generate)
    lines = iter(["to be", "not"])
    out: list[str] = []

    def one_line(prompt: str) -> str:
        line = next(lines, None)
        if line is None:
            raise EOFError
        return line

    chat(model=folder, max_new_tokens=10, temperature=0, input_fn=one_line, output_fn=out.append)
    # each reply up to its first blank line after some text, then a newline; the last at EOF
    assert "".join(out) == "\nto be\n\n\n" + "\n\nor\n\n\n" + "\n"
    assert seen[1].endswith("to be\nto be\n\nnot\n")  # the transcript keeps the replies' text
