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
    if name == "cuda" or (isinstance(name, str) and name.startswith("cuda:") and name[5:].isdigit()):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name} was asked for but no CUDA device is available (use --device cpu)")
        n = torch.cuda.device_count()
        if name != "cuda" and int(name[5:]) >= n:
            raise ValueError(f"--device {name}: this machine has {n} CUDA device(s), cuda:0 .. cuda:{n - 1}")
        return torch.device("cuda", local_rank % n if name == "cuda" else int(name[5:]))
    if name == "cpu":
        return torch.device("cpu")
    raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")


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
        try:
            dist.barrier()  # no rank tears the group down while another still talks to it
        finally:
            dist.destroy_process_group()


def _comm(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    # NCCL only moves CUDA tensors; gloo takes CPU tensors
    return t.to(info.device) if info.device.type == "cuda" else t


def all_reduce(t: torch.Tensor, info: DistInfo, op: str = "sum") -> torch.Tensor:
    """``op`` ("sum" or "max") of ``t`` over ranks, returned on ``t``'s device (``t`` itself for a
    world of one).  Use the return value: under NCCL the reduction runs on a CUDA copy of a CPU ``t``."""
    if not info.enabled:
        return t
    c = _comm(t, info)
    dist.all_reduce(c, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
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


def cp_dp_mesh(info: DistInfo, cp_size: int):
    """The 2-D DeviceMesh of context parallelism x data parallelism, dims ("cp", "dp"): rank
    d * cp_size + c sits at [c, d], so the "cp" groups are ``cp_size`` consecutive ranks (those
    ``context_parallel.make_groups`` makes: under torchrun the GPUs of one machine) and the "dp"
    groups the ranks with the same position c in their group.  Given to ``wrap(..., mesh=)`` it makes
    FSDP2 hybrid: parameters sharded over "dp", replicated over "cp".  Every rank must call it."""
    from torch.distributed.device_mesh import DeviceMesh
    if not isinstance(cp_size, int) or cp_size < 1 or info.world % cp_size:
        raise ValueError(f"the context-parallel size must be an int >= 1 dividing the number of processes "
                         f"{info.world}, got {cp_size!r}")
    layout = torch.arange(info.world).view(info.world // cp_size, cp_size).t().contiguous()
    return DeviceMesh(info.device.type, layout, mesh_dim_names=("cp", "dp"))


def wrap(model: nn.Module, info: DistInfo, fsdp: bool = False, mesh=None) -> nn.Module:
    """DistributedDataParallel (or FSDP2 ``fully_shard`` per block, then the root) for a world > 1.

    ``mesh`` (FSDP2 only): a 2-D DeviceMesh (replicate, shard), e.g. ``cp_dp_mesh``: hybrid
    sharding, each parameter sharded over the second dim and replicated over the first; the
    gradients are averaged over every rank either way (reduce-scatter over the shard dim, then an
    all-reduce over the replicate dim), as DDP does."""
    if not info.enabled:
        return model
    if mesh is not None and not fsdp:
        raise ValueError("wrap: a device mesh is for FSDP2 (fsdp=True); DDP runs over the default group")
    if fsdp:
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # torch < 2.6
            from torch.distributed._composable.fsdp import fully_shard
        # Left replicated (sync_replicated_grads averages their gradients by hand): 0-dim parameters
        # (gate and eta logits), which FSDP2 cannot shard, and the shared Kbase kernel, which the K2
        # mixers hold by reference (FSDP2 swaps the parameter objects it manages, so the mixers
        # would keep using the stale original).
        replicated = [p for n, p in model.named_parameters() if p.dim() == 0 or n.endswith("shared_kernel")]
        scalars = set(replicated)
        for module in list(model.modules()):
            if isinstance(module, nn.ModuleList):
                for block in module:
                    fully_shard(block, mesh=mesh, ignored_params=scalars)
        fully_shard(model, mesh=mesh, ignored_params=scalars)
        model._kop_replicated = replicated  # in named_parameters order: the same on every rank
        return model
    ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def reshard(model: nn.Module) -> None:
    """Return FSDP2 modules to their sharded parameters (a forward without backward, e.g. an
    evaluation, leaves the root unsharded); no-op for other models."""
    for m in model.modules():
        if hasattr(m, "reshard") and hasattr(m, "unshard"):
            m.reshard()


def sync_replicated_grads(model: nn.Module, info: DistInfo) -> None:
    """Average the gradients of the parameters FSDP2 left replicated (no-op otherwise)."""
    params = getattr(model, "_kop_replicated", None)
    if not info.enabled or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = _comm(torch.cat([g.reshape(-1).float() for g in grads]), info)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat = flat.to(params[0].device) / info.world
    for p, v in zip(params, flat.split([p.numel() for p in params])):
        p.grad = v.to(p.dtype).reshape(p.shape)


def _copies(dt) -> int:
    """How many ranks hold the same local shard of a DTensor: the product of its Replicate mesh dims."""
    n = 1
    for i, pl in enumerate(dt.placements):
        if pl.is_replicate():
            n *= dt.device_mesh.size(i)
    return n


def clip_grad_norm(params, max_norm: float, info: DistInfo) -> float:
    """Clip the global gradient norm to ``max_norm`` and return the norm before clipping.

    Plain and DDP parameters go through torch's ``clip_grad_norm_``. With FSDP2 the squared norms
    of the gradient shards are summed over ranks, and those of the replicated (0-dim) parameters
    added once (torch's routine would mix the two kinds of tensor)."""
    params = [p for p in params if p.grad is not None]
    sharded = [p.grad for p in params if hasattr(p.grad, "to_local")]
    if not sharded:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    plain = [p.grad for p in params if not hasattr(p.grad, "to_local")]
    # a hybrid (replicate, shard) mesh holds each shard on every rank of the replicate dim: count it once
    local = torch.stack([g.to_local().detach().double().pow(2).sum() / _copies(g) for g in sharded]).sum().reshape(1)
    total_sq = all_reduce(local.cpu(), info)
    if plain:
        total_sq = total_sq + torch.stack([g.detach().double().pow(2).sum().cpu() for g in plain]).sum()
    total = float(total_sq.sqrt())
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for p in params:
            p.grad.mul_(coef)
    return total


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP / torch.compile wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
