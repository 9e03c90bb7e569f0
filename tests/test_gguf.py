"""export-gguf: llama.cpp (through llama-cpp-python) runs the exported file with our logits.

The checks that need llama.cpp skip when llama_cpp is not installed (the test extra installs it); the rope
layout, the round trip through gguf's reader and the refusals run without it.
"""

from __future__ import annotations

import json
import os
import shutil

import gguf
import numpy as np
import pytest
import torch
from conftest import hf_model

from bamba import BambaForCausalLM, Tokenizer
from bamba import gguf_export as ge
from bamba.config import BambaConfig
from bamba.demo import demo_path
from bamba.masks import rotary_cos_sin
from bamba.model import apply_rotary

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
TEXT = (
    "ROMEO:\nBut, soft! what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n"
    "Arise, fair sun, and kill the envious moon,\nWho is already sick and pale with grief,\n"
    "That thou her maid art far more fair than she:\nBe not her maid, since she is envious;\n"
)
# max |diff| of llama.cpp's logits from ours, as a fraction of the logit scale (the largest |logit| of ours
# over the prompt). f32: the bound; measured 1e-6 on both checkpoints. The other types: about 3x the
# larger error measured on the two (benchmarks/gguf_accuracy.py; the demo model's / the tiny one's): f16
# 1.8e-4 / 4.7e-4, bf16 1.9e-3 / 4.0e-3, q8_0 9.0e-3 / 1.1e-2, q4_0 0.12 / 0.10. (llama.cpp also rounds
# the activations of f16, bf16 and q8_0 products to the weights' type.)
F32_BOUND = 1e-3
QUANT_BOUNDS = {"f16": 1.5e-3, "bf16": 0.012, "q8_0": 0.035, "q4_0": 0.35}


def prompt_ids(n: int = 64) -> list[int]:
    ids = Tokenizer.from_pretrained(demo_path()).encode(TEXT)
    assert len(ids) >= n
    return ids[:n]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> str:
    """A random tiny Bamba (transformers-made) with the demo's tokenizer, two SSM groups, biases on the
    attention and MLP projections (random, not zero) and none on the conv. Its q/k weights are scaled up so
    that attention, and so the rope, matters to the logits (at init scale it is near uniform)."""
    model = hf_model(
        seed=3,
        vocab_size=2048,
        attn_layer_indices=[1, 2],
        num_attention_heads=2,  # head_dim 16, 8 of them rotated
        mamba_n_groups=2,
        attention_bias=True,
        mlp_bias=True,
        mamba_conv_bias=False,
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(25.0)
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(os.path.join(demo_path(), name), folder)
    return str(folder)


def our_logits(folder: str, ids: list[int]) -> np.ndarray:
    model = BambaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()  # (L, V)


# ----- llama.cpp ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_cpp():
    llama_cpp = pytest.importorskip("llama_cpp")
    with pytest.MonkeyPatch.context() as mp:
        if b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info():
            # llama.cpp's AMX kernels (built in where the CPU has them) crash (SIGSEGV) in the prefill of any
            # q8_0 / q4_0 file, llama.cpp's converter's too: load weights without the extra buffer types that
            # repack them for AMX, into llama.cpp's plain CPU kernels
            default = llama_cpp.llama_cpp.llama_model_default_params

            def params():
                p = default()
                p.use_extra_bufts = False
                return p

            mp.setattr(llama_cpp.llama_cpp, "llama_model_default_params", params)
        yield llama_cpp


def load_llama(llama_cpp, path: str):
    # f32 keys and values (llama.cpp's default cache is f16), one thread (a shared 2-core machine)
    return llama_cpp.Llama(
        model_path=path,
        n_ctx=128,
        n_batch=128,
        n_ubatch=128,
        logits_all=True,
        n_threads=1,
        n_threads_batch=1,
        type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32,
        verbose=False,
    )


def llama_logits(llama_cpp, path: str, ids: list[int]) -> np.ndarray:
    llm = load_llama(llama_cpp, path)
    llm.eval(ids)
    logits = np.array(llm.scores[: len(ids)], dtype=np.float64)  # (L, V)
    llm.close()
    return logits


def llama_greedy(llama_cpp, path: str, ids: list[int], n: int) -> list[int]:
    """n greedy tokens, one llama.cpp decode step each (its recurrent state and KV cache carry on)."""
    llm = load_llama(llama_cpp, path)
    llm.eval(ids)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(out[-1:])
    llm.close()
    return out


def relative_error(ours: np.ndarray, theirs: np.ndarray) -> float:
    """max |diff| as a fraction of the logit scale (the largest |logit| of ours)."""
    return float(np.abs(ours - theirs).max() / np.abs(ours).max())


@pytest.fixture(scope="module", params=["tiny", "demo"])
def checkpoint(request, tiny_folder):
    """(name, folder, a 64-token prompt, our fp32 logits over it)."""
    folder = tiny_folder if request.param == "tiny" else demo_path()
    ids = prompt_ids()
    return request.param, folder, ids, our_logits(folder, ids)


def test_f32_logits_and_argmax_match(llama_cpp, checkpoint, tmp_path):
    _, folder, ids, ours = checkpoint
    path = ge.export_gguf(folder, tmp_path / "m.gguf", type="f32")
    theirs = llama_logits(llama_cpp, path, ids)
    assert theirs.shape == ours.shape
    assert relative_error(ours, theirs) <= F32_BOUND
    np.testing.assert_array_equal(theirs.argmax(-1), ours.argmax(-1))


@pytest.mark.parametrize("type", QUANT_BOUNDS)
def test_quantized_logits_within_bound(llama_cpp, checkpoint, tmp_path, type):
    _, folder, ids, ours = checkpoint
    path = ge.export_gguf(folder, tmp_path / "m.gguf", type=type)
    theirs = llama_logits(llama_cpp, path, ids)
    assert relative_error(ours, theirs) <= QUANT_BOUNDS[type]


def test_f32_greedy_generation_matches(llama_cpp, checkpoint, tmp_path):
    _, folder, ids, _ = checkpoint
    path = ge.export_gguf(folder, tmp_path / "m.gguf", type="f32")
    model = BambaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ours = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=None)
    assert llama_greedy(llama_cpp, path, ids, 32) == ours[0, len(ids) :].tolist()


