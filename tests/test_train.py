"""Tests for bamba.train and bamba.tokenizer_cli: learning, checkpoints, exact resume, atomic saves, DDP / FSDP2
equality with one process, gradient accumulation, and the messages for bad input. Tiny model, tiny data."""

from __future__ import annotations

import json
import math
import os
import random
import socket

import conftest
import pytest
import torch
import torch.multiprocessing as mp

import bamba
import bamba.data
import bamba.model
import bamba.train
import bamba.train_state
from bamba import BambaForCausalLM
from bamba.cli import main as cli_main
from bamba.config import BambaConfig
from bamba.data import flatten_rows, pack_examples, tokenize_documents
from bamba.files import save_folder_atomically
from bamba.train import lr_factor, train
from bamba.train_state import find_checkpoint, iter_log, read_trainer_state

TINY = {
    **conftest.TINY,
    "vocab_size": 320,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "max_position_embeddings": 512,
}
WORDS = "the cat sat on a mat dog ran far away and then slept under tree sun moon star big small".split()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, str]:
    """A text file of 200 documents of 1..60 words, and a 300-token BPE tokenizer trained on it (via the CLI)."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 60))) for _ in range(200)]
    data = root / "data.txt"
    data.write_text("\n\n".join(docs))
    tok = root / "tok"
    assert cli_main(["train-tokenizer", str(data), "--vocab-size", "300", "--out", str(tok)]) == 0
    return {"data": str(data), "tokenizer": str(tok), "root": str(root)}


def run(corpus: dict[str, str], out, **overrides):
    kwargs = dict(
        out_dir=str(out),
        data=[corpus["data"]],
        tokenizer=corpus["tokenizer"],
        config=BambaConfig(**TINY),
        row_tokens=64,
        max_steps=4,
        lr=1e-2,
        warmup_steps=1,
        eval_every=0,
        save_every=0,
        progress=False,
    )
    kwargs.update(overrides)
    return train(**kwargs)


def losses(out, key: str = "loss") -> list[float]:
    """The per-step `key` ("loss" or "grad_norm") of a run's log."""
    return [r[key] for r in iter_log(os.path.join(out, "log.jsonl")) if "loss" in r]


def weights(folder) -> dict[str, torch.Tensor]:
    return BambaForCausalLM.from_pretrained(str(folder)).state_dict()


def assert_same_weights(a, b, atol: float = 0.0) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=0.0 if atol == 0 else 1e-4, msg=k)


# ----- data and schedule helpers ---------------------------------------------------------------------------
def test_documents_get_bos_and_eos_and_long_ones_are_split(corpus):
    tok = bamba.train.load_tokenizer(corpus["tokenizer"])
    (doc,) = tokenize_documents(["the cat sat " * 40], tok)
    assert doc[0] == tok.bos_token_id == 1 and doc[-1] == tok.eos_token_id == 2
    assert len(doc) > 64
    rows = list(pack_examples([doc], 16))
    assert all(sum(map(len, r)) <= 16 for r in rows)
    assert [t for r in rows for ex in r for t in ex] == doc  # every token kept, in order
    batch = flatten_rows(rows[:2])
    assert batch["input_ids"].shape == (1, 32)
    # each piece is its own example: positions restart, the first token of each is not a target
    assert batch["position_ids"][0, 16].item() == 0 and batch["labels"][0, 16].item() == -100
    assert batch["seq_idx"][0].tolist() == [0] * 16 + [1] * 16


def test_stream_positions_cut_the_same_global_batch():
    def step_rows(step, batch_rows, world, grad_accum):
        return [
            list(bamba.train.stream_positions(step, m, r, batch_rows, world, grad_accum))
            for m in range(grad_accum)
            for r in range(world)
        ]

    assert step_rows(1, 2, 1, 1) == [[2, 3]]
    assert step_rows(1, 1, 2, 1) == [[2], [3]]  # rank 0, rank 1
    assert step_rows(1, 1, 1, 2) == [[2], [3]]  # micro 0, micro 1
    assert step_rows(2, 2, 2, 2) == [[16, 17], [18, 19], [20, 21], [22, 23]]


def test_lr_schedule_warmup_then_cosine_to_min():
    f = [lr_factor(s, warmup_steps=4, max_steps=20, min_lr_ratio=0.1) for s in range(20)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert f[4] == 1.0 and all(a >= b for a, b in zip(f[4:], f[5:]))
    assert f[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(15 / 16 * torch.pi)).item()))
    assert lr_factor(20, 4, 20, 0.1) == pytest.approx(0.1)


