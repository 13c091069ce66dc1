"""Packed sequences on the host side: ``Varlen``, built once per call from ``cu_seqlens`` with one
host read, and every table the kernels index packed sequences by (``kop_triton.kernels.varlen``
holds the device side, the kernels' jit helpers that read these tables).

    seqs = Varlen(cu_seqlens)              # reads cu_seqlens once (the ops' argument check does it)
    seqs.N, seqs.lengths, seqs.max_len     # host ints
    seqs.chunk_tables(64)                  # (NC, chunk_indices, chunk_offsets), cached per chunk size
    seqs.block_table(64, extra=K - 1, device=x.device)   # the conv's blocks, cached

Two ways the kernels cut the sequences into blocks (kernels/varlen.py):

* chunks of ``BT`` tokens counted over the whole batch (the scan and K2 kernels; the chunk states
  live on this axis): global chunk ``chunk_offsets[n] + c`` is chunk ``c`` of sequence ``n``, and
  ``chunk_indices`` (NC, 2) int32 maps a global chunk back to (sequence, chunk within it);
  ``chunk_offsets`` (N+1,) int64 is the exclusive cumulative sum of ceil(len_n / BT);
* blocks of ``BT`` rows of each sequence extended by ``extra`` rows on the left, or of a fixed
  count of rows per sequence (the conv kernels): ``block_table`` (blocks, 2) int32 rows
  (sequence, block within it).

The tables are built on the host from the lengths read once and copied to the device (host to
device only: nothing here reads device data again).  The chunk tables go to cu_seqlens' own device
(the compile gate's meta-tensor workloads keep cu_seqlens on the CPU), the block tables to the one
asked for.  Importing this module does not import Triton: the ops' argument checks build a
``Varlen`` for every backend.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class Varlen:
    """Offsets of N packed sequences in a batch of one, read on the host once.

    ``cu``: the (N+1,) offsets tensor as given (int32 or int64, its device); ``cu_host``: the same
    as a list of ints; ``lengths``: the N lengths; ``max_len``: the longest (0 when N = 0)."""

    def __init__(self, cu_seqlens: torch.Tensor, cu_host: Optional[List[int]] = None):
        self.cu = cu_seqlens
        self.cu_host = [int(c) for c in (cu_seqlens.tolist() if cu_host is None else cu_host)]
        self.N = len(self.cu_host) - 1
        self.lengths = [b - a for a, b in zip(self.cu_host[:-1], self.cu_host[1:])]
        self.max_len = max(self.lengths) if self.lengths else 0
        self._chunks: Dict[int, Tuple[int, torch.Tensor, torch.Tensor]] = {}
        self._blocks: Dict[tuple, torch.Tensor] = {}
        self._offsets: Dict[tuple, torch.Tensor] = {}

    def __repr__(self) -> str:
        return f"Varlen(N={self.N}, tokens={self.cu_host[-1] if self.cu_host else 0}, max_len={self.max_len})"

    def offsets(self, device=None, dtype=None) -> torch.Tensor:
        """cu_seqlens contiguous, on ``device`` / in ``dtype`` when given (cached)."""
        key = (None if device is None else torch.device(device), dtype)
        if key not in self._offsets:
            self._offsets[key] = self.cu.to(device=device if device is not None else self.cu.device,
                                            dtype=dtype if dtype is not None else self.cu.dtype).contiguous()
        return self._offsets[key]

    def max_chunks(self, BT: int) -> int:
        """Chunks of BT tokens of the longest sequence."""
        return _cdiv(self.max_len, BT)

    def chunk_tables(self, BT: int) -> Tuple[int, torch.Tensor, torch.Tensor]:
        """(NC, chunk_indices (NC, 2) int32, chunk_offsets (N+1,) int64) for chunks of BT tokens,
        on cu_seqlens' device (cached per BT)."""
        if BT not in self._chunks:
            counts = [_cdiv(L, BT) for L in self.lengths]
            NC = sum(counts)
            n_chunks = torch.tensor(counts, dtype=torch.int64)
            offs = torch.cat([n_chunks.new_zeros(1), n_chunks.cumsum(0)])
            seq = torch.repeat_interleave(torch.arange(self.N), n_chunks, output_size=NC)
            within = torch.arange(NC) - offs[seq]
            idx = torch.stack([seq, within], dim=1).to(torch.int32).contiguous()
            dev = self.cu.device
            self._chunks[BT] = (NC, idx.to(dev), offs.to(dev))
        return self._chunks[BT]

    def block_table(self, BT: int, extra: int = 0, fixed_rows: Optional[int] = None, device=None) -> torch.Tensor:
        """(blocks, 2) int32 rows (sequence, block index) covering each sequence's length + ``extra``
        rows (``fixed_rows`` rows instead, when given) in blocks of BT, on ``device`` (cached)."""
        dev = self.cu.device if device is None else torch.device(device)
        key = (BT, extra, fixed_rows, dev)
        if key not in self._blocks:
            rows = [L + extra if fixed_rows is None else fixed_rows for L in self.lengths]
            counts = [_cdiv(r, BT) for r in rows]
            nblk = torch.tensor(counts, dtype=torch.int64)
            seq = torch.repeat_interleave(torch.arange(len(rows)), nblk)
            first = torch.repeat_interleave(torch.cumsum(nblk, 0) - nblk, nblk)
            idx = torch.arange(sum(counts)) - first
            self._blocks[key] = torch.stack([seq, idx], 1).to(torch.int32).contiguous().to(dev)
        return self._blocks[key]


def as_varlen(cu_seqlens) -> Optional[Varlen]:
    """None, a ``Varlen`` as is, or a cu_seqlens tensor read into one (one host read)."""
    if cu_seqlens is None or isinstance(cu_seqlens, Varlen):
        return cu_seqlens
    return Varlen(cu_seqlens)