def test_whole_head_permutation_fails_the_check(llama_cpp, checkpoint, tmp_path, monkeypatch):
    """llama.cpp's converter's layout (the whole head permuted, n_rot = head_dim) is caught by the check."""
    _, folder, ids, ours = checkpoint
    monkeypatch.setattr(ge, "rope_dims", lambda config: config.attention_head_dim)
    path = ge.export_gguf(folder, tmp_path / "naive.gguf", type="f32")
    theirs = llama_logits(llama_cpp, path, ids)
    assert relative_error(ours, theirs) > 10 * F32_BOUND


def test_tokenizer_and_chat_template_travel_in_the_file(llama_cpp, tmp_path):
    path = ge.export_gguf(demo_path(), tmp_path / "demo.gguf", type="q8_0")
    tok = Tokenizer.from_pretrained(demo_path())
    llm = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
    for text in [TEXT, "  spaces,\ttabs\n\nand 1234 digits; ünïcödé and emoji 🚀 '’s 'S"]:
        assert llm.tokenize(text.encode(), add_bos=True) == tok.encode(text)
        assert llm.detokenize(tok.encode(text, add_special_tokens=False)).decode() == text
    assert llm.token_bos() == tok.bos_token_id and llm.token_eos() == tok.eos_token_id
    assert llm.metadata["tokenizer.chat_template"] == tok.chat_template
    llm.close()


# ----- the rope layout, without llama.cpp ---------------------------------------------------------------
def llama_norm_rope(x: torch.Tensor, pos: torch.Tensor, n_rot: int, theta: float) -> torch.Tensor:
    """llama.cpp's LLAMA_ROPE_TYPE_NORM (ggml_rope_ext, no scaling) written out: dims (2i, 2i+1), i <
    n_rot/2, turn by pos * theta^(-2i/n_rot); dims n_rot.. pass through. x: (b, heads, l, hd)."""
    i = torch.arange(n_rot // 2, dtype=torch.float64)
    angle = pos[:, None].double() * theta ** (-2 * i / n_rot)  # (l, n_rot/2)
    cos, sin = angle.cos(), angle.sin()
    x0, x1 = x[..., 0:n_rot:2].double(), x[..., 1:n_rot:2].double()  # (b, heads, l, n_rot/2)
    rot = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)  # (b, heads, l, n_rot)
    return torch.cat([rot, x[..., n_rot:].double()], dim=-1)


@pytest.mark.parametrize("head_dim,factor", [(8, 0.5), (64, 0.5), (16, 1.0), (32, 0.25)])
def test_permuted_rows_make_llama_rope_equal_ours(head_dim, factor):
    config = BambaConfig(
        hidden_size=64,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=head_dim,
        partial_rotary_factor=factor,
        attn_layer_indices=[0],
    )
    rows = ge.rope_rows(head_dim, ge.rope_dims(config))
    assert sorted(rows.tolist()) == list(range(head_dim))
    x = torch.randn(1, 2, 7, head_dim, dtype=torch.float64)  # (b, heads, l, hd)
    pos = torch.arange(7)
    cos, sin = rotary_cos_sin(pos[None], config, torch.float64)
    ours = apply_rotary(x, cos, sin)
    theirs = llama_norm_rope(x[..., rows], pos, ge.rope_dims(config), config.rope_theta)
    torch.testing.assert_close(theirs, ours[..., rows], rtol=1e-6, atol=1e-6)  # our angles are fp32
    # the converter's layout: the whole head permuted and turned
    naive = ge.rope_rows(head_dim, head_dim)
    if factor < 1:
        assert not torch.allclose(
            llama_norm_rope(x[..., naive], pos, head_dim, config.rope_theta), ours[..., naive]
        )


