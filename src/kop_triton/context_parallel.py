"""Context parallelism: one sequence split contiguously over the ranks of a process group.

Every K2 mixer of a sequence sharded over W ranks (rank r holds tokens [a_r, b_r), any lengths
>= 1) needs the state its predecessors leave behind: the scan state S (R, D) and the conv's last
K - 1 inputs (SPEC section 6).  Per mixer call:

1. each rank computes its shard's own summary from a zero state, differentiably:
   S_loc = sum_t gamma^(L-1-t) k_t (outer) x_t over the shard (from its last document start when
   ``cu_seqlens`` packs documents), and its last min(L, K-1) inputs;
2. one all-gather of the (S_loc, tail) payloads, (W, B*(R+K-1)*D) floats;
3. each rank composes its incoming state locally, in fixed rank order 0, 1, ..., r-1:
   S <- A_j * S + S_loc_j with A_j = gamma^(L_j) (0 when a document starts inside shard j), and
   the conv state from the tails of the nearest predecessors (several when shards are shorter than
   K - 1), zero before the start of the document the shard begins in;
   (``exchange="pipeline"`` replaces 2-3 by a send/recv chain: rank r receives the composed state
   from r - 1 and sends A_r * S_in + S_loc_r and the conv's last K - 1 inputs on to r + 1; the same
   composition in the same order, W - 1 hops, n bytes per rank instead of (W - 1) n)
4. the ordinary mixer (``k2_mixer``, any backend: "chunked" on CPU, "triton" on CUDA) runs on the
   shard from that initial state.

The backward of step 2 is the only cross-rank step of the backward: an all-to-all of the gradients
of the gathered payloads, each rank summing what it receives in fixed rank order (a deterministic
reduce-scatter; the pipeline's is the reverse chain); everything else is local autograd (including
the gradient of gamma through the decay products A_j).  A rank's output and its gradients are those
of the whole sequence to float rounding; the gradients of the parameters are each rank's share of
the total (sum them over the group: ``all_reduce_gradients``).

Messages are O(W * B * (R + K - 1) * D) floats per mixer call and rank, independent of T;
``benchmarks/cp_model.py`` models the cost against the compute and compares a pipelined send/recv.

Use::

    cp = ContextParallel(group, sizes=shard_sizes(T, W))   # group None: the default (WORLD) group
    with context_parallel(model, cp):                # every KOperator of the model exchanges states
        loss = cp.scale_loss(model(cp.shard(ids), cp.shard(targets)))   # local mean * L_r / T
    loss.backward(); all_reduce_gradients(model, cp)

Training (``kop-train --context-parallel W`` under torchrun): ``make_groups`` splits the world into
CP groups of W consecutive ranks, ``ContextParallelLM`` wraps the model (the rank's loss term scaled
for DDP's average over every rank, CP x DP), ``GroupBatches`` gives every rank of a group its rows.
With ``--fsdp`` the model is sharded by FSDP2 on the 2-D mesh ``distributed.cp_dp_mesh`` (sharded over
the data-parallel axis, replicated within a CP group; the gradients averaged over every rank as with
DDP).  ``ContextParallelEval`` scores validation windows the same way (the loss shares summed over the
group).

Also exact under CP: per-channel (D, K) kernels (the conv state is the last K - 1 inputs either way);
an ``initial_state`` entering the sequence, given on rank 0 (it enters rank 0's summary, which every
later rank composes from); ROSA models (ROSA's ids are a function of the token prefix: the wrappers
compute them on the full rows, ``context_parallel(model, cp)`` makes the model all-gather the shard's
ids, ``ContextParallel.rosa_ids``; the ROSA embedding is per position, so each rank keeps its part).

Under ``torch.compile`` the exchanging mixer call is left out of the graph (``torch.compiler.disable``,
one graph break per mixer); the local op inside it is the ordinary one.
"""
from __future__ import annotations

import contextlib
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .ops._checks import describe, state_dtype
from .ops.k2 import NORM_EPS, k2_mixer


def shard_sizes(T: int, world: int) -> List[int]:
    """Contiguous, as even as possible: the first T % world shards one token longer."""
    if not (isinstance(T, int) and isinstance(world, int) and world >= 1 and T >= world):
        raise ValueError(f"need T >= world >= 1 to give every rank a token, got T={T!r}, world={world!r}")
    q, m = divmod(T, world)
    return [q + (1 if i < m else 0) for i in range(world)]