# ----- learning, checkpoint layout --------------------------------------------------------------------------
def test_training_reduces_loss_and_saves_loadable_checkpoints(corpus, tmp_path):
    metrics = run(corpus, tmp_path, max_steps=30, lr=3e-3, warmup_steps=3, eval_every=10, batch_rows=2)
    train_losses = losses(tmp_path)
    assert len(train_losses) == 30
    assert sum(train_losses[-5:]) / 5 < train_losses[0] - 1.0  # from ~ln(300) = 5.7 down
    evals = [r for r in iter_log(tmp_path / "log.jsonl") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [10, 20, 30]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert metrics["step"] == 30 and metrics["eval_loss"] == evals[-1]["eval_loss"]
    assert metrics["eval_ppl"] == pytest.approx(torch.exp(torch.tensor(metrics["eval_loss"])).item())

    for name in ("final", "checkpoint-last"):
        folder = tmp_path / name
        for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            assert (folder / f).is_file(), f"{name}/{f}"
    assert (tmp_path / "checkpoint-last" / "trainer_state.pt").is_file()
    assert json.loads((tmp_path / "checkpoint-last" / "trainer_state.json").read_text())["step"] == 30
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary folders left

    ours = BambaForCausalLM.from_pretrained(str(tmp_path / "final"))
    ids = torch.tensor([[1, 5, 9, 42, 7, 100, 3]])
    logits = ours(ids).logits
    transformers = pytest.importorskip("transformers")
    theirs = transformers.BambaForCausalLM.from_pretrained(str(tmp_path / "final")).eval()
    with torch.no_grad():
        torch.testing.assert_close(logits, theirs(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("z_loss", [0.0, 0.01])
def test_grad_accumulation_2x1_equals_1x2_rows(corpus, tmp_path, z_loss):
    """The same global batch cut two ways: the same loss, gradients and weights, z-loss included (the
    z-loss of each micro-batch used to be its own mean, so grad_accum 2 counted it twice)."""
    config = BambaConfig(**TINY, z_loss_coefficient=z_loss)
    run(corpus, tmp_path / "a", grad_accum=2, batch_rows=1, config=config)
    run(corpus, tmp_path / "b", grad_accum=1, batch_rows=2, config=config)
    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    if z_loss:  # logged: the objective and its z part, which is what it adds to the cross-entropy
        z = losses(tmp_path / "a", "z_loss")
        torch.testing.assert_close(z, losses(tmp_path / "b", "z_loss"), atol=1e-6, rtol=1e-5)
        assert all(0 < v < 1 for v in z)
    else:
        assert "z_loss" not in next(iter_log(tmp_path / "a" / "log.jsonl"))
    assert len(la) == 4 and la[0] > 4.0
    torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-5)
    # the gradient itself, not only the loss (Adam would hide a gradient off by a constant factor)
    torch.testing.assert_close(
        losses(tmp_path / "a", "grad_norm"), losses(tmp_path / "b", "grad_norm"), rtol=1e-5, atol=0
    )
    assert_same_weights(tmp_path / "a" / "final", tmp_path / "b" / "final", atol=1e-5)


def test_row_orders_of_nearby_seeds_are_unrelated_and_old_runs_resume_in_theirs(
    corpus, tmp_path, monkeypatch
):
    """Each epoch's order was seeded seed + epoch, so seed 1's first epoch was seed 0's second. Runs now
    record row_order 2 (seeded from both); a trainer_state without it resumes in the order it began with."""
    n = 50
    old0, old1 = bamba.train.RowOrder(n, 0, version=1), bamba.train.RowOrder(n, 1, version=1)
    assert [old1[i] for i in range(n)] == [old0[n + i] for i in range(n)]  # the overlap
    new0, new1 = bamba.train.RowOrder(n, 0), bamba.train.RowOrder(n, 1)
    assert [new1[i] for i in range(n)] != [new0[n + i] for i in range(n)]
    assert sorted(new1[i] for i in range(n)) == list(range(n))  # still a permutation per epoch
    run(corpus, tmp_path, max_steps=1)
    state_file = tmp_path / "checkpoint-last" / "trainer_state.pt"
    state = torch.load(state_file, weights_only=True)
    assert state["row_order"] == 2
    torch.save({k: v for k, v in state.items() if k != "row_order"}, state_file)  # as an older trainer wrote
    versions = []
    real = bamba.train.RowOrder

    class Recording(real):  # the order the resumed run reads
        def __init__(self, n_rows: int, seed: int, version: int = real.VERSION) -> None:
            versions.append(version)
            super().__init__(n_rows, seed, version)

    monkeypatch.setattr(bamba.train, "RowOrder", Recording)
    run(corpus, tmp_path, max_steps=2)
    assert versions == [1] and torch.load(state_file, weights_only=True)["row_order"] == 1
    with pytest.raises(ValueError, match=r"row_order=3: expected one of \(1, 2\)"):
        real(n, 0, version=3)


def test_max_examples_reads_no_further(corpus, tmp_path):
    """max_examples stops reading there (it read the whole corpus, then kept the first ones): a broken line
    after the first 12 documents is never reached."""
    data = tmp_path / "docs.jsonl"
    lines = [json.dumps({"text": " ".join(WORDS[i : i + 9])}) for i in range(12)]
    data.write_text("\n".join(lines) + "\nnot json\n")
    metrics = run(corpus, tmp_path / "o", data=[str(data)], max_examples=12, max_steps=1, eval_fraction=0)
    assert metrics["step"] == 1
    with pytest.raises(ValueError, match="docs.jsonl:13: invalid JSON"):
        run(corpus, tmp_path / "o2", data=[str(data)], max_examples=13, max_steps=1, eval_fraction=0)


def test_warmup_longer_than_the_epoch_is_refused(corpus, tmp_path):
    """With max_steps None (one epoch), warmup_steps beyond the epoch's steps never reached the peak lr."""
    with pytest.raises(ValueError, match=r"warmup_steps=500 exceeds the \d+ steps of one epoch"):
        run(corpus, tmp_path, max_steps=None, warmup_steps=500)


def test_gradient_checkpointing_and_no_clipping(corpus, tmp_path, monkeypatch):
    """gradient_checkpointing=True checkpoints every layer of every micro-batch, with the same losses,
    gradient norms and weights as without; clip=0 leaves the gradients whole (the same run as a clip
    never reached), where the default clip of 1 changes the run (its first gradient norm is 1.7)."""
    calls = []
    real = bamba.model.checkpoint
    monkeypatch.setattr(bamba.model, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    run(corpus, tmp_path / "plain", max_steps=2, clip=0)
    assert not calls
    run(corpus, tmp_path / "ckpt", max_steps=2, clip=0, gradient_checkpointing=True)
    assert len(calls) == 2 * 2  # 2 steps of one micro-batch, 2 layers each
    torch.testing.assert_close(losses(tmp_path / "ckpt"), losses(tmp_path / "plain"), atol=1e-6, rtol=0)
    norms = losses(tmp_path / "plain", "grad_norm")
    torch.testing.assert_close(losses(tmp_path / "ckpt", "grad_norm"), norms, atol=0, rtol=1e-5)
    assert_same_weights(tmp_path / "ckpt" / "final", tmp_path / "plain" / "final", atol=1e-6)
    run(corpus, tmp_path / "huge", max_steps=2, clip=1e9)
    assert_same_weights(tmp_path / "huge" / "final", tmp_path / "plain" / "final")
    run(corpus, tmp_path / "clipped", max_steps=2)  # clip=1
    assert norms[0] > 1.2 and losses(tmp_path / "clipped", "grad_norm")[0] == pytest.approx(norms[0])
    with pytest.raises(AssertionError):
        assert_same_weights(tmp_path / "clipped" / "final", tmp_path / "plain" / "final")


def test_bfloat16_autocast_trains_close_to_float32(corpus, tmp_path):
    run(corpus, tmp_path / "fp32", max_steps=2)
    run(corpus, tmp_path / "bf16", max_steps=2, dtype="bfloat16")
    fp32, bf16 = losses(tmp_path / "fp32"), losses(tmp_path / "bf16")
    assert fp32 != bf16  # autocast did something
    torch.testing.assert_close(bf16, fp32, atol=0.05, rtol=0.0)
    assert (
        weights(tmp_path / "bf16" / "final")["lm_head.weight"].dtype == torch.float32
    )  # fp32 master weights


def test_train_tokenizer_reads_jsonl_text_fields(tmp_path):
    records = [{"text": f"hello world number {i % 7}", "id": i} for i in range(50)]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    assert (
        cli_main(["train-tokenizer", str(path), "--vocab-size", "300", "--out", str(tmp_path / "tok")]) == 0
    )
    tok = bamba.train.load_tokenizer(str(tmp_path / "tok"))
    vocab = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())["model"]["vocab"]
    assert len(tok) <= 300 and {"hello", "Ġworld", "Ġnumber"} <= vocab.keys()
    assert not any(len(t) > 1 and ('"' in t or "text" in t) for t in vocab)  # learnt from the text, not JSON
    assert tok.decode(tok.encode("hello world", add_special_tokens=False)) == "hello world"
    assert cli_main(["train-tokenizer", str(tmp_path / "nope.txt"), "--vocab-size", "300", "--out", "x"]) == 2


# ----- resume, atomic checkpoints ---------------------------------------------------------------------------
class Crash(Exception):
    pass


def crash_at(step: int):
    def callback(record):
        if record["step"] == step:
            raise Crash(step)

    return callback


def test_resume_after_a_crash_gives_the_losses_of_an_uninterrupted_run(corpus, tmp_path):
    # grad_accum 2 and two epochs (rows are reshuffled each epoch) so the data position matters.
    opts = dict(max_steps=8, save_every=3, grad_accum=2, batch_rows=3, eval_every=4, row_tokens=256)
    run(corpus, tmp_path / "full", **opts)
    assert [r for r in iter_log(tmp_path / "full" / "log.jsonl") if "loss" in r][-1]["epoch"] > 1  # crossed
    with pytest.raises(Crash):
        run(
            corpus, tmp_path / "crashed", callback=crash_at(5), **opts
        )  # dies after step 5, last save: step 3
    assert json.loads((tmp_path / "crashed/checkpoint-last/trainer_state.json").read_text())["step"] == 3
    metrics = run(corpus, tmp_path / "crashed", **opts)
    assert metrics["step"] == 8
    full, resumed = losses(tmp_path / "full"), losses(tmp_path / "crashed")
    assert len(full) == len(resumed) == 8  # the log was trimmed to the checkpoint, then continued
    assert resumed == full  # bit-identical on CPU
    assert_same_weights(tmp_path / "full" / "final", tmp_path / "crashed" / "final")


def test_failure_while_saving_leaves_the_previous_checkpoint_intact(corpus, tmp_path, monkeypatch):
    calls = []
    original = bamba.train.write_trainer_state

    def failing(state, folder):
        calls.append(state["step"])
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        original(state, folder)

    monkeypatch.setattr(bamba.train, "write_trainer_state", failing)
    with pytest.raises(OSError, match="disk full"):
        run(corpus, tmp_path, max_steps=6, save_every=2)
    assert calls == [2, 4]
    assert find_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-last")
    state = json.loads((tmp_path / "checkpoint-last" / "trainer_state.json").read_text())
    assert state["step"] == 2
    BambaForCausalLM.from_pretrained(str(tmp_path / "checkpoint-last"))
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # the half-written folder is gone

    # A crash between "move the old one aside" and "move the new one in" leaves only `.checkpoint-last.old`:
    os.rename(tmp_path / "checkpoint-last", tmp_path / ".checkpoint-last.old")
    assert find_checkpoint(str(tmp_path)) == str(tmp_path / ".checkpoint-last.old")
    save_folder_atomically(
        str(tmp_path), "checkpoint-last", lambda d: open(os.path.join(d, "x"), "w").close()
    )
    assert (
        os.listdir(tmp_path / "checkpoint-last") == ["x"] and not (tmp_path / ".checkpoint-last.old").exists()
    )


# ----- bad input ---------------------------------------------------------------------------------------------
def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(corpus, tmp_path, monkeypatch):
    original = bamba.train.causal_lm_loss  # the trainer computes the step's loss from the logits
    calls = []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = original(*args, **kwargs)
        return loss * float("nan") if len(calls) == 3 else loss  # the 3rd training step

    monkeypatch.setattr(bamba.train, "causal_lm_loss", poisoned)
    with pytest.raises(
        RuntimeError, match=r"loss at step 3 is nan.*last good checkpoint is .*checkpoint-last"
    ):
        run(corpus, tmp_path, max_steps=6, save_every=2)
    assert json.loads((tmp_path / "checkpoint-last" / "trainer_state.json").read_text())["step"] == 2
    assert not (tmp_path / "final").exists()


@pytest.mark.parametrize("z_loss", [0.0, 0.01])
def test_micro_batches_with_nothing_to_predict_are_skipped(corpus, tmp_path, z_loss):
    # (Rows of 1 token, where nothing at all is predicted, are refused: see test_bad_inputs_have_clear_messages.)
    # With z-loss on, a micro-batch without targets still runs its forward (its positions' z-loss counts).
    # Documents "<bos> cat <eos>" in rows of 2 tokens alternate rows [<bos> cat] (1 target) and [<eos>] (none).
    words = tmp_path / "words.txt"
    words.write_text("\n\n".join(["cat"] * 40))
    tok = bamba.train.load_tokenizer(corpus["tokenizer"])
    assert tokenize_documents(["cat"], tok)[0] == [1, tok.encode("cat", add_special_tokens=False)[0], 2]
    run(
        corpus,
        tmp_path / "mixed",
        data=[str(words)],
        row_tokens=2,
        grad_accum=2,
        max_steps=20,  # a step reads 2 random rows: both without a target in 1 step of 4
        eval_fraction=0.0,
        config=BambaConfig(**TINY, z_loss_coefficient=z_loss),
    )
    mixed = list(iter_log(tmp_path / "mixed" / "log.jsonl"))
    assert len(mixed) == 20 and any("skipped" in r for r in mixed) and any("loss" in r for r in mixed)
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in mixed if "loss" in r)
    if z_loss:
        assert all(0 < r["z_loss"] < r["loss"] for r in mixed if "loss" in r)


def test_bad_inputs_have_clear_messages(corpus, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n")
    with pytest.raises(ValueError, match="hold no documents"):
        run(corpus, tmp_path / "o1", data=[str(empty)], eval_fraction=0.0)
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        run(corpus, tmp_path / "o2", tokenizer=str(tmp_path))
    with pytest.raises(ValueError, match="a tokenizer is required"):
        run(corpus, tmp_path / "o2", tokenizer=None)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        run(corpus, tmp_path / "o3", data=[str(tmp_path / "missing.txt")])
    with pytest.raises(ValueError, match="has 300 tokens but the config's vocab_size is 100"):
        run(corpus, tmp_path / "o4", config=BambaConfig(**{**TINY, "vocab_size": 100}))
    with pytest.raises(ValueError, match="unknown preset"):
        run(corpus, tmp_path / "o5", config="no-such-preset")
    with pytest.raises(ValueError, match="grad_accum=0 must be >= 1"):
        run(corpus, tmp_path / "o6", grad_accum=0)
    with pytest.raises(ValueError, match="max_examples=-1 must be >= 1"):
        run(corpus, tmp_path / "o6", max_examples=-1)
    with pytest.raises(ValueError, match="clip=-1.0 must be >= 0"):
        run(corpus, tmp_path / "o6", clip=-1.0)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ValueError, match="out_dir=.*a-file' exists and is not a folder"):  # errno 17 before
        run(corpus, tmp_path / "a-file")
    for kwargs, message in [
        (dict(row_tokens=1), "row_tokens=1 must be >= 2"),  # trained nothing and logged NaN
        (dict(clip=float("nan")), "clip=nan must be >= 0"),  # disabled clipping
        (dict(lr=-1.0), "lr=-1.0 must be a finite number > 0"),
        (dict(min_lr_ratio=-1.0), r"min_lr_ratio=-1.0 must be in \[0, 1\]"),  # the lr went negative
        (dict(weight_decay=-1.0), "weight_decay=-1.0 must be >= 0"),
        (dict(warmup_steps=-3), "warmup_steps=-3 must be >= 0"),
        (dict(eval_every=-1), "eval_every=-1 must be >= 0"),
        (dict(max_steps=4, warmup_steps=100), "warmup_steps=100 exceeds max_steps=4"),
        (dict(betas=(0.9, 2)), r"betas=\(0.9, 2\) must be two numbers in \[0, 1\)"),  # torch's text before
        (dict(log_file=str(tmp_path)), "log_file=.* exists and is not a file"),  # errno 21 before
    ]:
        with pytest.raises(ValueError, match=message):
            run(corpus, tmp_path / "o6", **kwargs)
    quantized = tmp_path / "q"
    bamba.quantize(BambaForCausalLM(BambaConfig(**TINY)), "int8").save_pretrained(quantized)
    with pytest.raises(ValueError, match="holds a quantized model .* cannot be trained"):
        run(corpus, tmp_path / "o6", config=None, init_from=str(quantized))
    # resuming with other batch settings would silently read other data: refused
    run(corpus, tmp_path / "o7", max_steps=2, save_every=1)
    with pytest.raises(ValueError, match="cannot resume.*rows_per_step: 1 -> 2"):
        run(corpus, tmp_path / "o7", max_steps=3, batch_rows=2)
    # the command line turns them into one line and exit status 2
    args = ["train", "--config", "demo", "--data", corpus["data"], "--tokenizer", str(tmp_path), "--out", "x"]
    assert cli_main(args) == 2


def test_cli_trains_and_continues(corpus, tmp_path, capsys, monkeypatch):
    base = [
        "train",
        "--data",
        corpus["data"],
        "--tokenizer",
        corpus["tokenizer"],
        "--out",
        str(tmp_path / "a"),
    ]
    config = tmp_path / "config.json"
    BambaConfig(**TINY).save_pretrained(tmp_path)
    first = [*base, "--config", str(config), "--max-steps", "2", "--row-tokens", "32", "--no-progress"]
    assert cli_main([*first, "--threads", "0"]) == 2 and "--threads 0 must be >= 1" in capsys.readouterr().err
    threads, real = [], torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: threads.append(n) or real(n))
    assert cli_main([*first, "--threads", "1"]) == 0  # (1: more threads stall on a busy machine)
    assert threads == [1]
    monkeypatch.undo()
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["step"] == 2
    # the same command again: nothing left to train, the final model is not rewritten, the JSON stays valid
    final = tmp_path / "a" / "final" / "model.safetensors"
    before = final.stat().st_mtime_ns
    assert cli_main([*base, "--config", str(config), "--max-steps", "2", "--row-tokens", "32"]) == 0
    out = capsys.readouterr().out
    assert "already at step 2 of max_steps=2: nothing to train" in out
    again = json.loads(out.strip().splitlines()[-1])  # NaN would not parse as JSON
    assert again["step"] == 2 and again["loss"] is None and final.stat().st_mtime_ns == before
    # --init-from: the weights (and config) of a checkpoint, a fresh optimizer, a new out dir
    cont = [*base[:-1], str(tmp_path / "b"), "--init-from", str(tmp_path / "a" / "final"), "--max-steps", "1"]
    assert cli_main([*cont, "--row-tokens", "32", "--no-progress", "--eval-data", corpus["data"]]) == 0
    (eval_record,) = [r for r in iter_log(tmp_path / "b" / "log.jsonl") if "eval_loss" in r]
    assert eval_record["eval_tokens"] > 5000  # the whole corpus, not a 5% slice of it
    assert BambaForCausalLM.from_pretrained(str(tmp_path / "b" / "final")).config.hidden_size == 32