# ----- reading back -------------------------------------------------------------------------------------
def test_round_trip_through_ggufs_reader(tmp_path):
    folder = demo_path()
    model = BambaForCausalLM.from_pretrained(folder)
    path = ge.export_gguf(folder, tmp_path / "demo.gguf", type="f32")
    back = ge.gguf_state_dict(path, model.config)
    state = model.state_dict()
    assert set(back) == set(state) - {"lm_head.weight"}  # tied: llama.cpp reads token_embd for the head
    for name, t in back.items():
        want = state[name].float()
        if name.endswith("A_log"):  # stored as A = -exp(A_log): log(-A) is exact to a rounding
            torch.testing.assert_close(t, want, rtol=1e-6, atol=1e-7)
        else:
            assert t.shape == want.shape and torch.equal(t, want), name
    reader = gguf.GGUFReader(path)
    field = reader.fields["general.architecture"]
    assert bytes(field.parts[field.data[0]]).decode() == "granitehybrid"


def test_q8_0_round_trip_within_its_step(tmp_path):
    model = BambaForCausalLM.from_pretrained(demo_path())
    path = ge.export_gguf(demo_path(), tmp_path / "demo.gguf", type="q8_0")
    back = ge.gguf_state_dict(path, model.config)
    w = model.state_dict()["model.layers.3.self_attn.q_proj.weight"].float()
    got = back["model.layers.3.self_attn.q_proj.weight"]
    # q8_0: blocks of 32 along a row, int8 steps of d = max|w| / 127 with d stored in f16 (so <= 127 steps of
    # its rounding, 2^-11, on top of half a step)
    step = w.abs().reshape(w.shape[0], -1, 32).amax(-1, keepdim=True) / 127  # (rows, blocks, 1)
    assert ((got - w).reshape(step.shape[0], -1, 32).abs() <= step * (0.5 + 127 * 2**-11)).all()


# ----- refusals and atomic writes -----------------------------------------------------------------------
def test_refuses_unsupported_type(tmp_path):
    with pytest.raises(ValueError, match="unsupported type 'q5_k'"):
        ge.export_gguf(demo_path(), tmp_path / "m.gguf", type="q5_k")


def test_refuses_folder_without_tokenizer(hf_folder, tmp_path):
    _, folder = hf_folder()
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        ge.export_gguf(folder, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_refuses_existing_output_unless_forced(tmp_path):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="already exists"):
        ge.export_gguf(demo_path(), out, type="q4_0")
    assert out.read_bytes() == b"keep me"
    ge.export_gguf(demo_path(), out, type="q4_0", force=True)
    assert out.read_bytes()[:4] == b"GGUF"


def test_refuses_quantized_folder(tmp_path):
    model = BambaForCausalLM.from_pretrained(
        demo_path(), dtype=torch.float32, quantization="int8_weight_only"
    )
    model.save_pretrained(tmp_path / "q")
    Tokenizer.from_pretrained(demo_path()).save_pretrained(tmp_path / "q")
    with pytest.raises(ValueError, match="quantized checkpoint"):
        ge.export_gguf(tmp_path / "q", tmp_path / "m.gguf")


def test_refuses_what_llama_cpp_cannot_run(tiny_folder, tmp_path):
    folder = tmp_path / "f"
    shutil.copytree(tiny_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "time_step_limit": [0.0, 0.5]}))
    with pytest.raises(ValueError, match="time_step_limit.*does not clamp"):
        ge.export_gguf(folder, tmp_path / "m.gguf")


def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"old")

    def broken(plan, state, config):
        yield np.zeros(plan[0].shape, np.float32)
        raise RuntimeError("disk full")

    monkeypatch.setattr(ge, "_arrays", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        ge.export_gguf(demo_path(), out, force=True)
    assert out.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["m.gguf"]


def test_llama3_split_tokenizer_travels_too(llama_cpp, hf_folder, tmp_path):
    """A byte-level BPE with Llama 3's split (Bamba-9B's kind) goes in as llama.cpp's llama-bpe."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as Backend

    backend = Backend(models.BPE(ignore_merges=True))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(ge._LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|pad|>", "<|bos|>", "<|eos|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator([TEXT] * 4, trainer)
    tok = Tokenizer(backend, {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>"})
    _, folder = hf_folder(vocab_size=448)  # more rows than tokens: the rest are padding in the file
    tok.save_pretrained(folder)
    path = ge.export_gguf(folder, tmp_path / "m.gguf", type="f16")
    llm = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
    assert llm.metadata["tokenizer.ggml.pre"] == "llama-bpe"
    for text in [TEXT, "  spaces,\ttabs\n\n\nand 1234567 digits; ünïcödé 🚀 I'VE 'd"]:
        ids = tok.encode(text, add_special_tokens=False)
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids
        assert llm.detokenize(ids).decode() == text
    llm.close()