def shard_bounds(sizes: Sequence[int]) -> List[tuple]:
    out, a = [], 0
    for n in sizes:
        out.append((a, a + n))
        a += n
    return out


# newer torch names it all_gather_single and deprecates all_gather_into_tensor (torch 2.13 warns)
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class _GatherStates(torch.autograd.Function):
    """(n,) on every rank -> (W, n), rank order.  Backward: all-to-all of the (W, n) gradients and a
    fixed-order sum of the W received rows (a deterministic reduce-scatter)."""

    @staticmethod
    def forward(ctx, t, group):
        W = dist.get_world_size(group)
        out = t.new_empty(W * t.numel())                # flat: gloo's gather-into-one-tensor takes (W*n,)
        _all_gather_single(out, t.contiguous().reshape(-1), group=group)
        ctx.group = group
        return out.view(W, t.numel())

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        g = g.contiguous()
        recv = torch.empty_like(g)
        dist.all_to_all_single(recv, g, group=ctx.group)
        total = recv[0].clone()
        for i in range(1, recv.shape[0]):          # fixed order: rank 0, 1, ..., W-1
            total += recv[i]
        return total, None


def _global_rank(group, r: int) -> int:
    return r if group is None else dist.get_global_rank(group, r)


class _ChainStates(torch.autograd.Function):
    """The pipelined exchange: rank r receives the composed state entering its shard from rank r-1,
    sends the state leaving it, A_r * S_in + S_loc (and the conv's last K-1 inputs), to rank r+1, and
    returns the incoming state (zero where its first token starts a document).  The backward runs the
    chain in reverse: dS_out from rank r+1, dS_in = A_r * dS_out + (the local op's dS_in) to rank r-1.

    Inputs: S_loc (B, R, D), A (R,) (gamma^L, or 0 when a document starts inside the shard), tail
    (B, K-1, D) (the last m inputs at its end); ``keep`` (K-1,) masks the outgoing conv rows that lie
    before the document of the shard's last token; S0 (B, R, D), C0 (B, K-1, D): rank 0's incoming
    state (the sequence's initial state; zeros without one), None on the other ranks."""

    @staticmethod
    def forward(ctx, S_loc, A, tail, S0, C0, group, rank, world, m, cont, keep):
        K1, n_s = tail.shape[1], S_loc.numel()
        if rank > 0:
            buf = S_loc.new_empty(n_s + tail.numel())
            dist.recv(buf, src=_global_rank(group, rank - 1), group=group)
            S_in, C_in = buf[:n_s].view_as(S_loc), buf[n_s:].view_as(tail)
        else:
            S_in, C_in = S0, C0
        if rank < world - 1:
            S_out = A[:, None] * S_in + S_loc
            C_out = torch.cat([C_in[:, m:], tail[:, K1 - m:]], 1) * keep[None, :, None]
            dist.send(torch.cat([S_out.reshape(-1), C_out.reshape(-1)]), dst=_global_rank(group, rank + 1),
                      group=group)
        ctx.save_for_backward(S_in, A, keep)
        ctx.meta = (group, rank, world, m, cont)
        return S_in * cont, C_in * cont

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dS_use, dC_use):
        S_in, A, keep = ctx.saved_tensors
        group, rank, world, m, cont = ctx.meta
        K1, n_s = dC_use.shape[1], S_in.numel()
        if rank < world - 1:
            buf = S_in.new_empty(n_s + dC_use.numel())
            dist.recv(buf, src=_global_rank(group, rank + 1), group=group)
            gS, gC = buf[:n_s].view_as(S_in), buf[n_s:].view_as(dC_use) * keep[None, :, None]
        else:
            gS, gC = torch.zeros_like(S_in), torch.zeros_like(dC_use)
        dA = (gS * S_in).sum((0, 2))
        dtail = torch.cat([torch.zeros_like(gC[:, :K1 - m]), gC[:, K1 - m:]], 1)
        dS_in = A[:, None] * gS + cont * dS_use
        dC_in = torch.cat([torch.zeros_like(gC[:, :m]), gC[:, :K1 - m]], 1) + cont * dC_use
        if rank > 0:
            dist.send(torch.cat([dS_in.reshape(-1), dC_in.reshape(-1)]), dst=_global_rank(group, rank - 1),
                      group=group)
            dS_in = dC_in = None
        return gS, dA, dtail, dS_in, dC_in, None, None, None, None, None, None


