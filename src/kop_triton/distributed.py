"""Process-group plumbing for ``torchrun`` training: DDP by default, FSDP2 behind a flag.

A plain ``python -m kop_triton.train`` run is a world of one and every helper here is a no-op.
Under ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set) the process group is initialised
with NCCL on CUDA and gloo on CPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but no CUDA device is available")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if name == "cpu":
        return torch.device("cpu")
    raise ValueError(f"--device must be auto, cpu or cuda, got {name!r}")


def init(device: str = "auto") -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment (if any)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank=rank, world=world, local_rank=local_rank, device=dev)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _comm(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    # NCCL only moves CUDA tensors; gloo takes CPU tensors
    return t.to(info.device) if info.device.type == "cuda" else t


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum of ``t`` over ranks, on ``t``'s device; ``t`` itself for a world of one."""
    if not info.enabled:
        return t
    c = _comm(t, info)
    dist.all_reduce(c, op=dist.ReduceOp.SUM)
    return c.to(t.device)


def all_reduce_max(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if not info.enabled:
        return t
    c = _comm(t, info)
    dist.all_reduce(c, op=dist.ReduceOp.MAX)
    return c.to(t.device)


def all_gather_bytes(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Stack the equally-shaped tensors ``t`` of every rank: (world, *t.shape), on ``t``'s device."""
    if not info.enabled:
        return t.unsqueeze(0)
    c = _comm(t, info)
    out = [torch.empty_like(c) for _ in range(info.world)]
    dist.all_gather(out, c)
    return torch.stack(out).to(t.device)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def wrap(model: nn.Module, info: DistInfo, fsdp: bool = False) -> nn.Module:
    """DistributedDataParallel (or FSDP2 ``fully_shard`` per block, then the root) for a world > 1."""
    if not info.enabled:
        return model
    if fsdp:
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # torch < 2.6
            from torch.distributed._composable.fsdp import fully_shard
        for module in list(model.modules()):
            if isinstance(module, nn.ModuleList):
                for block in module:
                    fully_shard(block)
        fully_shard(model)
        return model
    ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP / torch.compile wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
