"""Pretraining: one readable loop, padding-free packed batches, resumable checkpoints, optional DDP / FSDP2.

Data. Every document becomes BOS + tokens + EOS. Documents are packed greedily, in order, into rows of at most
`row_tokens` tokens (`bamba.data.pack_examples`); a document longer than a row is split into row-sized pieces,
each trained on as its own example (the first token of each piece is not predicted, as for any example).
Rows are shuffled once per epoch by a generator seeded from (seed, epoch) (`RowOrder`), so the order of rows
is a pure function of (seed, step) and a resumed run reads exactly the rows an uninterrupted run would.

Batches. A micro-batch is `batch_rows` rows flattened into one row with no padding (shape (1, T)):
`position_ids` restart at 0 and `seq_idx` numbers the examples, so neither attention nor the Mamba-2 scan
mixes examples; labels are -100 at each example's first token (`DataCollatorWithFlattening`). An optimizer
step reads `grad_accum` micro-batches on each of `world_size` ranks; the loss of each is its summed
cross-entropy divided by the number of predicted tokens of the whole step (all micro-batches, all ranks), so
grad_accum x batch_rows x world_size only changes how the same global batch is cut, not the gradient.

Checkpoints are Hugging Face folders (config.json, model.safetensors, tokenizer files) plus trainer_state.pt
(optimizer, step, RNG states, data layout; the lr is a function of the step). They are written into a
temporary folder beside `checkpoint-last` and renamed into place; the previous one is removed only after that.

z-loss (config.z_loss_coefficient > 0): the step's objective is that of one forward over the whole global
batch, cross-entropy per predicted token + coefficient x mean over the step's positions of
logsumexp(logits)^2, whatever grad_accum and the number of ranks. (Calling the model with labels per
micro-batch, as transformers' Trainer does, would add each micro-batch's mean: grad_accum times the
z-loss.) The logged `loss` is that objective; `z_loss` (logged when the coefficient is > 0) is its z part,
so `loss - z_loss` is the cross-entropy that `eval_loss` measures.

Distributed: launch with `torchrun --nproc-per-node N -m bamba train ...` (or call `train` in processes whose
environment has RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT). Rank 0 alone logs and writes files; the
ranks must share out_dir's file system (one machine, or a shared disk), since all of them resume from it.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import itertools
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .checkpoint import read_config, read_quantization_config
from .config import BambaConfig, preset
from .data import IGNORE_INDEX, DataCollatorWithFlattening, iter_text_files, pack_examples
from .files import chmod_as_created
from .model import BambaForCausalLM, causal_lm_loss

CHECKPOINT_NAME = "checkpoint-last"
FINAL_NAME = "final"
STATE_FILE = "trainer_state.pt"

Row = list[list[int]]  # a packed row: a list of examples (token id lists)


# ----- data -------------------------------------------------------------------------------------------------
def load_tokenizer(path: str | None) -> Any:
    """The tokenizer of a folder holding tokenizer.json, with a clear error when there is none."""
    if not path:
        raise ValueError(
            "train: a tokenizer is required (a folder with tokenizer.json; see `bamba train-tokenizer`)"
        )
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        raise FileNotFoundError(
            f"train: tokenizer folder {path!r} has no tokenizer.json (train one with `bamba train-tokenizer`)"
        )
    from .tokenizer import Tokenizer

    return Tokenizer.from_pretrained(path)


def tokenize_documents(texts: list[str], tokenizer: Any, batch: int = 1024) -> list[list[int]]:
    """BOS + tokens + EOS for every document (BOS / EOS left out when the tokenizer has none)."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out = []
    for i in range(0, len(texts), batch):
        encoded = tokenizer(
            texts[i : i + batch], padding=False, return_tensors=None, add_special_tokens=False
        )
        out += [bos + ids + eos for ids in encoded["input_ids"]]
    return out


