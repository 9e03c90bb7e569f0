"""What a training run keeps in out_dir to resume from: the checkpoint-last and final folders,
trainer_state.pt (optimizer, step, RNG states, data layout), and the log trimmed back to the checkpoint."""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from .config import BambaConfig
from .data import RowOrder
from .distributed import load_optimizer_state
from .files import atomic_write, strict_json
from .model import BambaForCausalLM

CHECKPOINT_NAME = "checkpoint-last"
FINAL_NAME = "final"
STATE_FILE = "trainer_state.pt"
STATE_KEYS = ("step", "tokens_seen", "max_steps", "schedule", "optimizer", "rng")


# ----- checkpoint folders -----------------------------------------------------------------------------------
def write_trainer_state(state: dict[str, Any], folder: str) -> None:
    """trainer_state.pt, and trainer_state.json: its plain values, for people and scripts to read."""
    torch.save(state, os.path.join(folder, STATE_FILE))
    summary = {k: v for k, v in state.items() if isinstance(v, (int, float, str, bool))}
    with open(os.path.join(folder, "trainer_state.json"), "w") as f:
        json.dump(summary, f, indent=2)


def read_trainer_state(ckpt: str) -> dict[str, Any]:
    """The trainer state saved in checkpoint folder `ckpt`, read without running pickled code."""
    path = os.path.join(ckpt, STATE_FILE)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(
            f"train: cannot resume: {path} is unreadable or corrupt ({type(e).__name__}: {first}); "
            "use another out_dir, or resume=False (--no-resume) to start over"
        ) from e
    missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(
            f"train: cannot resume: {path} lacks {', '.join(missing)}; "
            "use another out_dir, or resume=False (--no-resume) to start over"
        )
    rng = state["rng"]
    expected = {  # field: (is it well formed, what it should be)
        "step": (_is_count(state["step"]), "an int >= 0"),
        "tokens_seen": (_is_count(state["tokens_seen"]), "an int >= 0"),
        "max_steps": (_is_count(state["max_steps"]), "an int >= 0"),
        "schedule": (isinstance(state["schedule"], dict), "a dict"),
        "optimizer": (
            isinstance(state["optimizer"], dict) and {"state", "param_groups"} <= state["optimizer"].keys(),
            "an optimizer state dict (with state and param_groups)",
        ),
        "rng": (
            _is_rng_state(rng),
            "a dict of the torch (uint8 tensor) and python (tuple) random states",
        ),
    }
    if "row_order" in state:  # (absent: a run begun before there were several orders, which used the first)
        expected["row_order"] = (
            _is_count(state["row_order"]) and state["row_order"] in RowOrder.VERSIONS,
            f"one of {RowOrder.VERSIONS}",
        )
    bad = [f"{k} should be {what}, found {_short(state[k])}" for k, (ok, what) in expected.items() if not ok]
    if bad:
        raise ValueError(
            f"train: cannot resume: {path} is malformed ({'; '.join(bad)}); "
            "use another out_dir, or resume=False (--no-resume) to start over"
        )
    return state


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_rng_state(rng: Any) -> bool:
    """Is `rng` what `rng_states` saves: states that torch and random take back?"""
    if not (isinstance(rng, dict) and isinstance(rng.get("torch"), Tensor)):
        return False
    cpu = torch.get_rng_state()
    if rng["torch"].dtype != cpu.dtype or rng["torch"].shape != cpu.shape:
        return False
    try:
        torch.Generator().set_state(rng["torch"])  # (a throwaway generator: it checks the state)
    except RuntimeError:
        return False
    cuda = rng.get("cuda")
    if cuda is not None and not (isinstance(cuda, Tensor) and cuda.dtype == torch.uint8 and cuda.dim() == 1):
        return False
    try:
        random.Random().setstate(rng.get("python"))  # (a throwaway generator: it checks the state)
    except (TypeError, ValueError, OverflowError):
        return False
    return True


