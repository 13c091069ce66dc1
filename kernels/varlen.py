"""Where each program's tokens are: the one home of the sequence and chunk bookkeeping of every
kernel (plain batches and packed sequences, ``cu_seqlens``).

All sequences live in one flat (rows, D) buffer: row ``bos + t`` of sequence ``n``, with
``bos = cu[n]`` (``n * T`` for a plain batch).  Two ways to cut them into blocks:

* chunks of ``BT`` tokens, counted over the whole batch (the scan and K2 kernels; the chunk
  states live on this axis): without cu_seqlens chunk ``c`` of row ``b`` is global chunk
  ``b * ceil(T / BT) + c``; with cu_seqlens global chunk ``chunk_offsets[n] + c``, and
  ``chunk_indices`` (NC, 2) maps a global chunk back to (sequence, chunk within it);
* blocks of ``BT`` rows of each sequence extended by ``extra`` rows on the left (the conv
  kernels: the extension covers the initial-state rows), ``Layout.grid_t``.

The tables of both live in one host-side object, ``kop_triton.kernels.seqs.Varlen``, built once per
call from cu_seqlens (one host read: the ops' argument check makes it, the autograd Functions keep
it for the backward); this module holds the device side, the jit helpers that read them, and
``Layout``, the conv launchers' flat view of a batch.

Offsets are int64 on the device side: a batch may hold more than 2^31 elements.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .seqs import Varlen, as_varlen  # noqa: F401  (the host side: re-exported)


# --------------------------------------------------------------------------------------
# device side
# --------------------------------------------------------------------------------------


@triton.jit
def chunk_bounds(cu_seqlens, chunk_indices, i_t, i_b, T, NT, BT: tl.constexpr,
                 IS_VARLEN: tl.constexpr):
    """-> (n, bos, i_tc, i_s, L, t0) of chunk program (i_t, i_b): sequence, its first token, the
    chunk index inside the sequence, the global chunk index (row of chunk_states), the chunk
    length and the chunk's first row ``bos + i_tc * BT``, all int64 but L."""
    if IS_VARLEN:
        n = tl.load(chunk_indices + i_t * 2).to(tl.int64)
        i_tc = tl.load(chunk_indices + i_t * 2 + 1).to(tl.int64)
        bos = tl.load(cu_seqlens + n).to(tl.int64)
        eos = tl.load(cu_seqlens + n + 1).to(tl.int64)
        i_s = i_t.to(tl.int64)
    else:
        n = i_b.to(tl.int64)
        i_tc = i_t.to(tl.int64)
        bos = i_b.to(tl.int64) * T
        eos = bos + T
        i_s = i_b.to(tl.int64) * NT + i_tc
    L = tl.minimum(eos - bos - i_tc * BT, BT)
    return n, bos, i_tc, i_s, L, bos + i_tc * BT


@triton.jit
def chunk_program(c, NT, IS_VARLEN: tl.constexpr):
    """(i_t, i_b) of global chunk c, as the chunk grids (chunks, batch rows) number them:
    (c, 0) with packed sequences (one chunk axis), (c % NT, c // NT) for a plain batch; int32
    (c may be a loop counter, a plain int in the interpreter; as int64 the 16-bit R = 128 dx kernel
    spilled 52-72 B on sm_80, compile gate 2026-12-02).  NC < 2^31 chunks."""
    c = tl.cast(c, tl.int32)
    if IS_VARLEN:
        return c, 0
    else:
        return c % NT, c // NT


@triton.jit
def chunk_tile(N0, NT, IS_VARLEN: tl.constexpr):
    """(i0, i_t, i_b) of this program of a flat chunk grid (``launch.flat(N0, chunks, batch
    rows)``): block i0 of the N0 that share a chunk (channel blocks, sub-chunks; they run back
    to back), then the chunk program (i_t, i_b) as ``chunk_program`` numbers it."""
    pid = tl.program_id(0)
    c = pid // N0
    if IS_VARLEN:
        return pid - c * N0, c, 0
    else:
        cu = c.to(tl.uint32)
        nt = tl.cast(NT, tl.uint32)
        i_b = cu // nt
        return pid - c * N0, (cu - i_b * nt).to(tl.int32), i_b.to(tl.int32)


@triton.jit
def seq_length(cu_seqlens, n, bos, T, IS_VARLEN: tl.constexpr):
    """Length of sequence n (first row bos)."""
    if IS_VARLEN:
        return tl.load(cu_seqlens + n + 1).to(tl.int64) - bos
    else:
        return T


@triton.jit
def seq_block(cu, table, i_t, i_b, T, IS_VARLEN: tl.constexpr):
    """(sequence id, first row, length, block index within the sequence) of a block program."""
    if IS_VARLEN:
        n = tl.load(table + 2 * i_t).to(tl.int64)
        blk = tl.load(table + 2 * i_t + 1)
        bos = tl.load(cu + n).to(tl.int64)
        L = (tl.load(cu + n + 1) - bos).to(tl.int32)
    else:
        n = i_b.to(tl.int64)
        blk = i_t
        bos = n * T
        L = T
    return n, bos, L, blk


# --------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------


class Layout:
    """Flat (rows, D) view of a plain batch or of packed sequences."""

    def __init__(self, x: torch.Tensor, seqs: Optional[Varlen]):
        B, T, D = x.shape
        self.B, self.T, self.D = B, T, D
        self.seqs = seqs
        self.varlen = seqs is not None
        if self.varlen:
            self.cu = seqs.offsets(x.device, torch.int64)
            self.N = seqs.N
        else:
            self.cu = torch.arange(B + 1, device=x.device, dtype=torch.int64) * T
            self.N = B

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> its contiguous flat (B * T, D) rows."""
        return t.contiguous().view(self.B * self.T, self.D)

    def grid_t(self, BT: int, extra: int = 0, fixed_rows: Optional[int] = None):
        """(grid size over time, grid size over batch, table) for blocks of BT rows of each
        sequence extended by ``extra`` rows on the left (``fixed_rows`` rows instead, when given:
        a fixed count per sequence); packed sequences: the table of ``Varlen.block_table``."""
        if not self.varlen:
            n = self.T + extra if fixed_rows is None else fixed_rows
            return triton.cdiv(n, BT), self.B, self.cu
        tab = self.seqs.block_table(BT, extra, fixed_rows, self.cu.device)
        return tab.shape[0], 1, tab

    def final_rows(self, x2, h0, K):
        """(N, K-1, D) last K-1 rows of each extended sequence, in the states' float dtype."""
        dt = torch.float64 if x2.dtype == torch.float64 or (h0 is not None and h0.dtype == torch.float64) \
            else torch.float32
        N, D = self.N, self.D
        if K == 1:
            return x2.new_zeros(N, 0, D, dtype=dt)
        j = torch.arange(K - 1, device=x2.device)
        eos = self.cu[1:, None]
        bos = self.cu[:-1, None]
        pos = eos - (K - 1) + j[None, :]                             # (N, K-1) absolute rows
        from_x = pos >= bos
        if x2.shape[0] == 0:                                           # T = 0: all from the state
            rows = x2.new_zeros(N, K - 1, D, dtype=dt)
        else:
            rows = x2[pos.clamp(min=0).reshape(-1)].reshape(N, K - 1, D).to(dt)
        if h0 is None:
            hv = torch.zeros_like(rows)
        else:
            hidx = (K - 1 + pos - bos).clamp(0, K - 2)
            hv = torch.gather(h0.to(dt), 1, hidx[:, :, None].expand(N, K - 1, D))
        return torch.where(from_x[:, :, None], rows, hv)
