"""Crash safety under real `kill -9` (issue 21): a child process is killed while it saves a checkpoint,
trains, or trains a tokenizer, at random moments and at every file operation of a save; what it leaves
must load as the previous result or the new one (never a mix), and a resumed run must give the losses of
an uninterrupted one."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
from collections.abc import Callable

import pytest
import torch
from conftest import TINY

from bamba import BambaConfig, BambaForCausalLM, Tokenizer
from bamba.tokenizer import train_tokenizer_files
from bamba.train import train
from bamba.train_state import iter_log

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = {
    **TINY,
    "vocab_size": 320,
    "hidden_size": 64,
    "intermediate_size": 96,
    "max_position_embeddings": 512,
}
WORDS = "the cat sat on a mat dog ran far away and then slept under tree sun moon star big small".split()


def fork(work: Callable[[], None], kill_at_call: int | None = None, count_to: str | None = None) -> int:
    """Run `work` in a forked child (one thread); with `kill_at_call` k, the child SIGKILLs itself at
    its k-th os.replace / os.remove / os.rename (the moments a save publishes its files); with
    `count_to`, it writes how many such calls it made to that file."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        torch.set_num_threads(1)
        calls = [0]
        for name in ("replace", "remove", "rename"):
            real = getattr(os, name)

            def counted(*args, real=real, **kwargs):
                calls[0] += 1
                if calls[0] == kill_at_call:
                    os.kill(os.getpid(), signal.SIGKILL)
                return real(*args, **kwargs)

            setattr(os, name, counted)
        work()
        if count_to is not None:
            with open(count_to, "w") as f:
                f.write(str(calls[0]))
        code = 0
    finally:
        os._exit(code)


def wait(pid: int, kill_after: float | None = None) -> bool:
    """Wait for the child (SIGKILL it after `kill_after` seconds); True if it was killed."""
    if kill_after is not None:
        deadline = time.monotonic() + kill_after
        while time.monotonic() < deadline:
            if os.waitpid(pid, os.WNOHANG)[0]:
                return False
            time.sleep(0.005)
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    if os.WIFEXITED(status):
        assert os.WEXITSTATUS(status) == 0, "the child failed (not killed)"
        return False
    assert os.WTERMSIG(status) == signal.SIGKILL
    return True


# ----- save_pretrained ----------------------------------------------------------------------------------------
def _model(seed: int, **config) -> BambaForCausalLM:
    torch.manual_seed(seed)
    return BambaForCausalLM(BambaConfig(**CONFIG, **config)).eval()


SHARDS = dict(max_shard_size=120_000)
SAVES = {  # (the previous save, the new one): the new save's weights are others (another seed)
    "weights": ({}, {}),
    "shards": ({}, SHARDS),  # one file <-> shards + index
    "same-shards": (SHARDS, SHARDS),  # new shards over old ones of the same names
    "config": ({}, dict(dtype=torch.bfloat16)),  # config.json changes: dtype, and (below) rms_norm_eps
}


def _loaded(folder: str) -> tuple[dict[str, torch.Tensor], dict]:
    model = BambaForCausalLM.from_pretrained(folder)
    return model.state_dict(), model.config.to_dict()


def _outcome(folder: str, refs: dict[str, tuple[dict[str, torch.Tensor], dict]]) -> str:
    """Which save the folder loads as (weights and config): a name of `refs`, or "unfinished" (a clear
    error: no config.json)."""
    try:
        state, config = _loaded(folder)
    except FileNotFoundError as e:
        assert "missing config.json" in str(e), e
        return "unfinished"
    for name, (ref, ref_config) in refs.items():
        same = all(state[k].dtype == v.dtype and torch.equal(state[k], v) for k, v in ref.items())
        if same and config == ref_config:
            return name
    raise AssertionError(f"{folder} loads as neither save: a mix")


@pytest.mark.parametrize("change", list(SAVES))
def test_save_pretrained_killed_at_any_moment_loads_as_the_previous_or_the_new_save(tmp_path, change):
    old, new = _model(0), _model(1, **({"rms_norm_eps": 0.5} if change == "config" else {}))
    old_kwargs, kwargs = SAVES[change]
    refs = {}
    for name, model, kw in (("previous", old, old_kwargs), ("new", new, kwargs)):
        model.save_pretrained(tmp_path / name, **kw)
        refs[name] = _loaded(str(tmp_path / name))
    allowed = {"previous", "new"} | ({"unfinished"} if change == "config" else set())
    seen = []
    for k in range(1, 40):  # killed at each file operation of the save, in turn, until one completes
        folder = str(tmp_path / f"k{k}")
        shutil.copytree(tmp_path / "previous", folder)
        killed = wait(fork(lambda folder=folder: new.save_pretrained(folder, **kwargs), kill_at_call=k))
        seen.append(_outcome(folder, refs))
        assert seen[-1] in allowed, (k, seen)
        if not killed:
            break
    assert not killed and seen[-1] == "new" and "previous" in seen, seen

    rng = random.Random(change)
    folder = str(tmp_path / "random")
    shutil.copytree(tmp_path / "previous", folder)

    def save_forever() -> None:  # the new save and the previous one, alternately
        for i in range(10**9):
            (
                new.save_pretrained(folder, **kwargs)
                if i % 2 == 0
                else old.save_pretrained(folder, **old_kwargs)
            )

    outcomes = []
    for _ in range(5):
        assert wait(fork(save_forever), kill_after=rng.uniform(0.02, 0.4))
        outcomes.append(_outcome(folder, refs))  # (the killed save's staged files do not trip it)
        assert outcomes[-1] in allowed, outcomes
    old.save_pretrained(folder, **old_kwargs)
    assert _outcome(folder, refs) == "previous"
    assert not [f for f in os.listdir(folder) if f.startswith(".tmp-")]  # what the killed saves left: gone


