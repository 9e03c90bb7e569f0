"""Pretraining: one readable loop, padding-free packed batches, resumable checkpoints, optional DDP / FSDP2.

Data. Every document becomes BOS + tokens + EOS. Documents are packed greedily, in order, into rows of at most
`row_tokens` tokens (`bamba.data.prepare_data`); a document longer than a row is split into row-sized pieces,
each trained on as its own example (the first token of each piece is not predicted, as for any example).
Rows are shuffled once per epoch by a generator seeded from (seed, epoch) (`bamba.data.RowOrder`), so the order of rows
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

import contextlib
import gc
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .checkpoint import read_config, read_quantization_config
from .config import BambaConfig, preset
from .data import (
    RowOrder,
    TrainData,
    count_targets,
    fingerprint,
    flatten_rows,
    load_tokenizer,
    prepare_data,
    stream_positions,
)
from .distributed import all_sum, distributed, full_state_dicts, wrap_model
from .evaluate import evaluate, packed_logits
from .files import save_folder_atomically
from .model import BambaForCausalLM, causal_lm_loss
from .tokenizer import Tokenizer
from .train_state import (
    CHECKPOINT_NAME,
    FINAL_NAME,
    append_log,
    check_checkpoint_place,
    check_layout,
    find_checkpoint,
    load_weights,
    read_trainer_state,
    restore_optimizer,
    restore_rng,
    rng_states,
    save_model,
    set_aside_checkpoints,
    trim_log,
    write_trainer_state,
)


# ----- arguments --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainArgs:
    """`train`'s arguments (described in its docstring; its signature holds the defaults), checked here."""

    out_dir: str
    data: list[str]
    tokenizer: str
    config: str | BambaConfig | None
    init_from: str | None
    row_tokens: int
    batch_rows: int
    grad_accum: int
    max_steps: int | None
    lr: float
    min_lr_ratio: float
    warmup_steps: int | None
    weight_decay: float
    betas: tuple[float, float]
    clip: float
    dtype: str
    eval_fraction: float
    eval_data: list[str] | None
    eval_every: int
    save_every: int
    seed: int
    device: str
    log_file: str | None
    resume: bool
    max_examples: int | None
    progress: bool
    progress_every: int
    fsdp: bool
    gradient_checkpointing: bool
    callback: Callable[[dict[str, Any]], None] | None

    def __post_init__(self) -> None:
        for name, value in (("batch_rows", self.batch_rows), ("grad_accum", self.grad_accum)):
            if value < 1:
                raise ValueError(f"train: {name}={value} must be >= 1")
        if self.row_tokens < 2:
            raise ValueError(
                f"train: row_tokens={self.row_tokens} must be >= 2 (a token predicts the next one)"
            )
        for name, value in (("max_steps", self.max_steps), ("max_examples", self.max_examples)):
            if value is not None and value < 1:
                raise ValueError(f"train: {name}={value} must be >= 1 (or None)")
        # `not x >= 0` also catches nan
        if not self.clip >= 0:
            raise ValueError(f"train: clip={self.clip} must be >= 0 (0: no clipping)")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"train: lr={self.lr} must be a finite number > 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(
                f"train: min_lr_ratio={self.min_lr_ratio} must be in [0, 1] (the final lr over the peak)"
            )
        if not self.weight_decay >= 0:
            raise ValueError(f"train: weight_decay={self.weight_decay} must be >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(
                f"train: betas={tuple(self.betas)} must be two numbers in [0, 1) (AdamW's beta1, beta2)"
            )
        if os.path.exists(self.out_dir) and not os.path.isdir(self.out_dir):
            raise ValueError(f"train: out_dir={self.out_dir!r} exists and is not a folder")
        if self.log_file is not None and os.path.isdir(self.log_file):
            raise ValueError(f"train: log_file={self.log_file!r} exists and is not a file")
        check_checkpoint_place(self.out_dir, self.resume)
        for name, value in (
            ("warmup_steps", self.warmup_steps),
            ("eval_every", self.eval_every),
            ("save_every", self.save_every),
        ):
            if value is not None and value < 0:
                raise ValueError(f"train: {name}={value} must be >= 0")
        if (
            self.warmup_steps is not None
            and self.max_steps is not None
            and self.warmup_steps > self.max_steps
        ):
            raise ValueError(f"train: warmup_steps={self.warmup_steps} exceeds max_steps={self.max_steps}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"train: dtype={self.dtype!r}; expected 'float32' or 'bfloat16'")
        if not self.data:
            raise ValueError("train: no data files given")


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
    args = TrainArgs(**locals())
    tok = load_tokenizer(args.tokenizer)
    cfg = _model_config(args, tok)
    td = prepare_data(
        args.data, tok, args.row_tokens, args.eval_fraction, args.eval_data, args.seed, args.max_examples
    )
    with distributed(args.device) as (rank, world, dev):
        run = _Run(args, cfg, tok, td, rank, world, dev)
        try:
            run.wrap_and_restore()
            run.open_outputs()
            return run.loop()
        finally:
            # DDP's reducer holds the process group. Freed after the group is destroyed (at this function's
            # return, on success or error), it ran the group's destructor with the GIL held, which waits for
            # gloo's thread, which may wait for the GIL: a run hung there once. So it goes while the group lives.
            run.wrapped = None
            gc.collect()


def _model_config(args: TrainArgs, tok: Tokenizer) -> BambaConfig:
    """The config trained (args' or init_from's) with the tokenizer's special ids, checked against the data."""
    cfg = _resolve_config(args.config, args.init_from)
    # The data uses the tokenizer's special ids: the saved config (and so generation) must agree with them.
    special = {
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    cfg = cfg.replace(**{k: v for k, v in special.items() if v is not None and getattr(cfg, k) != v})
    if len(tok) > cfg.vocab_size:
        raise ValueError(
            f"train: tokenizer {args.tokenizer!r} has {len(tok)} tokens but the config's vocab_size is "
            f"{cfg.vocab_size}"
        )
    if args.row_tokens > cfg.max_position_embeddings:
        raise ValueError(
            f"train: row_tokens={args.row_tokens} exceeds the config's max_position_embeddings="
            f"{cfg.max_position_embeddings}"
        )
    return cfg


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


def _steps(args: TrainArgs, n_rows: int, rows_per_step: int) -> tuple[int, int]:
    """(max_steps, warmup_steps): None gives one epoch rounded up to whole steps, and 5% of max_steps."""
    max_steps, warmup_steps = args.max_steps, args.warmup_steps
    if max_steps is None:
        max_steps = math.ceil(n_rows / rows_per_step)
        if warmup_steps is not None and warmup_steps > max_steps:
            raise ValueError(
                f"train: warmup_steps={warmup_steps} exceeds the {max_steps} steps of one epoch (max_steps "
                "None); give fewer warmup steps or more max_steps"
            )
    if warmup_steps is None:
        warmup_steps = max_steps // 20
    return max_steps, warmup_steps


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


def _clip(model: nn.Module, clip: float) -> float:
    """Clip the gradient norm to `clip` (0: no clipping); returns the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else float("inf"))
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP2: a DTensor


def _autocast(dtype: str, dev: torch.device) -> Callable[[], Any]:
    if dtype == "float32":
        return contextlib.nullcontext
    if dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"train: dtype='bfloat16' but {torch.cuda.get_device_name(dev)} does not support it")
    return lambda: torch.autocast(dev.type, dtype=torch.bfloat16)


# ----- the run ----------------------------------------------------------------------------------------------
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


class _Run:
    """One training run: the model, optimizer, row order and step counters that the loop's parts share,
    and what rank 0 writes (log, progress, checkpoints)."""

    def __init__(
        self,
        args: TrainArgs,
        cfg: BambaConfig,
        tok: Tokenizer,
        td: TrainData,
        rank: int,
        world: int,
        dev: torch.device,
    ) -> None:
        self.args, self.cfg, self.tok, self.td = args, cfg, tok, td
        self.rank, self.world, self.dev, self.main = rank, world, dev, rank == 0
        self.rows_per_step = args.batch_rows * world * args.grad_accum
        self.max_steps, self.warmup_steps = _steps(args, len(td.rows), self.rows_per_step)
        # What a resumed run must share with the run it continues, or it would read other rows.
        self.layout = {
            "data_fingerprint": fingerprint(td.rows),
            "rows_per_step": self.rows_per_step,
            "seed": args.seed,
            "row_tokens": args.row_tokens,
            "fsdp": args.fsdp,
        }
        torch.manual_seed(args.seed)
        self.model = BambaForCausalLM(cfg).to(dev)
        self.model.train()
        self.model.model.gradient_checkpointing = args.gradient_checkpointing
        self.ckpt = find_checkpoint(args.out_dir) if args.resume else None
        self.state: dict[str, Any] | None = None
        # model config fields set otherwise than in the resumed checkpoint
        self.config_changes: list[str] = []
        if self.ckpt is not None:
            self.state = read_trainer_state(self.ckpt)
            check_layout(self.ckpt, self.state, self.layout)
            self.config_changes = load_weights(self.model, self.ckpt)
        elif args.init_from is not None:
            load_weights(self.model, args.init_from)
        # rows in the order the run began with (its trainer_state's row_order; 1 before there was one)
        version = RowOrder.VERSION if self.state is None else self.state.get("row_order", 1)
        self.order = RowOrder(len(td.rows), args.seed, version)
        self.step, self.tokens_seen = 0, 0
        self.wrapped: nn.Module | None = None  # the module the loop calls (DDP, FSDP2 or the model itself)

    @property
    def schedule(self) -> dict[str, Any]:
        return {"lr": self.args.lr, "warmup_steps": self.warmup_steps, "min_lr_ratio": self.args.min_lr_ratio}

    def wrap_and_restore(self) -> None:
        """DDP / FSDP2 around the model, the optimizer, and (resuming) checkpoint-last's counters and RNG."""
        a = self.args
        self.wrapped = wrap_model(self.model, self.world, self.dev, a.fsdp)
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, a.weight_decay), lr=a.lr, betas=tuple(a.betas), eps=1e-8
        )
        self.changed_settings: dict[str, str] = {}  # what this call sets differently from the resumed run
        if self.state is not None:
            schedule = {**self.schedule, "max_steps": self.max_steps}
            self.changed_settings = restore_optimizer(
                self.state, self.wrapped, self.optimizer, a.fsdp, schedule
            )
            self.step, self.tokens_seen = self.state["step"], self.state["tokens_seen"]
            restore_rng(self.state["rng"], self.dev)
        self.autocast = _autocast(a.dtype, self.dev)

    def open_outputs(self) -> None:
        """The log (trimmed to the step resumed) and the progress line; rank 0 says what the run is."""
        a = self.args
        self.log_path = a.log_file or os.path.join(a.out_dir, "log.jsonl")
        self.bar = _Progress(a.progress and self.main, a.progress_every)
        if not self.main:
            return
        os.makedirs(a.out_dir, exist_ok=True)
        os.makedirs(os.path.dirname(os.path.abspath(self.log_path)), exist_ok=True)
        trim_log(self.log_path, self.step)
        # the run is set up (nothing can refuse it now): a start over sets earlier checkpoints aside
        set_aside = [] if a.resume else set_aside_checkpoints(a.out_dir)
        td = self.td
        self.bar.note(
            f"train: {self.model.num_parameters():,} parameters | {td.n_docs} documents, {td.n_tokens:,} tokens "
            f"in {len(td.rows)} rows of <= {a.row_tokens} | eval {len(td.eval_rows)} rows | {self.rows_per_step} "
            f"rows/step over {self.world} process(es)"
            + (f" | resuming {self.ckpt} at step {self.step}" if self.ckpt else "")
        )
        if set_aside:
            self.bar.warn(
                f"train: starting over; the earlier run's checkpoints are now {', '.join(set_aside)}"
            )
        if self.changed_settings:
            self.bar.warn(f"train: resuming with other settings: {'; '.join(self.changed_settings.values())}")
        if self.config_changes:
            self.bar.warn(f"train: resuming with another model config: {'; '.join(self.config_changes)}")

    def loop(self) -> dict[str, Any]:
        """Steps up to max_steps with evals and checkpoints between, then the last eval and saves; the metrics."""
        a = self.args
        last_loss, eval_record = float("nan"), {}
        t_start, tokens_start, start_step = time.perf_counter(), self.tokens_seen, self.step
        if self.step >= self.max_steps:
            self.bar.note(
                f"train: {self.ckpt} is already at step {self.step} of max_steps={self.max_steps}: nothing to train"
            )
        while self.step < self.max_steps:
            record = self.train_step()
            if record is None:  # nothing to predict in this step's rows
                continue
            last_loss = record["loss"]
            if a.eval_every > 0 and self.step % a.eval_every == 0 and self.step < self.max_steps:
                eval_record = self.run_eval()
            if a.save_every > 0 and self.step % a.save_every == 0 and self.step < self.max_steps:
                self.save(CHECKPOINT_NAME)
            if a.callback is not None:
                a.callback(record)
        elapsed = time.perf_counter() - t_start
        eval_record = self.run_eval() or eval_record
        self.save_end(start_step)
        return {
            "step": self.step,
            "loss": last_loss,
            "eval_loss": eval_record.get("eval_loss"),
            "eval_ppl": eval_record.get("eval_ppl"),
            "tokens": self.tokens_seen,
            "elapsed_s": elapsed,
            "tokens_per_s": (self.tokens_seen - tokens_start) / elapsed if elapsed > 0 else 0.0,
            "final_dir": os.path.join(a.out_dir, FINAL_NAME),
        }

    def train_step(self) -> dict[str, Any] | None:
        """One optimizer step; its logged record, or None when its rows hold nothing to predict (no update)."""
        a, t0 = self.args, time.perf_counter()
        micro = self._micro_batches()
        counts = [count_targets(b["labels"]) for b in micro]
        n_items, step_tokens = all_sum(
            [sum(counts), sum(b["input_ids"].shape[1] for b in micro)], self.world, self.dev
        )  # predicted tokens, positions
        current_lr = a.lr * lr_factor(self.step, self.warmup_steps, self.max_steps, a.min_lr_ratio)
        if n_items == 0:  # only 1-token examples
            self.step += 1
            self.log({"step": self.step, "skipped": "no predicted tokens in this step's rows"})
            return None
        for group in self.optimizer.param_groups:
            group["lr"] = current_lr
        loss_value, z_value = self._forward_backward(micro, counts, int(n_items), int(step_tokens))
        if not math.isfinite(loss_value):
            raise self._not_finite("loss", loss_value)
        grad_norm = _clip(self.model, a.clip)
        if not math.isfinite(grad_norm):
            raise self._not_finite("gradient norm", grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += int(step_tokens)
        dt = time.perf_counter() - t0
        record = {
            "step": self.step,
            "loss": loss_value,
            **({"z_loss": z_value} if self.cfg.z_loss_coefficient > 0 else {}),
            "lr": current_lr,
            "grad_norm": grad_norm,
            "tokens": self.tokens_seen,
            "tokens_per_s": step_tokens / dt,
            "epoch": self.step * self.rows_per_step / len(self.td.rows),
        }
        self.log(record)
        text = f"loss {loss_value:.4f} | lr {current_lr:.2e} | {step_tokens / dt:,.0f} tok/s"
        self.bar.step(self.step, self.max_steps, text)
        return record

    def _micro_batches(self) -> list[dict[str, Tensor]]:
        """This rank's grad_accum micro-batches of the step: input_ids, labels, position_ids, seq_idx (1, T_m)."""
        a, rows = self.args, self.td.rows
        return [
            flatten_rows(
                [
                    rows[self.order[i]]
                    for i in stream_positions(self.step, m, self.rank, a.batch_rows, self.world, a.grad_accum)
                ]
            )
            for m in range(a.grad_accum)
        ]

    def _forward_backward(
        self, micro: list[dict[str, Tensor]], counts: list[int], n_items: int, n_positions: int
    ) -> tuple[float, float]:
        """Accumulate the gradients of one optimizer step; returns the step's loss and its z-loss part, over
        all ranks. n_items, n_positions: the whole step's predicted tokens and positions. Each micro-batch
        adds its summed cross-entropy / n_items, and z_loss_coefficient x its summed logsumexp(logits)^2 /
        n_positions: together, the loss of one forward over the whole step (see the module's docstring)."""
        model, world, fsdp, dev = self.wrapped, self.world, self.args.fsdp, self.dev
        z_coefficient = self.cfg.z_loss_coefficient
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
                with self.autocast():
                    logits = packed_logits(model, batch)  # (1, T, vocab)
                # 0 when count == 0
                loss = causal_lm_loss(logits, batch["labels"], num_items_in_batch=n_items)
                if z_coefficient > 0:
                    z = z_coefficient * logits.float().logsumexp(dim=-1).pow(2).sum() / n_positions
                    loss = loss + z
                    z_sum += float(z.detach())
                # DDP and FSDP average gradients over ranks, but the loss is already normalised globally.
                (loss * world).backward()
            loss_sum += float(loss.detach())
        total, z_total = all_sum([loss_sum, z_sum], world, dev)
        return total, z_total

    def _not_finite(self, what: str, value: float) -> RuntimeError:
        kept = find_checkpoint(self.args.out_dir)
        return RuntimeError(
            f"train: the {what} at step {self.step + 1} is {value} (not finite); stopped before updating the "
            "weights. "
            + (f"The last good checkpoint is {kept}." if kept else "No checkpoint was saved yet.")
            + " Try a lower lr, a longer warmup or dtype float32."
        )

    def log(self, record: dict[str, Any]) -> None:
        if self.main:
            append_log(self.log_path, record)

    def run_eval(self) -> dict[str, Any]:
        """The held-out loss, logged; {} without held-out rows."""
        if not self.td.eval_rows:
            return {}
        model = self.wrapped if self.args.fsdp else self.model
        loss, count = evaluate(model, self.td.eval_rows, self.rank, self.world, self.dev, self.autocast)
        record = {
            "step": self.step,
            "eval_loss": loss,
            "eval_ppl": math.exp(min(loss, 700.0)),
            "eval_tokens": count,
        }
        self.log(record)
        self.bar.note(f"step {self.step}: eval loss {loss:.4f} | ppl {record['eval_ppl']:.2f}")
        return record

    def save(self, name: str, with_state: bool = True) -> None:
        """out_dir/name, written atomically: every rank gathers the weights (FSDP), rank 0 writes."""
        a = self.args
        model_state, optim_state = full_state_dicts(
            self.wrapped if a.fsdp else self.model, self.optimizer, a.fsdp
        )
        if not self.main:
            return
        trainer_state = {
            **self.layout,
            "row_order": self.order.version,
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "max_steps": self.max_steps,
            "schedule": self.schedule,
            "optimizer": optim_state,
            "rng": rng_states(self.dev),
        }

        def write(folder: str) -> None:
            save_model(folder, self.cfg, model_state)
            self.tok.save_pretrained(folder)
            if with_state:
                write_trainer_state(trainer_state, folder)

        save_folder_atomically(a.out_dir, name, write)

    def save_end(self, start_step: int) -> None:
        """The final model, then checkpoint-last, when this call trained (or no final exists yet)."""
        out_dir = self.args.out_dir
        # final first: a checkpoint-last at max_steps then implies a final of the same step. Rank 0 decides
        # (the other ranks may not see its files) and all ranks follow: saving is collective under FSDP.
        final_missing = self.main and not os.path.isdir(os.path.join(out_dir, FINAL_NAME))
        if self.step > start_step or all_sum([float(final_missing)], self.world, self.dev)[0] > 0:
            self.save(FINAL_NAME, with_state=False)
            self.save(CHECKPOINT_NAME)
        self.bar.note(f"train: step {self.step}, saved {os.path.join(out_dir, FINAL_NAME)}")
        if self.world > 1:
            dist.barrier()  # every rank returns once the files are written