# ----- distributed ------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, corpus: dict, out: str, fsdp: bool) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    run(corpus, out, batch_rows=1, grad_accum=2, fsdp=fsdp, save_every=2, eval_every=2)


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_two_processes_match_one_process_on_the_same_global_batch(corpus, tmp_path, fsdp):
    run(corpus, tmp_path / "single", batch_rows=2, grad_accum=2, save_every=2, eval_every=2)
    args = (2, _free_port(), corpus, str(tmp_path / "dist"), fsdp)
    mp.start_processes(_worker, args=args, nprocs=2, start_method="spawn")
    single, dist = losses(tmp_path / "single"), losses(tmp_path / "dist")
    assert len(dist) == 4
    torch.testing.assert_close(dist, single, atol=1e-5, rtol=1e-5)
    grad_norms = [losses(tmp_path / d, "grad_norm") for d in ("single", "dist")]
    torch.testing.assert_close(grad_norms[1], grad_norms[0], rtol=1e-5, atol=0)
    evals = [
        [r["eval_loss"] for r in iter_log(tmp_path / d / "log.jsonl") if "eval_loss" in r]
        for d in ("single", "dist")
    ]
    torch.testing.assert_close(evals[1], evals[0], atol=1e-5, rtol=1e-5)
    assert_same_weights(tmp_path / "single" / "final", tmp_path / "dist" / "final", atol=1e-5)