EXCHANGES = ("allgather", "pipeline")


class ContextParallel:
    """A process group over which sequences are split contiguously (rank order = sequence order).

    Args:
        group: a ``torch.distributed`` process group (None: the default group).
        sizes: the shard lengths of every rank for the calls to come (None: all-gathered at every
            call, one small extra collective).  ``set_sizes`` changes them.
        exchange: "allgather" (one all-gather of every rank's summary, local composition; backward an
            all-to-all) or "pipeline" (a send/recv chain rank 0 -> 1 -> ... carrying the composed
            state; backward the reverse chain).  Same results; ``benchmarks/cp_model.py`` compares them.
    """

    def __init__(self, group=None, sizes: Optional[Sequence[int]] = None, exchange: str = "allgather"):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ContextParallel needs an initialised torch.distributed process group "
                               "(torchrun, or dist.init_process_group); none is initialised")
        if exchange not in EXCHANGES:
            raise ValueError(f"exchange must be one of {list(EXCHANGES)}, got {exchange!r}")
        self.exchange = exchange
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.sizes = None
        if sizes is not None:
            self.set_sizes(sizes)

    def set_sizes(self, sizes: Optional[Sequence[int]]) -> None:
        if sizes is not None:
            sizes = list(sizes)
            if len(sizes) != self.world or any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in sizes):
                raise ValueError(f"sizes must list {self.world} shard lengths >= 1 (one per rank of the group), "
                                 f"got {sizes!r}")
        self.sizes = sizes

    def _sizes_for(self, L: int, device) -> List[int]:
        if self.sizes is not None:
            if self.sizes[self.rank] != L:
                raise ValueError(f"this rank ({self.rank}) holds {L} tokens but the ContextParallel sizes say "
                                 f"{self.sizes[self.rank]} (sizes {self.sizes}); pass the local shard or fix sizes")
            return self.sizes
        if self.world == 1:
            return [L]
        t = torch.tensor([L], dtype=torch.int64, device=device)
        out = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(out, t, group=self.group)
        return [int(v) for v in torch.cat(out).tolist()]

    @property
    def total(self) -> int:
        if self.sizes is None:
            raise ValueError("ContextParallel.total needs the shard sizes (set_sizes)")
        return sum(self.sizes)

    def shard(self, t: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's contiguous piece of a full-length tensor (even split when no sizes are set)."""
        sizes = self.sizes if self.sizes is not None else shard_sizes(t.shape[dim], self.world)
        if sum(sizes) != t.shape[dim]:
            raise ValueError(f"the shard sizes {sizes} sum to {sum(sizes)} but the tensor has {t.shape[dim]} "
                             f"positions along dim {dim}")
        a, b = shard_bounds(sizes)[self.rank]
        return t.narrow(dim, a, b - a)

    def scale_loss(self, local_mean: torch.Tensor) -> torch.Tensor:
        """local mean loss -> its share of the whole sequence's mean (local mean * L_r / T): the
        shares sum to the whole-sequence mean, their gradients to its gradient."""
        sizes = self.sizes
        if sizes is None:
            raise ValueError("scale_loss needs the shard sizes (ContextParallel(sizes=...) or set_sizes)")
        return local_mean * (sizes[self.rank] / sum(sizes))

    def gather(self, t: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """The full-length tensor from every rank's shard ``t`` along ``dim`` (no gradient): one
        all-gather of the shards padded to the longest."""
        L = int(t.shape[dim])
        sizes = self._sizes_for(L, t.device)
        if self.world == 1:
            return t
        pad = max(sizes) - L
        t = t.contiguous() if pad == 0 else torch.cat([t, t.new_zeros(*t.shape[:dim], pad, *t.shape[dim + 1:])], dim)
        out = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(out, t, group=self.group)
        return torch.cat([o.narrow(dim, 0, n) for o, n in zip(out, sizes)], dim)

    def rosa_ids(self, model: nn.Module, ids: torch.Tensor, cu_seqlens=None) -> torch.Tensor:
        """ROSA ids of this rank's shard of ``ids`` (B, L_r): the token ids of the whole rows are
        all-gathered (a few bytes a token), the model's ROSA is computed on them (per packed document
        with ``cu_seqlens`` of the whole sequence) and this rank's positions are kept."""
        full = self.gather(ids, 1)
        if cu_seqlens is None:
            rosa = model.compute_rosa(full)
        else:
            cu = [int(c) for c in cu_seqlens.tolist()]
            rosa = torch.cat([model.compute_rosa(full[:, a:b]) for a, b in zip(cu[:-1], cu[1:])], 1)
        a, b = shard_bounds(self._sizes_for(int(ids.shape[1]), ids.device))[self.rank]
        return rosa[:, a:b]

    # the hook KOperator calls instead of k2_mixer (same signature)
    def k2_mixer(self, x, u, v, alpha, gamma, kernel, gate_logit, *, initial_state=None,
                 output_final_state=False, cu_seqlens=None, backend="auto"):
        return cp_k2_mixer(x, u, v, alpha, gamma, kernel, gate_logit, cp=self, initial_state=initial_state,
                           output_final_state=output_final_state, cu_seqlens=cu_seqlens, backend=backend)


def _local_summary(x, v, gamma, K, s_last, dt, C0=None):
    """(S_loc (B, R, D), tail (B, K-1, D)) of a shard from a zero state: the scan state after its last
    token counted from local position ``s_last`` (its last document start, or 0), and its last
    min(L, K-1) inputs, zero-padded in front (preceded by the conv state ``C0`` where given)."""
    B, L, D = x.shape
    k = F.normalize(x @ v.to(x.dtype), dim=-1, eps=NORM_EPS).to(dt)            # (B, L, R), as k2_qk
    e = torch.arange(L - 1, -1, -1, device=x.device, dtype=dt)                  # L-1-t >= 0
    wts = torch.pow(gamma.to(dt)[None, :], e[:, None])                          # (L, R)
    if s_last > 0:
        wts = wts * (torch.arange(L, device=x.device) >= s_last).to(dt)[:, None]
    S = torch.einsum("btr,btd->brd", k * wts, x.to(dt))                         # (B, R, D)
    m = min(L, K - 1)
    tail = x.new_zeros(B, K - 1, D, dtype=dt) if C0 is None else C0
    if m > 0:
        tail = torch.cat([tail[:, m:], x[:, L - m:].to(dt)], 1)        # the last K-1 rows of [C0; x]
    return S, tail


def _docs(cu_seqlens, bounds):
    """Per shard: (resets, s_last, continues, local cu_seqlens list, doc start of its first token)."""
    starts = [int(p) for p in cu_seqlens.detach().cpu().tolist()[:-1]]
    out = []
    for a, b in bounds:
        inside = [p for p in starts if a <= p < b]
        first_doc = max(p for p in starts if p <= a)
        local = [0] + [p - a for p in inside if p > a] + [b - a]
        out.append(dict(resets=bool(inside), s_last=(max(inside) - a) if inside else 0,
                        continues=a not in inside, local_cu=local, first_doc=first_doc))
    return out


def _initial_state(initial_state, rank, B, R, K, D, cu_seqlens, dt):
    """Rank 0's (S0 (B, R, D) or None, C0 (B, K-1, D) or None) in the state dtype; refusals elsewhere."""
    if rank != 0:
        raise ValueError(f"initial_state is the state entering the whole sequence and is read on rank 0 only, but "
                         f"rank {rank} got one: pass None on the ranks > 0 (to continue a sequence, give the last "
                         f"rank's final state to rank 0)")
    if cu_seqlens is not None:
        raise ValueError("initial_state with cu_seqlens (one state per packed document) is not supported under "
                         "context parallelism; pack the documents without initial states, or run without cu_seqlens")
    if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 2:
        raise ValueError(f"initial_state must be a (scan_state, conv_state) pair, got {describe(initial_state)}")
    out = []
    for name, t, shape in (("scan", initial_state[0], (B, R, D)), ("conv", initial_state[1], (B, K - 1, D))):
        if t is not None and (not isinstance(t, torch.Tensor) or tuple(t.shape) != shape):
            raise ValueError(f"initial_state's {name} state must have shape {shape}, got {describe(t)}")
        out.append(None if t is None else t.to(dt))
    return out


@torch.compiler.disable
def cp_k2_mixer(x, u, v, alpha, gamma, kernel, gate_logit, *, cp: ContextParallel, initial_state=None,
                output_final_state=False, cu_seqlens=None, backend="auto"):
    """``k2_mixer`` of this rank's shard x (B, L_r, D) of a sequence split over ``cp``'s group.

    ``cu_seqlens``: optional offsets (N+1,) of packed documents in the WHOLE sequence (the same on
    every rank; B = 1); documents may cross shard boundaries.  Returns (y (B, L_r, D), final state):
    the final state is the local op's, i.e. the state after this rank's last token (per local document
    with ``cu_seqlens``); the last rank's is the sequence's.  ``initial_state``: the (scan, conv) state
    entering the WHOLE sequence (either entry may be None), given on rank 0 only (None on the others;
    to continue a sequence pass the last rank's final state to rank 0); its gradient arrives on rank 0.
    ``kernel``: shared (K,) or per-channel (D, K).  A world of one is ``k2_mixer`` itself."""
    if not isinstance(cp, ContextParallel):
        raise TypeError(f"cp must be a ContextParallel, got {describe(cp)}")
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"x must be this rank's shard of shape (B, L, D), got {describe(x)}")
    B, L, D = x.shape
    if L < 1:
        raise ValueError(f"every rank needs a shard of at least one token, rank {cp.rank} got x {describe(x)}")
    sizes = cp._sizes_for(L, x.device)
    if cp.world == 1:
        return k2_mixer(x, u, v, alpha, gamma, kernel, gate_logit, initial_state=initial_state,
                        output_final_state=output_final_state, cu_seqlens=cu_seqlens, backend=backend)
    bounds = shard_bounds(sizes)
    T = bounds[-1][1]
    r, W = cp.rank, cp.world
    if not isinstance(kernel, torch.Tensor) or kernel.dim() not in (1, 2):
        raise ValueError(f"kernel must be a shared (K,) or per-channel (D, K) tensor, got {describe(kernel)}")
    R, K = u.shape[1], kernel.shape[-1]
    dt = state_dtype(x)
    S0 = C0 = None
    if initial_state is not None:
        S0, C0 = _initial_state(initial_state, r, B, R, K, D, cu_seqlens, dt)
    if cu_seqlens is not None:
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or B != 1:
            raise ValueError(f"cu_seqlens must be the (N+1,) offsets of the whole packed sequence with B = 1, got "
                             f"{describe(cu_seqlens)} with x {describe(x)}")
        c = cu_seqlens.detach().cpu().tolist()
        if c[0] != 0 or c[-1] != T or any(b2 <= a2 for a2, b2 in zip(c[:-1], c[1:])):
            raise ValueError(f"cu_seqlens must rise strictly from 0 to the whole sequence's length T={T} (the sum of "
                             f"the shard sizes {sizes}), got {c if len(c) <= 16 else c[:16]}")
        docs = _docs(cu_seqlens, bounds)
    else:   # one document; positions before 0 are those of rank 0's initial conv state (zeros without one)
        docs = [dict(resets=(j == 0), s_last=0, continues=(j > 0), local_cu=None, first_doc=-K) for j in range(W)]
    me = docs[r]

    S_loc, tail = _local_summary(x, v, gamma, K, me["s_last"], dt, C0)
    if cp.exchange == "pipeline":
        resets = me["resets"] and S0 is None        # rank 0 continues from an initial state
        A = torch.pow(gamma.to(dt), float(L)) * (0.0 if resets else 1.0)
        last_doc = me["first_doc"] if me["local_cu"] is None or not me["resets"] else me["s_last"] + bounds[r][0]
        pos = range(bounds[r][1] - (K - 1), bounds[r][1])
        keep = torch.tensor([p >= last_doc for p in pos], dtype=dt, device=x.device)
        if r == 0:
            S0 = torch.zeros_like(S_loc) if S0 is None else S0
            C0 = torch.zeros_like(tail) if C0 is None else C0
        cont = 1.0 if me["continues"] or initial_state is not None else 0.0
        S_in, C_in = _ChainStates.apply(S_loc, A, tail, S0, C0, cp.group, r, W, min(L, K - 1), cont, keep)
        return _run_local(x, u, v, alpha, gamma, kernel, gate_logit, S_in, C_in, me, cu_seqlens,
                          output_final_state, backend)

    # 1-2. own summary (rank 0's: the state leaving its shard from the initial state), one all-gather
    if S0 is not None:
        S_loc = torch.pow(gamma.to(dt), float(L))[:, None] * S0 + S_loc
    n_s = S_loc.numel()
    gathered = _GatherStates.apply(torch.cat([S_loc.reshape(-1), tail.reshape(-1)]), cp.group)   # (W, n)
    anchor = gathered[:, :0].sum()       # 0 with a graph edge: every rank runs the gather's backward
    S_all = gathered[:, :n_s].view(W, B, R, D)
    T_all = gathered[:, n_s:].view(W, B, K - 1, D)

    # 3. compose the incoming state in fixed rank order
    g = gamma.to(dt)
    S_in = torch.zeros(B, R, D, dtype=dt, device=x.device) + anchor
    C_in = torch.zeros(B, K - 1, D, dtype=dt, device=x.device) + anchor
    if r == 0 and initial_state is not None:
        S_in = S_in if S0 is None else S0 + anchor
        C_in = C_in if C0 is None else C0 + anchor
    if me["continues"]:
        first = max([j for j in range(r) if docs[j]["resets"]], default=0)
        for j in range(first, r):
            A = torch.pow(g, float(sizes[j])) if j > first or not docs[j]["resets"] else None
            S_in = S_all[j] if A is None else A[:, None] * S_in + S_all[j]
        if K > 1:
            rows, pos, j = [], [], r - 1
            while j >= 0 and len(pos) < K - 1:
                m = K - 1 if j == 0 else min(sizes[j], K - 1)     # rank 0's tail: its initial conv state in front
                rows.insert(0, T_all[j][:, K - 1 - m:])
                pos[:0] = range(bounds[j][1] - m, bounds[j][1])
                j -= 1
            prev = torch.cat(rows, 1)[:, -(K - 1):]
            pos = pos[-(K - 1):]
            keep = torch.tensor([p >= me["first_doc"] for p in pos], dtype=dt, device=x.device)
            C_in = C_in[:, :K - 1 - len(pos)]
            C_in = torch.cat([C_in, prev * keep[None, :, None] + anchor], 1)

    return _run_local(x, u, v, alpha, gamma, kernel, gate_logit, S_in, C_in, me, cu_seqlens,
                      output_final_state, backend)


def _run_local(x, u, v, alpha, gamma, kernel, gate_logit, S_in, C_in, me, cu_seqlens, output_final_state, backend):
    """4. the ordinary op on the shard from its incoming state (one row per local document)."""
    R, D, K = S_in.shape[1], S_in.shape[2], C_in.shape[1] + 1
    local_cu = None
    if me["local_cu"] is not None:
        local_cu = torch.tensor(me["local_cu"], dtype=cu_seqlens.dtype, device=x.device)
        n_loc = len(me["local_cu"]) - 1
        if n_loc > 1:
            S_in = torch.cat([S_in, S_in.new_zeros(n_loc - 1, R, D)])
            C_in = torch.cat([C_in, C_in.new_zeros(n_loc - 1, K - 1, D)])
    return k2_mixer(x, u, v, alpha, gamma, kernel, gate_logit, initial_state=(S_in, C_in),
                    output_final_state=output_final_state, cu_seqlens=local_cu, backend=backend)


# --------------------------------------------------------------------------------------
# modules and models
# --------------------------------------------------------------------------------------


def _koperators(model: nn.Module):
    from .modules import KOperator
    return [m for m in model.modules() if isinstance(m, KOperator)]


def enable(model: nn.Module, cp: Optional[ContextParallel]) -> nn.Module:
    """Make every KOperator of ``model`` exchange states over ``cp`` (None: switch back off)."""
    if cp is not None and not isinstance(cp, ContextParallel):
        raise TypeError(f"cp must be a ContextParallel or None, got {describe(cp)}")
    cfg = getattr(model, "config", None)
    mixers = _koperators(model)
    if cp is not None and not mixers:
        raise ValueError(f"{type(model).__name__} has no KOperator to make context-parallel")
    for m in mixers:
        m.context_parallel = cp
    if getattr(cfg, "rosa", "off") != "off":
        model._context_parallel = cp     # KStackLM.hidden: ROSA ids from the gathered token prefix (rosa_ids)
    return model


@contextlib.contextmanager
def context_parallel(model: nn.Module, cp: ContextParallel):
    """``with context_parallel(model, cp):`` every KOperator of ``model`` is context-parallel inside."""
    enable(model, cp)
    try:
        yield model
    finally:
        enable(model, None)


def all_reduce_gradients(model: nn.Module, cp: ContextParallel, params=None) -> None:
    """Sum the parameter gradients over ``cp``'s group (each rank holds its shard's share), in one
    flat all-reduce.  Parameters without a gradient count as zero on every rank."""
    params = [p for p in (model.parameters() if params is None else params) if p.requires_grad]
    if cp.world == 1 or not params:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params])
    dist.all_reduce(flat, group=cp.group)
    for p, val in zip(params, flat.split([p.numel() for p in params])):
        p.grad = val.to(p.dtype).view_as(p).clone()