def split_eval(docs: list[list[int]], fraction: float, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    """(train, eval): a seeded random `fraction` of the documents (at least one) is held out, order kept."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"train: eval_fraction={fraction} must be in [0, 1)")
    # at least one; the 1e-9: 0.07 * 100 is 7.000000000000001, which must hold out 7, not 8
    n_eval = max(1, math.ceil(fraction * len(docs) - 1e-9)) if fraction > 0 else 0
    if n_eval == 0:
        return docs, []
    if n_eval >= len(docs):
        raise ValueError(
            f"train: eval_fraction={fraction} holds out all {len(docs)} documents; give more data, a smaller "
            "eval_fraction, or eval_data files"
        )
    held = set(torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed))[:n_eval].tolist())
    train = [d for i, d in enumerate(docs) if i not in held]
    return train, [d for i, d in enumerate(docs) if i in held]


def fingerprint(rows: list[Row]) -> str:
    """A short hash of the packed rows: a resumed run must read the same data."""
    h = hashlib.sha1()
    for row in rows:
        for example in row:
            h.update(torch.tensor(example, dtype=torch.int32).numpy().tobytes())
            h.update(b"|")
        h.update(b"#")
    return h.hexdigest()[:16]


class RowOrder:
    """The row index at every position of the endless training stream: each epoch is a permutation whose
    generator is seeded from (seed, epoch).

    version 2 (runs started now) seeds it with a hash of both; version 1 (trainer_state.pt files without
    "row_order", which resume as they began) with seed + epoch, so that nearby seeds shared orders (seed
    1's first epoch was seed 0's second)."""

    VERSIONS = (1, 2)
    VERSION = VERSIONS[-1]  # of runs started now

    def __init__(self, n_rows: int, seed: int, version: int = VERSION) -> None:
        if version not in self.VERSIONS:
            raise ValueError(f"train: row_order={version!r}: expected one of {self.VERSIONS}")
        self.n_rows, self.seed, self.version = n_rows, seed, version
        self._epoch, self._perm = -1, []

    def __getitem__(self, position: int) -> int:
        epoch = position // self.n_rows
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self._epoch_seed(epoch))
            self._epoch, self._perm = epoch, torch.randperm(self.n_rows, generator=g).tolist()
        return self._perm[position % self.n_rows]

    def _epoch_seed(self, epoch: int) -> int:
        if self.version == 1:
            return self.seed + epoch
        digest = hashlib.sha256(f"bamba row order {self.seed} {epoch}".encode()).digest()
        return int.from_bytes(digest[:8], "little") >> 1  # (a seed below 2**63)


def stream_positions(step: int, micro: int, rank: int, batch_rows: int, world: int, grad_accum: int) -> range:
    """Positions in the row stream that `rank` reads for micro-batch `micro` of optimizer step `step`.

    A step reads the next batch_rows * world * grad_accum positions; each micro-batch a contiguous slice of
    them, cut into one piece per rank. So 1 row x 2 ranks reads what 2 rows x 1 rank read, and
    grad_accum 2 x 1 row what grad_accum 1 x 2 rows read.
    """
    first = ((step * grad_accum + micro) * world + rank) * batch_rows
    return range(first, first + batch_rows)


_COLLATOR = DataCollatorWithFlattening(return_position_ids=True, return_seq_idx=True)


def flatten_rows(rows: list[Row]) -> dict[str, Tensor]:
    """The examples of `rows` as one padding-free row: input_ids, labels, position_ids (1, T) int64,
    seq_idx (1, T) int32."""
    return _COLLATOR([{"input_ids": ex} for row in rows for ex in row])


def count_targets(labels: Tensor) -> int:
    """Tokens the loss predicts: labels (b, l) are shifted by one inside the loss, so position 0 never counts."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


# ----- optimisation -----------------------------------------------------------------------------------------
def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices (and the embedding, conv kernels); none on 1-D params
    (norm weights, biases, A_log, D, dt_bias)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr for update `step` (0-based): linear warmup, then cosine to min_lr_ratio.

    Warmup gives update k the factor (k + 1) / warmup_steps, so no update is wasted at lr 0 (transformers'
    get_cosine_with_min_lr_schedule_with_warmup gives k / warmup_steps, one step behind); after warmup the
    two agree. The cosine reaches min_lr_ratio after the last update (update max_steps - 1 still uses a
    little more)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ----- distributed helpers ----------------------------------------------------------------------------------
@contextlib.contextmanager
def distributed(device: str) -> Iterator[tuple[int, int, torch.device]]:
    """(rank, world_size, device) of this process; joins (and at the end leaves) the process group that
    torchrun's environment describes, unless one is already initialized."""
    created = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        created = True
    try:
        rank = dist.get_rank() if dist.is_initialized() else 0
        world = dist.get_world_size() if dist.is_initialized() else 1
        dev = torch.device(device)
        if dev.type == "cuda" and world > 1 and dev.index is None:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"train: device={device!r} but CUDA is not available")
            torch.cuda.set_device(dev)
        yield rank, world, dev
    finally:
        if created:
            dist.destroy_process_group()


def _all_sum(values: list[float], world: int, device: torch.device) -> list[float]:
    """Sum floats across ranks (fp64, so counts stay exact)."""
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# ----- checkpoints ------------------------------------------------------------------------------------------
def _write_trainer_state(state: dict[str, Any], folder: str) -> None:
    torch.save(state, os.path.join(folder, STATE_FILE))
    summary = {k: v for k, v in state.items() if isinstance(v, (int, float, str, bool))}
    with open(os.path.join(folder, "trainer_state.json"), "w") as f:
        json.dump(summary, f, indent=2)


STATE_KEYS = ("step", "tokens_seen", "max_steps", "schedule", "optimizer", "rng")


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
            isinstance(rng, dict)
            and isinstance(rng.get("torch"), Tensor)
            and rng["torch"].dtype == torch.uint8
            and isinstance(rng.get("python"), tuple),
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


def _short(value: Any) -> str:
    """A value named in an error: its type, and its repr when short."""
    text = repr(value)
    return f"{type(value).__name__} {text}" if len(text) <= 40 else type(value).__name__