def test_resume_survives_a_torn_log_and_applies_new_optimizer_settings(corpus, tmp_path, monkeypatch, capsys):
    """A kill can cut the log's last record short and leave a half-written checkpoint folder; the next run
    drops both. Settings given anew on resume (betas, weight decay, the schedule) take effect, and are named."""
    out = tmp_path / "run"
    run(corpus, out, max_steps=2, save_every=1)
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # killed mid-write
    stale = out / ".checkpoint-last.tmp-killed"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    seen = []
    original = bamba.train_state.load_optimizer_state

    def spy(model, optimizer, state, fsdp):
        original(model, optimizer, state, fsdp)
        seen.append(optimizer)

    monkeypatch.setattr(bamba.train_state, "load_optimizer_state", spy)
    capsys.readouterr()
    run(corpus, out, max_steps=3, save_every=1, betas=(0.5, 0.6), weight_decay=0.0)
    err = capsys.readouterr().err
    assert "resuming with other settings" in err and "betas (0.9, 0.95) -> (0.5, 0.6)" in err
    assert "max_steps 2 -> 3" in err and "weight_decay 0.1 -> 0.0" in err
    assert all(g["betas"] == (0.5, 0.6) and g["weight_decay"] == 0.0 for g in seen[0].param_groups)
    assert [r["step"] for r in iter_log(out / "log.jsonl") if "loss" in r] == [1, 2, 3]
    assert not stale.exists()
    umask = os.umask(0)
    os.umask(umask)
    for name in ("checkpoint-last", "final"):
        assert (out / name).stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700