def _short(value: Any) -> str:
    """A value named in an error: its type, and its repr when short."""
    text = repr(value)
    return f"{type(value).__name__} {text}" if len(text) <= 40 else type(value).__name__


def check_checkpoint_place(out_dir: str, resume: bool) -> None:
    """Refuse, before any work, a checkpoint-last that the first save (a file there) or a fresh start (a
    folder the run cannot resume from, which it would overwrite) would fail on or destroy."""
    last = os.path.join(out_dir, CHECKPOINT_NAME)
    if os.path.exists(last) and not os.path.isdir(last):  # (the first save would fail, after training)
        raise ValueError(f"train: {last} is a file, where checkpoints go; move it away")
    if resume and os.path.isdir(last) and find_checkpoint(out_dir) is None:
        raise ValueError(
            f"train: {last} has no {STATE_FILE} (damaged, or not written by the trainer), so the run "
            "cannot resume from it; restore it, use another out_dir, or resume=False (--no-resume) to "
            "start over"
        )


def find_checkpoint(out_dir: str) -> str | None:
    """out_dir/checkpoint-last, or the previous one if a save died between its two renames."""
    for name in (CHECKPOINT_NAME, f".{CHECKPOINT_NAME}.old"):
        path = os.path.join(out_dir, name)
        if os.path.isfile(os.path.join(path, STATE_FILE)):
            return path
    return None


def save_model(folder: str, config: BambaConfig, model_state: dict[str, Tensor]) -> None:
    """save_pretrained of a CPU model holding `model_state` (works for plain, DDP and gathered FSDP weights)."""
    with torch.device("meta"):
        shell = BambaForCausalLM(config, init=False)
    shell.load_state_dict({k: v.detach().cpu() for k, v in model_state.items()}, assign=True)
    shell.tie_weights()
    shell.save_pretrained(folder)


def set_aside_checkpoints(out_dir: str) -> list[str]:
    """Rename an earlier run's checkpoint-last (and .checkpoint-last.old) to checkpoint-last.replaced-<time>:
    kept, but out of the way of a later resume, which would otherwise continue the earlier run. Returns
    the new names."""
    names = []
    for name in (CHECKPOINT_NAME, f".{CHECKPOINT_NAME}.old"):
        if os.path.isdir(os.path.join(out_dir, name)):
            stem = new = f"{name.lstrip('.')}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
            n = 1
            while os.path.exists(os.path.join(out_dir, new)):  # (twice in one second)
                n += 1
                new = f"{stem}-{n}"
            os.replace(os.path.join(out_dir, name), os.path.join(out_dir, new))
            names.append(new)
    return names


def load_weights(model: nn.Module, folder: str) -> list[str]:
    """Load `folder`'s weights into `model`; returns the config fields that differ ("field: there -> here"),
    which can only be fields that leave every shape as it is (other shapes raise, naming the fields)."""
    loaded = BambaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ours, theirs = model.config.to_dict(), loaded.config.to_dict()
    fields = [  # (not the weights' storage dtype: the trainer saves fp32 whatever config.json said)
        f"{k}: {theirs.get(k)!r} -> {ours[k]!r}" for k in ours if ours[k] != theirs.get(k) and k != "dtype"
    ]
    try:
        model.load_state_dict(loaded.state_dict())
    except RuntimeError:  # other shapes: say which config fields differ, not which tensors
        raise ValueError(
            f"train: the model in {folder} does not fit this run's config ({'; '.join(fields)}); train with "
            "that folder's config, or start over elsewhere"
        ) from None
    return fields


# ----- resuming ---------------------------------------------------------------------------------------------
def check_layout(ckpt: str, state: dict[str, Any], layout: dict[str, Any]) -> None:
    """Refuse a checkpoint written with other data or batch settings: the resumed run would read other rows."""
    changed = [f"{k}: {state.get(k)} -> {v}" for k, v in layout.items() if state.get(k) != v]
    if changed:
        raise ValueError(
            f"train: cannot resume from {ckpt}: it was written with other data or batch settings "
            f"({', '.join(changed)}); use another out_dir, or resume=False (--no-resume) to start over"
        )


