"""torch.distributed for the trainer: the process group, sums over ranks, DDP / FSDP2 wrapping, and the
full (unsharded) state dicts that checkpoints hold."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn


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


def all_sum(values: list[float], world: int, device: torch.device) -> list[float]:
    """Sum floats across ranks (fp64, so counts stay exact)."""
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer, fsdp: bool) -> tuple[dict, dict]:
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


def wrap_model(model: nn.Module, world: int, dev: torch.device, fsdp: bool) -> nn.Module:
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


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, fsdp: bool) -> None:
    """Load a full (unsharded) optimizer state dict, sharding it under FSDP2 as the model is."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)