def test_a_corrupt_trainer_state_names_the_file(corpus, tmp_path):
    run(corpus, tmp_path, max_steps=1, save_every=1)
    state = tmp_path / "checkpoint-last" / "trainer_state.pt"
    good = torch.load(state, weights_only=True)
    torch.save({**good, "step": "1", "rng": {"torch": good["rng"]["torch"]}}, state)  # (raw errors before)
    with pytest.raises(
        ValueError,
        match=r"trainer_state.pt is malformed \(step should be an int >= 0, found str '1'; rng should be a "
        r"dict of the torch \(uint8 tensor\) and python \(tuple\) random states, found dict\).*--no-resume",
    ):
        run(corpus, tmp_path, max_steps=2)
    for bad in (3, True):  # (RowOrder's own error did not name the file; True resumed as order 1)
        torch.save({**good, "row_order": bad}, state)
        with pytest.raises(
            ValueError, match=rf"malformed \(row_order should be one of \(1, 2\), found .*{bad}\)"
        ):
            run(corpus, tmp_path, max_steps=2)
    state.write_bytes(b"not a checkpoint")
    with pytest.raises(
        ValueError, match="cannot resume: .*trainer_state.pt is unreadable or corrupt.*--no-resume"
    ):
        run(corpus, tmp_path, max_steps=2)
    torch.save({"step": 1}, state)
    with pytest.raises(
        ValueError, match="trainer_state.pt lacks tokens_seen, max_steps, schedule, optimizer, rng"
    ):
        run(corpus, tmp_path, max_steps=2)
    state.unlink()  # a checkpoint-last without its state: refused, not silently trained over from step 0
    with pytest.raises(ValueError, match="checkpoint-last has no trainer_state.pt .*resume=False"):
        run(corpus, tmp_path, max_steps=2)