def restore_optimizer(
    state: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    fsdp: bool,
    schedule: dict[str, Any],
) -> dict[str, str]:
    """Load the saved optimizer state. This call's betas, weight decay and eps win, as its `schedule` (lr,
    warmup_steps, min_lr_ratio, max_steps) does; returns those it sets otherwise than the run it continues.
    The state must fit the model (groups, parameters, moment shapes), or a ValueError names the file."""
    changed: dict[str, str] = {}
    fresh = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    try:
        load_optimizer_state(model, optimizer, state["optimizer"], fsdp)
    except (ValueError, TypeError, KeyError, IndexError, RuntimeError) as e:
        raise ValueError(
            f"train: cannot resume: the optimizer state in {STATE_FILE} does not fit this model ({e}); use "
            "another out_dir, or resume=False (--no-resume) to start over"
        ) from None
    if not fsdp:
        _check_moments(optimizer)
    for group, settings in zip(optimizer.param_groups, fresh):
        for k in ("weight_decay", "betas", "eps"):
            if group[k] != settings[k]:
                changed[k] = f"{k} {group[k]} -> {settings[k]}"
        group.update(settings)  # (this run's AdamW settings; the schedule sets the lr at each step)
    before = {**state["schedule"], "max_steps": state["max_steps"]}
    for k, v in schedule.items():
        if before.get(k) != v:
            changed[k] = f"{k} {before.get(k)} -> {v}"
    return changed


def _check_moments(optimizer: torch.optim.Optimizer) -> None:
    """AdamW's loaded state: each parameter's moments of its shape, its step a finite count."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state.get(p, {})
            bad = [
                k
                for k in ("exp_avg", "exp_avg_sq")
                if k in st and not (isinstance(st[k], Tensor) and st[k].shape == p.shape)
            ]
            step = st.get("step", 0)
            step = step.item() if isinstance(step, Tensor) and step.numel() == 1 else step
            if bad or not (isinstance(step, int | float) and math.isfinite(step) and step >= 0):
                raise ValueError(
                    f"train: cannot resume: the optimizer state in {STATE_FILE} does not fit a parameter of "
                    f"shape {list(p.shape)} ({', '.join(bad) or 'step'} malformed); use another out_dir, or "
                    "resume=False (--no-resume) to start over"
                )


def rng_states(dev: torch.device) -> dict[str, Any]:
    """The random states a resumed run restores (CUDA's only when training on a GPU)."""
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None,
    }


def restore_rng(rng: dict[str, Any], dev: torch.device) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if dev.type == "cuda" and rng.get("cuda") is not None:
        torch.cuda.set_rng_state(rng["cuda"], dev)


# ----- the log ----------------------------------------------------------------------------------------------
def append_log(path: str, record: dict[str, Any]) -> None:
    """Add a record to the JSONL log, in strict JSON (a nan, as an eval with no tokens gives, is null)."""
    with open(path, "a") as f:
        f.write(strict_json(record) + "\n")


def trim_log(path: str, step: int) -> None:
    """Drop log records past `step` (a resumed run rewrites them); a fresh run (step 0) starts a new log."""
    if not os.path.exists(path):
        return
    if step == 0:
        os.remove(path)
        return
    keep = []
    with open(path) as f:
        lines = f.readlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:  # a record cut short when the run was killed: it is rewritten
                continue
            raise ValueError(f"train: {path} line {i + 1} is not JSON ({e}); fix or remove the log") from e
        if record.get("step", 0) <= step:
            keep.append(line if line.endswith("\n") else line + "\n")
    atomic_write(path, lambda f: f.writelines(keep))


def iter_log(path: str) -> Iterator[dict[str, Any]]:
    """The records of a training log (JSONL)."""
    with open(path) as f:
        for line in f:
            if line.strip():
                yield json.loads(line)