# --------------------------------------------------------------------------------------
# training: kop-train --context-parallel W
# --------------------------------------------------------------------------------------


class ContextParallelLM(nn.Module):
    """Training wrapper of a KStackLM under context parallelism: ``forward(ids, targets)`` takes the
    full rows (B, T) (the same on every rank of the CP group), runs this rank's contiguous shard with
    the state exchange, and returns the rank's loss term for AVERAGING over the ranks, as DDP does:
    local mean * L_r * W / T (with equal shards, the local mean).  Averaged over the W ranks of the
    group these give the whole rows' mean loss, and their gradients its gradient, so DDP over all the
    ranks (CP x DP) yields the gradient of the global batch.  Without targets: this rank's logits."""

    def __init__(self, model: nn.Module, cp: ContextParallel):
        super().__init__()
        if not isinstance(cp, ContextParallel):
            raise TypeError(f"cp must be a ContextParallel, got {describe(cp)}")
        self.model = model
        self.cp = cp

    def share(self, ids, targets=None, rosa_ids=None):
        """This rank's logits, or its share of the rows' mean loss (local mean * L_r / T).  A ROSA model
        takes ``rosa_ids`` of the full rows (the sampler's) or computes them from the full rows here;
        each rank keeps its positions (ROSA's embedding is per position, so this is exact)."""
        cp = self.cp
        cp.set_sizes(shard_sizes(int(ids.shape[1]), cp.world))
        kw = {}
        if getattr(getattr(self.model, "config", None), "rosa", "off") != "off":
            kw["rosa_ids"] = cp.shard(self.model.compute_rosa(ids) if rosa_ids is None else rosa_ids)
        elif rosa_ids is not None:
            kw["rosa_ids"] = rosa_ids                     # the model refuses it with its own message
        with context_parallel(self.model, cp):
            if targets is None:
                return self.model(cp.shard(ids), **kw)
            return cp.scale_loss(self.model(cp.shard(ids), cp.shard(targets), **kw))

    def forward(self, ids, targets=None, rosa_ids=None):
        out = self.share(ids, targets, rosa_ids)
        return out if targets is None else out * self.cp.world