def test_starting_over_sets_the_earlier_checkpoint_aside(corpus, tmp_path, capsys):
    """resume=False used to leave the earlier run's checkpoint-last in place: if the new run died before its
    first save, the next resume silently continued the earlier run."""
    run(corpus, tmp_path, max_steps=2, save_every=1)
    capsys.readouterr()
    for _ in range(2):  # killed before its first save, twice
        with pytest.raises(Crash):
            run(corpus, tmp_path, max_steps=3, resume=False, save_every=0, callback=crash_at(1))
    assert "the earlier run's checkpoints are now checkpoint-last.replaced-" in capsys.readouterr().err
    aside = sorted(p.name for p in tmp_path.glob("checkpoint-last.replaced-*"))
    assert len(aside) == 1 and not (tmp_path / "checkpoint-last").exists()  # (the second had none to move)
    assert read_trainer_state(str(tmp_path / aside[0]))["step"] == 2  # kept
    metrics = run(corpus, tmp_path, max_steps=2)  # nothing to resume: a fresh start, not the earlier run
    logged = [r["step"] for r in iter_log(tmp_path / "log.jsonl") if "loss" in r]
    assert metrics["step"] == 2 and logged == [1, 2]
    # starting over from the last checkpoint's weights: read before it is set aside
    run(corpus, tmp_path, max_steps=1, resume=False, config=None, init_from=str(tmp_path / "checkpoint-last"))
    assert len(list(tmp_path.glob("checkpoint-last.replaced-*"))) == 2
    # a start over that is refused (here: FSDP without a distributed launch) moves nothing
    with pytest.raises(ValueError, match="fsdp"):
        run(corpus, tmp_path, max_steps=1, resume=False, fsdp=True)
    assert len(list(tmp_path.glob("checkpoint-last.replaced-*"))) == 2
    assert (tmp_path / "checkpoint-last").is_dir()