def save_folder_atomically(out_dir: str, name: str, write: Callable[[str], None]) -> str:
    """Run `write(tmp_folder)`, then rename the folder to out_dir/name. The previous out_dir/name is moved
    aside first and deleted last, so a complete checkpoint exists at every moment (see `find_checkpoint`)."""
    final = os.path.join(out_dir, name)
    old = os.path.join(out_dir, f".{name}.old")
    for entry in os.listdir(out_dir):  # left by a run killed while saving (this process is the only writer)
        if entry.startswith(f".{name}.tmp-"):
            shutil.rmtree(os.path.join(out_dir, entry), ignore_errors=True)
    tmp = tempfile.mkdtemp(dir=out_dir, prefix=f".{name}.tmp-")
    try:
        chmod_as_created(tmp, 0o777)  # mkdtemp makes it 0700; the final folder reads like any other
        write(tmp)
        _fsync_folder(tmp)
        if os.path.isdir(old):
            if not os.path.isdir(final):  # a crash between the two renames: `old` is the only complete one
                os.rename(old, final)
            else:
                shutil.rmtree(old)
        if os.path.isdir(final):
            os.rename(final, old)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_folder(folder: str) -> None:
    """Flush the folder's files and the folder itself to disk, so that a rename never publishes data that
    a power loss could still take back."""
    for entry in os.listdir(folder):
        path = os.path.join(folder, entry)
        if os.path.isfile(path):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    with contextlib.suppress(OSError):  # directories cannot be opened for fsync on some platforms
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def find_checkpoint(out_dir: str) -> str | None:
    """out_dir/checkpoint-last, or the previous one if a save died between its two renames."""
    for name in (CHECKPOINT_NAME, f".{CHECKPOINT_NAME}.old"):
        path = os.path.join(out_dir, name)
        if os.path.isfile(os.path.join(path, STATE_FILE)):
            return path
    return None


def _full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer, fsdp: bool) -> tuple[dict, dict]:
    """Unsharded model and optimizer state dicts (every rank must call this under FSDP)."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(model, options=opts), get_optimizer_state_dict(
            model, optimizer, options=opts
        )
    return model.state_dict(), optimizer.state_dict()


def _save_model(folder: str, config: BambaConfig, model_state: dict[str, Tensor]) -> None:
    """save_pretrained of a CPU model holding `model_state` (works for plain, DDP and gathered FSDP weights)."""
    with torch.device("meta"):
        shell = BambaForCausalLM(config, init=False)
    shell.load_state_dict({k: v.detach().cpu() for k, v in model_state.items()}, assign=True)
    shell.tie_weights()
    shell.save_pretrained(folder)


# ----- evaluation -------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(
    model: nn.Module, rows: list[Row], rank: int, world: int, device: torch.device, autocast: Any
) -> tuple[float, int]:
    """(mean cross-entropy per predicted token, number of predicted tokens) over `rows`, sharded over ranks.

    Every rank runs the same number of forwards (FSDP gathers weights in each); a rank with no row left
    re-reads row 0 with zero weight.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(rows), world):
        i = start + rank
        batch = flatten_rows([rows[i if i < len(rows) else 0]])
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast():
            logits = model(
                input_ids=batch["input_ids"],
                position_ids=batch["position_ids"],
                seq_idx=batch["seq_idx"],
                use_cache=False,
            ).logits  # (1, T, vocab)
        if i < len(rows):
            total += float(causal_lm_loss(logits, batch["labels"], num_items_in_batch=1))  # summed CE
            count += count_targets(batch["labels"])
    model.train(was_training)
    total, count = _all_sum([total, float(count)], world, device)
    return (total / count if count else float("nan")), int(count)


# ----- the loop ---------------------------------------------------------------------------------------------
class _Progress:
    """One carriage-return line on a terminal; otherwise a line every `every` steps."""

    def __init__(self, enabled: bool, every: int) -> None:
        self.enabled, self.every = enabled, max(1, every)
        self.tty = enabled and sys.stdout.isatty()
        self.open = False

    def step(self, step: int, max_steps: int, text: str) -> None:
        if not self.enabled:
            return
        line = f"step {step}/{max_steps} | {text}"
        if self.tty:
            print("\r" + line.ljust(100), end="", flush=True)
            self.open = True
        elif step % self.every == 0 or step == max_steps:
            print(line, flush=True)

    def note(self, text: str) -> None:
        if self.enabled:
            self._close_line()
            print(text, flush=True)

    def warn(self, text: str) -> None:
        """To stderr, with or without progress output."""
        self._close_line()
        print(text, file=sys.stderr, flush=True)

    def _close_line(self) -> None:
        if self.open:
            print()
            self.open = False