# ----- training -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("crash-corpus")
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 60))) for _ in range(200)]
    (root / "data.txt").write_text("\n\n".join(docs))
    tok = str(root / "tok")
    wait(fork(lambda: train_tokenizer_files([str(root / "data.txt")], 300, tok)))
    return {"data": str(root / "data.txt"), "tokenizer": tok}


def _train(corpus: dict[str, str], out: str) -> None:
    train(
        out_dir=out,
        data=[corpus["data"]],
        tokenizer=corpus["tokenizer"],
        config=BambaConfig(**CONFIG),
        row_tokens=64,
        batch_rows=2,
        max_steps=6,
        lr=1e-2,
        warmup_steps=1,
        eval_every=0,
        save_every=2,
        progress=False,
    )


def _losses(out: str) -> list[float]:
    return [r["loss"] for r in iter_log(os.path.join(out, "log.jsonl")) if "loss" in r]


def _kill_twice(
    corpus: dict[str, str], out: str, how: str, rng: random.Random, window: float, calls: int
) -> int:
    """Run training into `out` twice, each killed (resumed the second time); how many runs were killed."""
    killed = 0
    for _ in range(2):
        if how == "time":  # at a random moment
            killed += wait(fork(lambda: _train(corpus, out)), kill_after=rng.uniform(0.1, window))
        else:  # at a random file operation of a checkpoint's save
            killed += wait(fork(lambda: _train(corpus, out), kill_at_call=rng.randint(1, calls // 2)))
    return killed


def test_training_killed_at_random_moments_resumes_with_the_losses_of_an_uninterrupted_run(corpus, tmp_path):
    full = str(tmp_path / "full")
    start = time.monotonic()
    wait(fork(lambda: _train(corpus, full), count_to=str(tmp_path / "calls")))
    duration = time.monotonic() - start
    calls = int((tmp_path / "calls").read_text())  # file operations of a whole run (its checkpoints)
    want = _losses(full)
    rng = random.Random(0)
    for trial, how in enumerate(["time", "call"]):
        out, window = str(tmp_path / f"killed-{trial}"), duration
        killed = _kill_twice(corpus, out, how, rng, window, calls)
        while not killed and window > 0.2:  # both runs ended before their kill: faster than the timed run
            shutil.rmtree(out)
            window /= 2
            killed = _kill_twice(corpus, out, how, rng, window, calls)
        assert killed
        wait(fork(lambda out=out: _train(corpus, out)))
        assert _losses(out) == want, trial  # bit-identical on CPU, as an uninterrupted run
        got = BambaForCausalLM.from_pretrained(os.path.join(out, "final")).state_dict()
        ref = BambaForCausalLM.from_pretrained(os.path.join(full, "final")).state_dict()
        assert all(torch.equal(got[k], v) for k, v in ref.items())


# ----- train-tokenizer -------------------------------------------------------------------------------------------
def _tokenizer_files(folder: str) -> str | None:
    """What the tokenizer folder loads as (its tokenizer.json and config), or None: no tokenizer.json."""
    try:
        tok = Tokenizer.from_pretrained(folder)
    except FileNotFoundError as e:
        assert "has no tokenizer.json" in str(e), e
        return None
    return json.dumps([tok.backend.to_str(), tok.config, tok.chat_template])


def test_train_tokenizer_killed_at_any_moment_leaves_the_previous_or_the_new_tokenizer(corpus, tmp_path):
    previous, new = str(tmp_path / "previous"), str(tmp_path / "new")
    shutil.copytree(corpus["tokenizer"], previous)  # 300 tokens; its config set otherwise than a new one's
    config = json.loads(open(os.path.join(previous, "tokenizer_config.json")).read())
    config.update(model_max_length=1000, chat_template="{{ messages[0]['content'] }}")
    with open(os.path.join(previous, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    wait(fork(lambda: train_tokenizer_files([corpus["data"]], 320, new)))
    refs = {_tokenizer_files(previous): "previous", _tokenizer_files(new): "new", None: "unfinished"}
    seen = []
    for k in range(1, 30):
        out = str(tmp_path / f"k{k}")
        shutil.copytree(previous, out)
        work = lambda out=out: train_tokenizer_files([corpus["data"]], 320, out)  # noqa: E731
        killed = wait(fork(work, kill_at_call=k))
        seen.append(refs[_tokenizer_files(out)])  # (a KeyError here: a mix of the two)
        if not killed:
            break
    assert not killed and seen[-1] == "new" and "previous" in seen, seen
    rng = random.Random(1)
    out = str(tmp_path / "random")
    shutil.copytree(previous, out)
    for _ in range(4):
        wait(
            fork(lambda: train_tokenizer_files([corpus["data"]], 320, out)), kill_after=rng.uniform(0.01, 0.3)
        )
        assert _tokenizer_files(out) in refs