def test_a_file_in_the_way_of_checkpoints_is_named_before_training(corpus, tmp_path):
    (tmp_path / "checkpoint-last").write_text("")  # (NotADirectoryError at the first save, after training)
    for resume in (True, False):
        with pytest.raises(ValueError, match="checkpoint-last is a file, where checkpoints go"):
            run(corpus, tmp_path, max_steps=1, resume=resume)


def test_resuming_with_another_model_shape_names_the_config_fields(corpus, tmp_path):
    """It raised PyTorch's size-mismatch error listing tensors."""
    run(corpus, tmp_path, max_steps=1)
    wider = BambaConfig(**{**TINY, "intermediate_size": 96})
    with pytest.raises(ValueError, match=r"does not fit this run's config \(intermediate_size: 64 -> 96\)"):
        run(corpus, tmp_path, max_steps=2, config=wider)


def test_resuming_with_another_model_config_of_the_same_shapes_names_the_fields(corpus, tmp_path, capsys):
    """It resumed silently with the new config."""
    run(corpus, tmp_path, max_steps=1)
    capsys.readouterr()
    run(corpus, tmp_path, max_steps=2, config=BambaConfig(**{**TINY, "rms_norm_eps": 1e-3}))
    err = capsys.readouterr().err
    assert "train: resuming with another model config: rms_norm_eps: 1e-05 -> 0.001" in err
    run(corpus, tmp_path, max_steps=3, config=BambaConfig(**{**TINY, "rms_norm_eps": 1e-3}))
    assert "another model config" not in capsys.readouterr().err
    # config.json's storage dtype is not a change: the trainer saves fp32 whatever it says
    bf16 = tmp_path / "bf16-config.json"
    bf16.write_text(json.dumps({**TINY, "rms_norm_eps": 1e-3, "dtype": "bfloat16"}))
    run(corpus, tmp_path, max_steps=4, config=str(bf16))
    assert "another model config" not in capsys.readouterr().err