def _resolve_config(config: str | BambaConfig | None, init_from: str | None) -> BambaConfig:
    if isinstance(config, BambaConfig):
        return config
    if init_from is not None:
        if config is not None:
            raise ValueError("train: give either config or init_from (whose config.json is used), not both")
        if read_quantization_config(init_from) is not None:
            raise ValueError(
                f"train: init_from={init_from!r} holds a quantized model (quantization_config.json): its "
                "weights cannot be trained; start from the floating-point checkpoint it was made from"
            )
        return read_config(init_from)
    if config is None:
        raise ValueError("train: give a config (a preset name or a config.json path) or init_from")
    if os.path.isfile(config):
        return BambaConfig.from_json_file(config)
    if config.endswith(".json") or os.sep in config:
        raise FileNotFoundError(f"train: config file {config!r} does not exist")
    return preset(config)


def _set_aside_checkpoints(out_dir: str) -> list[str]:
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


def _load_weights(model: nn.Module, folder: str) -> list[str]:
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


@dataclass
class TrainData:
    rows: list[Row]  # packed training rows
    eval_rows: list[Row]  # packed held-out rows (may be empty)
    n_docs: int  # training documents
    n_tokens: int  # training tokens


def prepare_data(
    data: list[str],
    tokenizer: Any,
    row_tokens: int,
    eval_fraction: float,
    eval_data: list[str] | None,
    seed: int,
    max_examples: int | None,
) -> TrainData:
    """Read, tokenize, split off eval documents and pack into rows of at most `row_tokens` tokens."""
    texts = list(itertools.islice(iter_text_files(data), max_examples))  # reads no further than needed
    docs = tokenize_documents(texts, tokenizer)
    if eval_data:
        eval_docs = tokenize_documents(list(iter_text_files(eval_data)), tokenizer)
    else:
        docs, eval_docs = split_eval(docs, eval_fraction, seed)
    rows = list(pack_examples(docs, row_tokens))
    if not rows:
        raise ValueError(f"train: the data files {data} hold no documents (empty files, or only blank lines)")
    return TrainData(rows, list(pack_examples(eval_docs, row_tokens)), len(docs), sum(map(len, docs)))