class ContextParallelEval(nn.Module):
    """Scoring wrapper for ``kop_triton.eval.evaluate`` under context parallelism: ``forward(ids,
    targets)`` takes the full rows (the same on every rank of the group) and returns the rows' mean
    loss on every rank of the group, float64: the ranks' shares (each from its shard, with the state
    exchange) summed over the group.  No gradient."""

    def __init__(self, model: nn.Module, cp: ContextParallel):
        super().__init__()
        self.lm = ContextParallelLM(model, cp)

    def forward(self, ids, targets):
        with torch.no_grad():
            share = self.lm.share(ids, targets).detach().double().reshape(1)
            if self.lm.cp.world > 1:
                dist.all_reduce(share, group=self.lm.cp.group)
        return share[0]


class GroupBatches:
    """A BatchSampler as the ranks of CP groups of ``cp_size`` consecutive ranks see it: every rank of
    a group gets the rows of its data-parallel rank (``rank // cp_size`` of ``world // cp_size``)."""

    def __init__(self, sampler, cp_size: int):
        self.sampler, self.cp_size = sampler, int(cp_size)

    def batch(self, step: int, rank: int = 0, world: int = 1):
        return self.sampler.batch(step, rank // self.cp_size, world // self.cp_size)

    def __getattr__(self, name):
        if name in ("sampler", "cp_size"):
            raise AttributeError(name)
        return getattr(self.sampler, name)


def make_groups(cp_size: int) -> ContextParallel:
    """Split the default group (world = DP x CP) into CP groups of ``cp_size`` consecutive ranks
    (under torchrun the GPUs of one machine, so a group talks over NVLink); every rank creates every
    group, in the same order.  -> this rank's ContextParallel."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if cp_size < 1 or world % cp_size:
        raise ValueError(f"the context-parallel size {cp_size} must divide the number of processes {world}")
    mine = None
    for d in range(world // cp_size):
        ranks = list(range(d * cp_size, (d + 1) * cp_size))
        g = dist.new_group(ranks)
        if rank in ranks:
            mine = g
    return ContextParallel(mine)