def test_final_is_never_older_than_checkpoint_last(corpus, tmp_path, monkeypatch):
    """A run killed between writing final and checkpoint-last at its end, then run again, ends with a final
    holding the same weights as checkpoint-last (before, the re-run could keep an earlier run's final)."""
    out = tmp_path / "run"
    run(corpus, out, max_steps=2)
    real = bamba.train.save_folder_atomically
    names = []

    def killed_after_final(out_dir, name, write):
        names.append(name)
        if names[-2:] == ["final", "checkpoint-last"]:
            raise Crash(name)
        return real(out_dir, name, write)

    monkeypatch.setattr(bamba.train, "save_folder_atomically", killed_after_final)
    with pytest.raises(Crash):
        run(corpus, out, max_steps=4)
    monkeypatch.undo()
    assert run(corpus, out, max_steps=4)["step"] == 4
    assert_same_weights(out / "final", out / "checkpoint-last")
    assert json.loads((out / "checkpoint-last" / "trainer_state.json").read_text())["step"] == 4


def test_split_eval_holds_out_the_stated_fraction():
    """ceil(0.07 * 100) was 8: the float product is 7.000000000000001."""
    docs = [[i] for i in range(100)]
    for fraction, n in ((0.07, 7), (0.14, 14), (0.05, 5), (0.001, 1), (1e-12, 1)):
        assert len(bamba.data.split_eval(docs, fraction, seed=0)[1]) == n


def test_the_log_is_strict_json_when_a_value_is_not_finite(corpus, tmp_path, monkeypatch):
    """An eval with no predicted tokens gives nan: the log writes null (strict parsers refuse NaN)."""
    monkeypatch.setattr(bamba.train, "evaluate", lambda *a: (float("nan"), 0))
    run(corpus, tmp_path, max_steps=2, eval_every=1)
    lines = (tmp_path / "log.jsonl").read_text().splitlines()

    def refuse(name: str) -> None:
        raise ValueError(f"not strict JSON: {name}")

    records = [json.loads(line, parse_constant=refuse) for line in lines]
    assert any("eval_loss" in r and r["eval_loss"] is None for r in records)