def train(
    *,
    out_dir: str,
    data: list[str],
    tokenizer: str,
    config: str | BambaConfig | None = None,
    init_from: str | None = None,
    row_tokens: int = 2048,
    batch_rows: int = 1,
    grad_accum: int = 1,
    max_steps: int | None = None,
    lr: float = 3e-4,
    min_lr_ratio: float = 0.1,
    warmup_steps: int | None = None,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    clip: float = 1.0,
    dtype: str = "float32",
    eval_fraction: float = 0.05,
    eval_data: list[str] | None = None,
    eval_every: int = 200,
    save_every: int = 500,
    seed: int = 0,
    device: str = "cpu",
    log_file: str | None = None,
    resume: bool = True,
    max_examples: int | None = None,
    progress: bool = True,
    progress_every: int = 10,
    fsdp: bool = False,
    gradient_checkpointing: bool = False,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train a Bamba model on text files; returns the final metrics.

    config: a preset name, a config.json path or a BambaConfig (or None with init_from). max_steps None:
    one epoch rounded up to whole steps (the last step tops up with the first rows of the next epoch's
    order, so up to rows_per_step - 1 rows are read twice). warmup_steps None: 5% of max_steps.
    eval_every / save_every 0: only at the end. resume: continue from out_dir/checkpoint-last when it
    exists (the same data and batch layout are required).
    `callback(record)` runs after every optimizer step with the logged record (tests use it to simulate a
    crash). Returns {"step", "loss", "eval_loss", "eval_ppl", "tokens", "elapsed_s", "tokens_per_s",
    "final_dir"}.
    """
    for name, value in (("batch_rows", batch_rows), ("grad_accum", grad_accum)):
        if value < 1:
            raise ValueError(f"train: {name}={value} must be >= 1")
    if row_tokens < 2:
        raise ValueError(f"train: row_tokens={row_tokens} must be >= 2 (a token predicts the next one)")
    for name, value in (("max_steps", max_steps), ("max_examples", max_examples)):
        if value is not None and value < 1:
            raise ValueError(f"train: {name}={value} must be >= 1 (or None)")
    # `not x >= 0` also catches nan
    if not clip >= 0:
        raise ValueError(f"train: clip={clip} must be >= 0 (0: no clipping)")
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"train: lr={lr} must be a finite number > 0")
    if not 0 <= min_lr_ratio <= 1:
        raise ValueError(f"train: min_lr_ratio={min_lr_ratio} must be in [0, 1] (the final lr over the peak)")
    if not weight_decay >= 0:
        raise ValueError(f"train: weight_decay={weight_decay} must be >= 0")
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ValueError(f"train: betas={tuple(betas)} must be two numbers in [0, 1) (AdamW's beta1, beta2)")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"train: out_dir={out_dir!r} exists and is not a folder")
    if log_file is not None and os.path.isdir(log_file):
        raise ValueError(f"train: log_file={log_file!r} exists and is not a file")
    last = os.path.join(out_dir, CHECKPOINT_NAME)
    if os.path.exists(last) and not os.path.isdir(last):  # (the first save would fail, after training)
        raise ValueError(f"train: {last} is a file, where checkpoints go; move it away")
    if (
        resume and os.path.isdir(last) and find_checkpoint(out_dir) is None
    ):  # a fresh start would overwrite it
        raise ValueError(
            f"train: {last} has no {STATE_FILE} (damaged, or not written by the trainer), so the run "
            "cannot resume from it; restore it, use another out_dir, or resume=False (--no-resume) to "
            "start over"
        )
    for name, value in (
        ("warmup_steps", warmup_steps),
        ("eval_every", eval_every),
        ("save_every", save_every),
    ):
        if value is not None and value < 0:
            raise ValueError(f"train: {name}={value} must be >= 0")
    if warmup_steps is not None and max_steps is not None and warmup_steps > max_steps:
        raise ValueError(f"train: warmup_steps={warmup_steps} exceeds max_steps={max_steps}")
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"train: dtype={dtype!r}; expected 'float32' or 'bfloat16'")
    if not data:
        raise ValueError("train: no data files given")
    tok = load_tokenizer(tokenizer)
    cfg = _resolve_config(config, init_from)
    # The data uses the tokenizer's special ids: the saved config (and so generation) must agree with them.
    special = {
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    cfg = cfg.replace(**{k: v for k, v in special.items() if v is not None and getattr(cfg, k) != v})
    if len(tok) > cfg.vocab_size:
        raise ValueError(
            f"train: tokenizer {tokenizer!r} has {len(tok)} tokens but the config's vocab_size is {cfg.vocab_size}"
        )
    if row_tokens > cfg.max_position_embeddings:
        raise ValueError(
            f"train: row_tokens={row_tokens} exceeds the config's max_position_embeddings={cfg.max_position_embeddings}"
        )
    td = prepare_data(data, tok, row_tokens, eval_fraction, eval_data, seed, max_examples)

    with distributed(device) as (rank, world, dev):
        main = rank == 0
        rows_per_step = batch_rows * world * grad_accum
        if max_steps is None:
            max_steps = math.ceil(len(td.rows) / rows_per_step)
            if warmup_steps is not None and warmup_steps > max_steps:
                raise ValueError(
                    f"train: warmup_steps={warmup_steps} exceeds the {max_steps} steps of one epoch (max_steps "
                    "None); give fewer warmup steps or more max_steps"
                )
        if warmup_steps is None:
            warmup_steps = max_steps // 20
        # What a resumed run must share with the run it continues, or it would read other rows.
        layout = {
            "data_fingerprint": fingerprint(td.rows),
            "rows_per_step": rows_per_step,
            "seed": seed,
            "row_tokens": row_tokens,
            "fsdp": fsdp,
        }

        # ----- model and optimizer (from checkpoint-last when resuming)
        torch.manual_seed(seed)
        model = BambaForCausalLM(cfg).to(dev)
        model.train()
        model.model.gradient_checkpointing = gradient_checkpointing
        ckpt = find_checkpoint(out_dir) if resume else None
        state: dict[str, Any] | None = None
        config_changes: list[str] = []  # model config fields set otherwise than in the resumed checkpoint
        if ckpt is not None:
            state = read_trainer_state(ckpt)
            changed = [f"{k}: {state.get(k)} -> {v}" for k, v in layout.items() if state.get(k) != v]
            if changed:
                raise ValueError(
                    f"train: cannot resume from {ckpt}: it was written with other data or batch settings "
                    f"({', '.join(changed)}); use another out_dir, or resume=False (--no-resume) to start over"
                )
            config_changes = _load_weights(model, ckpt)
        elif init_from is not None:
            _load_weights(model, init_from)
        # rows in the order the run began with (its trainer_state's row_order; 1 before there was one)
        order = RowOrder(len(td.rows), seed, RowOrder.VERSION if state is None else state.get("row_order", 1))
        wrapped = _wrap(model, world, dev, fsdp)
        try:
            optimizer = torch.optim.AdamW(
                param_groups(model, weight_decay), lr=lr, betas=tuple(betas), eps=1e-8
            )
            step, tokens_seen = 0, 0
            changed_settings: dict[str, str] = {}  # what this call sets differently from the resumed run
            if state is not None:
                fresh = [{k: g[k] for k in ("weight_decay", "betas", "eps")} for g in optimizer.param_groups]
                _load_optimizer(wrapped, optimizer, state["optimizer"], fsdp)
                for group, settings in zip(optimizer.param_groups, fresh):
                    for k, v in settings.items():
                        if group[k] != v:
                            changed_settings[k] = f"{k} {group[k]} -> {v}"
                    group.update(settings)  # this call's settings win, as they do for the lr schedule
                schedule = {"lr": lr, "warmup_steps": warmup_steps, "min_lr_ratio": min_lr_ratio}
                before = {**state["schedule"], "max_steps": state["max_steps"]}
                for k, v in {**schedule, "max_steps": max_steps}.items():
                    if before.get(k) != v:
                        changed_settings[k] = f"{k} {before.get(k)} -> {v}"
                step, tokens_seen = state["step"], state["tokens_seen"]
                torch.set_rng_state(state["rng"]["torch"])
                random.setstate(state["rng"]["python"])
                if dev.type == "cuda" and state["rng"].get("cuda") is not None:
                    torch.cuda.set_rng_state(state["rng"]["cuda"], dev)
            autocast = _autocast(dtype, dev)

            # ----- logging, evaluation, checkpoints (rank 0 writes)
            log_path = log_file or os.path.join(out_dir, "log.jsonl")
            bar = _Progress(progress and main, progress_every)
            if main:
                os.makedirs(out_dir, exist_ok=True)
                os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
                _trim_log(log_path, step)
                # the run is set up (nothing can refuse it now): a start over sets earlier checkpoints aside
                set_aside = [] if resume else _set_aside_checkpoints(out_dir)
                bar.note(
                    f"train: {model.num_parameters():,} parameters | {td.n_docs} documents, {td.n_tokens:,} tokens "
                    f"in {len(td.rows)} rows of <= {row_tokens} | eval {len(td.eval_rows)} rows | {rows_per_step} "
                    f"rows/step over {world} process(es)"
                    + (f" | resuming {ckpt} at step {step}" if ckpt else "")
                )
                if set_aside:
                    bar.warn(
                        f"train: starting over; the earlier run's checkpoints are now {', '.join(set_aside)}"
                    )
                if changed_settings:
                    bar.warn(f"train: resuming with other settings: {'; '.join(changed_settings.values())}")
                if config_changes:
                    bar.warn(f"train: resuming with another model config: {'; '.join(config_changes)}")

            def log(record: dict[str, Any]) -> None:
                if main:
                    with open(log_path, "a") as f:  # strict JSON: a nan (no eval tokens) is written as null
                        clean = {
                            k: None if isinstance(v, float) and not math.isfinite(v) else v
                            for k, v in record.items()
                        }
                        f.write(json.dumps(clean) + "\n")

            def save(name: str, with_state: bool = True) -> None:
                model_state, optim_state = _full_state_dicts(wrapped if fsdp else model, optimizer, fsdp)
                if not main:
                    return
                trainer_state = {
                    **layout,
                    "row_order": order.version,
                    "step": step,
                    "tokens_seen": tokens_seen,
                    "max_steps": max_steps,
                    "schedule": {"lr": lr, "warmup_steps": warmup_steps, "min_lr_ratio": min_lr_ratio},
                    "optimizer": optim_state,
                    "rng": {
                        "torch": torch.get_rng_state(),
                        "python": random.getstate(),
                        "cuda": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None,
                    },
                }

                def write(folder: str) -> None:
                    _save_model(folder, cfg, model_state)
                    tok.save_pretrained(folder)
                    if with_state:
                        _write_trainer_state(trainer_state, folder)

                save_folder_atomically(out_dir, name, write)

            def run_eval() -> dict[str, Any]:
                if not td.eval_rows:
                    return {}
                loss, count = evaluate(wrapped if fsdp else model, td.eval_rows, rank, world, dev, autocast)
                record = {
                    "step": step,
                    "eval_loss": loss,
                    "eval_ppl": math.exp(min(loss, 700.0)),
                    "eval_tokens": count,
                }
                log(record)
                bar.note(f"step {step}: eval loss {loss:.4f} | ppl {record['eval_ppl']:.2f}")
                return record

            def stop(what: str, value: float) -> RuntimeError:
                kept = find_checkpoint(out_dir)
                return RuntimeError(
                    f"train: the {what} at step {step + 1} is {value} (not finite); stopped before updating the "
                    "weights. "
                    + (f"The last good checkpoint is {kept}." if kept else "No checkpoint was saved yet.")
                    + " Try a lower lr, a longer warmup or dtype float32."
                )

            # ----- the loop
            last_loss = float("nan")
            eval_record: dict[str, Any] = {}
            t_start, tokens_start, start_step = time.perf_counter(), tokens_seen, step
            if step >= max_steps:
                bar.note(
                    f"train: {ckpt} is already at step {step} of max_steps={max_steps}: nothing to train"
                )
            while step < max_steps:
                t0 = time.perf_counter()
                micro = [
                    flatten_rows(
                        [
                            td.rows[order[i]]
                            for i in stream_positions(step, m, rank, batch_rows, world, grad_accum)
                        ]
                    )
                    for m in range(grad_accum)
                ]  # grad_accum batches: input_ids, labels, position_ids, seq_idx of shape (1, T_m)
                counts = [count_targets(b["labels"]) for b in micro]
                n_items, step_tokens = _all_sum(
                    [sum(counts), sum(b["input_ids"].shape[1] for b in micro)], world, dev
                )  # predicted tokens, positions
                current_lr = lr * lr_factor(step, warmup_steps, max_steps, min_lr_ratio)
                if n_items == 0:  # only 1-token examples: nothing to predict, no update
                    step += 1
                    log({"step": step, "skipped": "no predicted tokens in this step's rows"})
                    continue
                for group in optimizer.param_groups:
                    group["lr"] = current_lr
                loss_value, z_value = _forward_backward(
                    wrapped,
                    micro,
                    counts,
                    int(n_items),
                    int(step_tokens),
                    cfg.z_loss_coefficient,
                    world,
                    fsdp,
                    dev,
                    autocast,
                )
                if not math.isfinite(loss_value):
                    raise stop("loss", loss_value)
                grad_norm = _clip(model, clip)
                if not math.isfinite(grad_norm):
                    raise stop("gradient norm", grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                tokens_seen += int(step_tokens)
                last_loss = loss_value

                dt = time.perf_counter() - t0
                record = {
                    "step": step,
                    "loss": loss_value,
                    **({"z_loss": z_value} if cfg.z_loss_coefficient > 0 else {}),
                    "lr": current_lr,
                    "grad_norm": grad_norm,
                    "tokens": tokens_seen,
                    "tokens_per_s": step_tokens / dt,
                    "epoch": step * rows_per_step / len(td.rows),
                }
                log(record)
                bar.step(
                    step,
                    max_steps,
                    f"loss {loss_value:.4f} | lr {current_lr:.2e} | {step_tokens / dt:,.0f} tok/s",
                )
                if eval_every > 0 and step % eval_every == 0 and step < max_steps:
                    eval_record = run_eval()
                if save_every > 0 and step % save_every == 0 and step < max_steps:
                    save(CHECKPOINT_NAME)
                if callback is not None:
                    callback(record)

            # ----- the end: eval, the last checkpoint, the final model
            elapsed = time.perf_counter() - t_start
            eval_record = run_eval() or eval_record
            # final first: a checkpoint-last at max_steps then implies a final of the same step. Rank 0 decides
            # (the other ranks may not see its files) and all ranks follow: saving is collective under FSDP.
            final_missing = main and not os.path.isdir(os.path.join(out_dir, FINAL_NAME))
            if step > start_step or _all_sum([float(final_missing)], world, dev)[0] > 0:
                save(FINAL_NAME, with_state=False)
                save(CHECKPOINT_NAME)
            bar.note(f"train: step {step}, saved {os.path.join(out_dir, FINAL_NAME)}")
            if world > 1:
                dist.barrier()  # every rank returns once the files are written
            return {
                "step": step,
                "loss": last_loss,
                "eval_loss": eval_record.get("eval_loss"),
                "eval_ppl": eval_record.get("eval_ppl"),
                "tokens": tokens_seen,
                "elapsed_s": elapsed,
                "tokens_per_s": (tokens_seen - tokens_start) / elapsed if elapsed > 0 else 0.0,
                "final_dir": os.path.join(out_dir, FINAL_NAME),
            }
        finally:
            # DDP's reducer holds the process group. Freed after the group is destroyed (at this function's
            # return, on success or error), it ran the group's destructor with the GIL held, which waits for
            # gloo's thread, which may wait for the GIL: a run hung there once. So it goes while the group lives.
            wrapped = None
            gc.collect()


def _forward_backward(
    model: nn.Module,
    micro: list[dict[str, Tensor]],
    counts: list[int],
    n_items: int,
    n_positions: int,
    z_coefficient: float,
    world: int,
    fsdp: bool,
    dev: torch.device,
    autocast: Callable[[], Any],
) -> tuple[float, float]:
    """Accumulate the gradients of one optimizer step; returns the step's loss and its z-loss part, over
    all ranks. n_items, n_positions: the whole step's predicted tokens and positions. Each micro-batch
    adds its summed cross-entropy / n_items, and z_coefficient x its summed logsumexp(logits)^2 /
    n_positions: together, the loss of one forward over the whole step (see the module's docstring)."""
    loss_sum, z_sum = 0.0, 0.0
    for m, (batch, count) in enumerate(zip(micro, counts)):
        if count == 0 and world == 1 and z_coefficient == 0:
            continue  # nothing to predict: skip the forward (other ranks would wait for it under DDP)
        last = m == len(micro) - 1
        sync = contextlib.nullcontext()
        if fsdp:
            model.set_requires_gradient_sync(last)
        elif world > 1 and not last:
            sync = model.no_sync()  # DDP: all-reduce gradients once, after the last micro-batch
        batch = {k: v.to(dev) for k, v in batch.items()}
        with sync:
            with autocast():
                logits = model(
                    input_ids=batch["input_ids"],
                    position_ids=batch["position_ids"],
                    seq_idx=batch["seq_idx"],
                    use_cache=False,
                ).logits  # (1, T, vocab)
            loss = causal_lm_loss(logits, batch["labels"], num_items_in_batch=n_items)  # 0 when count == 0
            if z_coefficient > 0:
                z = z_coefficient * logits.float().logsumexp(dim=-1).pow(2).sum() / n_positions
                loss = loss + z
                z_sum += float(z.detach())
            # DDP and FSDP average gradients over ranks, but the loss is already normalised globally.
            (loss * world).backward()
        loss_sum += float(loss.detach())
    total, z_total = _all_sum([loss_sum, z_sum], world, dev)
    return total, z_total


def _clip(model: nn.Module, clip: float) -> float:
    """Clip the gradient norm to `clip` (0: no clipping); returns the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else float("inf"))
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP2: a DTensor


def _wrap(model: nn.Module, world: int, dev: torch.device, fsdp: bool) -> nn.Module:
    """The module the loop calls: the model, DDP around it, or the model sharded in place by FSDP2."""
    if fsdp:
        if not dist.is_initialized():
            raise ValueError("train: fsdp=True needs a distributed launch (torchrun --nproc-per-node N)")
        from torch.distributed.device_mesh import init_device_mesh

        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # torch 2.5: FSDP2 was not public yet
            from torch.distributed._composable.fsdp import fully_shard

        # The mesh of the training device: left to itself, FSDP2 picks CUDA wherever a GPU exists, even for
        # processes training on the CPU (which then fail to select GPUs the machine does not have).
        mesh = init_device_mesh(dev.type, (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    if world > 1:
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None
        )
    return model


def _load_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, fsdp: bool) -> None:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)


def _autocast(dtype: str, dev: torch.device) -> Callable[[], Any]:
    if dtype == "float32":
        return contextlib.nullcontext
    if dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"train: dtype='bfloat16' but {torch.cuda.get_device_name(dev)} does not support it")
    return lambda: torch.autocast(dev.type, dtype=torch.bfloat16)


def _trim_log(path: str, step: int) -> None:
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
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)


def iter_log(path: str) -> Iterator[dict[str, Any]]:
    """The records of a training log (JSONL)."""
    with open(path) as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


# ----- command line -----------------------------------------------------------------------------------------
def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a Bamba model on text files (single process, or under torchrun)",
        description="Train (or continue training) a Bamba model on .txt / .jsonl files with padding-free packing. "
        "Distributed: torchrun --nproc-per-node N -m bamba train ...",
    )
    p.add_argument(
        "--out", required=True, dest="out_dir", help="output folder (checkpoints, final model, log)"
    )
    p.add_argument("--data", required=True, nargs="+", help=".txt (blank-line separated) or .jsonl files")
    p.add_argument(
        "--tokenizer", required=True, help="folder with tokenizer.json (see `bamba train-tokenizer`)"
    )
    p.add_argument("--config", help="preset name (demo, bench-small, ...) or path to a config.json")
    p.add_argument("--init-from", help="checkpoint folder whose weights (and config) to start from")
    p.add_argument("--row-tokens", type=int, default=2048, help="token budget of one packed row")
    p.add_argument("--batch-rows", type=int, default=1, help="rows per micro-batch per process")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument(
        "--max-steps", type=int, help="optimizer steps (default: one epoch, rounded up to whole steps)"
    )
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate")
    p.add_argument(
        "--min-lr-ratio",
        type=float,
        default=0.1,
        help="lr at the end of the cosine, as a fraction of the peak",
    )
    p.add_argument("--warmup-steps", type=int, help="linear warmup steps (default: 5%% of max steps)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.95), metavar=("BETA1", "BETA2"))
    p.add_argument("--clip", type=float, default=1.0, help="gradient norm clip (0: none)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="bfloat16: autocast")
    p.add_argument("--eval-fraction", type=float, default=0.05, help="documents held out for eval")
    p.add_argument("--eval-data", nargs="+", help="eval files (instead of a held-out fraction)")
    p.add_argument("--eval-every", type=int, default=200, help="steps between evals (0: only at the end)")
    p.add_argument(
        "--save-every", type=int, default=500, help="steps between checkpoints (0: only at the end)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--log-file", help="JSONL log (default: OUT/log.jsonl)")
    p.add_argument(
        "--no-resume", dest="resume", action="store_false", help="start over even if OUT has a checkpoint"
    )
    p.add_argument("--max-examples", type=int, help="read at most this many documents")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument(
        "--progress-every", type=int, default=10, help="steps between progress lines (not a terminal)"
    )
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP2 (fully_shard) instead of DDP")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute layers in backward")
    p.add_argument("--threads", type=int, help="torch CPU threads per process (default: torch's choice)")

    def run(args: argparse.Namespace) -> int:
        kwargs = {k: v for k, v in vars(args).items() if k not in ("func", "command", "threads")}
        if args.threads is not None:
            if args.threads < 1:
                raise ValueError(f"--threads {args.threads} must be >= 1")
            torch.set_num_threads(args.threads)
        kwargs["betas"] = tuple(kwargs["betas"])
        metrics = train(**kwargs)
        if int(os.environ.get("RANK", "0")) == 0:  # valid JSON: no NaN (a loss no step produced) -> null
            print(
                json.dumps(
                    {
                        k: None if isinstance(v, float) and not math.isfinite(v) else v
                        for k, v in metrics.items()
                    }
                )
            )
        return 0

    p.set_defaults(func=run)
