"""ROSA: the suffix-automaton next-token ids the reference implementation feeds to its K2 layers.

For a token sequence x_0 .. x_{T-1} and every position i: take the longest suffix of x_0..x_i
that also ends at some earlier position j < i (occurrences may overlap); among those the most
recent j; the ROSA id is x_{j+1}, or -1 when no suffix recurs.  It depends only on the ids (no
gradient) and is causal.

Modes (``KStackConfig.rosa``):

- ``"exact"``: the definition above (the textbook suffix automaton);
- ``"reference"``: what the reference implementation (AileenKoneko/K-language-model, its
  ``rosa.py`` and ``rosa_ext.cpp``) computes, and what its released checkpoints were trained and
  scored with: its automaton's clone step takes the clone's length from the state being split
  (len[q] + 1 instead of len[p] + 1), so some positions get a shorter-context answer (measured:
  see the README);
- ``"off"``: no ROSA.

The automaton is C (``_rosa.c``, built by the install and loaded with ctypes, which releases
the GIL): ``rosa_next_ids`` computes a batch, its rows spread over threads; ``RosaStream``
extends one automaton per sequence by one token per step for generation.  ``naive_rosa_next_ids``
is the direct O(T^2) evaluation of the definition, the ground truth of the tests.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional

import numpy as np
import torch

from .ops._checks import check_int, describe

MODES = ("off", "exact", "reference")
_MODE_CODE = {"exact": 0, "reference": 1}
_ERRORS = {-2: "out of memory (a shorter sequence or fewer rows per call needs less)",
           -3: "a token id outside [0, vocab_size)"}
MAX_VOCAB = 1 << 24      # _rosa.c's ROSA_MAX_VOCAB: tokens are int32 there, the root row 4 V bytes


class RosaUnavailable(RuntimeError):
    """ROSA's compiled helper is missing or cannot be loaded (with what to do about it)."""


_LIB = None
_LIB_LOCK = threading.Lock()


def _load_library():
    global _LIB
    if _LIB is not None:
        return _LIB
    with _LIB_LOCK:
        if _LIB is not None:
            return _LIB
        spec = importlib.util.find_spec("kop_triton._rosa")
        if spec is None or not spec.origin or not os.path.isfile(spec.origin):
            raise RosaUnavailable(
                "ROSA's C helper kop_triton._rosa is not built (src/kop_triton/_rosa.c): reinstall the "
                "package with a C compiler present (`make install`, or `pip install -e .`)")
        try:
            lib = ctypes.CDLL(spec.origin)
        except OSError as e:
            raise RosaUnavailable(f"cannot load ROSA's C helper {spec.origin!r}: {e}; rebuild it with "
                                  f"`make clean install`") from None
        p, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        for name, res, args in (("rosa_new", p, [i64, c_int, i64, c_int]), ("rosa_free", None, [p]),
                                ("rosa_reset", None, [p]), ("rosa_copy", p, [p]), ("rosa_length", i64, [p]),
                                ("rosa_push", i64, [p, i64]),
                                ("rosa_batch", i64, [p, p, i64, i64, i64, c_int])):
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args
        _LIB = lib
    return _LIB


def rosa_available() -> bool:
    """True when the compiled helper loads (ROSA "exact" / "reference" can run)."""
    try:
        _load_library()
        return True
    except RosaUnavailable:
        return False


def check_mode(mode, allow_off: bool = False) -> str:
    modes = MODES if allow_off else MODES[1:]
    if mode not in modes:
        raise ValueError(f"rosa mode must be one of {list(modes)}, got {mode!r}")
    return mode


_INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def check_vocab_size(name, vocab_size):
    """``vocab_size`` an int in [1, MAX_VOCAB] (the C helper's limit), else a ValueError naming ``name``."""
    check_int(name, vocab_size, low=1)
    if vocab_size > MAX_VOCAB:
        raise ValueError(f"{name} must be at most {MAX_VOCAB:,} for ROSA (its automaton stores int32 tokens and a "
                         f"dense root row of 4 x vocab_size bytes), got {vocab_size:,}")
    return vocab_size


def _check_ids(ids, vocab_size):
    if not isinstance(ids, torch.Tensor) or ids.dim() not in (1, 2) or ids.dtype not in _INT_DTYPES:
        raise ValueError(f"ids must be an integer tensor of shape (B, T) or (T,), got {describe(ids)}")
    if vocab_size is not None:
        check_vocab_size("vocab_size (None or an int)", vocab_size)
    x = ids.detach().to("cpu", torch.int64).contiguous()
    if x.numel():
        lo, hi = int(x.min()), int(x.max())
        limit = vocab_size if vocab_size is not None else MAX_VOCAB
        if lo < 0 or hi >= limit:
            what = f"vocab_size = {vocab_size:,}" if vocab_size is not None else "ROSA's largest vocabulary"
            raise ValueError(f"ids must lie in [0, {limit:,}) ({what}), got values in [{lo:,}, {hi:,}]")
        if vocab_size is None:
            vocab_size = hi + 1
    return x, (vocab_size or 1)


_POOL: Optional[ThreadPoolExecutor] = None


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _LIB_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1), thread_name_prefix="rosa")
    return _POOL


def rosa_next_ids(ids: torch.Tensor, mode: str = "exact", vocab_size: Optional[int] = None,
                  num_threads: Optional[int] = None) -> torch.Tensor:
    """ROSA ids of every row of ``ids`` (B, T) or (T,), each row from scratch.

    Args:
        ids: integer token ids (any device; computed on the CPU).
        mode: "exact" (the definition) or "reference" (the reference implementation's automaton).
        vocab_size: ids must lie in [0, vocab_size) (default: max id + 1).
        num_threads: threads the rows are spread over (default ``torch.get_num_threads()``).

    Returns: int64 CPU tensor of ids's shape, values in [-1, vocab_size).
    """
    check_mode(mode)
    x, V = _check_ids(ids, vocab_size)
    if num_threads is None:
        num_threads = torch.get_num_threads()
    check_int("num_threads", num_threads, low=1)
    squeeze = x.dim() == 1
    x2 = x[None] if squeeze else x
    B, T = x2.shape
    out = torch.empty((B, T), dtype=torch.int64)
    if B and T:
        lib, code = _load_library(), _MODE_CODE[mode]
        xp, op = x2.data_ptr(), out.data_ptr()
        n = min(num_threads, B)
        bounds = [B * k // n for k in range(n + 1)]

        def run(k):
            r0, r1 = bounds[k], bounds[k + 1]
            return lib.rosa_batch(xp + r0 * T * 8, op + r0 * T * 8, r1 - r0, T, V, code)

        status = [run(0)] if n == 1 else list(_pool().map(run, range(n)))
        bad = [s for s in status if s != 0]
        if bad:
            raise RuntimeError(f"ROSA failed: {_ERRORS.get(bad[0], bad[0])}")
    return out[0] if squeeze else out


def naive_rosa_next_ids(ids) -> List[int]:
    """The definition evaluated directly, O(T^2): the ground truth for the automaton.

    m_i(j) = length of the common suffix of x_0..x_i and x_0..x_j (j < i), computed row by row
    (m_i(j) = m_{i-1}(j-1) + 1 if x_i == x_j else 0); the answer at i is x_{j*+1} for the largest
    j among those with the largest m_i(j) > 0, else -1.
    """
    x = np.asarray(ids.tolist() if isinstance(ids, torch.Tensor) else list(ids), dtype=np.int64)
    T = len(x)
    out = [-1] * T
    prev = np.zeros(T, dtype=np.int64)     # m_{i-1}(j) for j < i - 1
    for i in range(1, T):
        cur = np.zeros(T, dtype=np.int64)
        eq = x[:i] == x[i]                 # j = 0 .. i-1
        shifted = np.concatenate(([0], prev[:i - 1]))   # m_{i-1}(j-1), 0 for j = 0
        cur[:i] = np.where(eq, shifted + 1, 0)
        best = cur[:i].max()
        if best > 0:
            j = int(np.flatnonzero(cur[:i] == best)[-1])
            out[i] = int(x[j + 1])
        prev = cur
    return out


class RosaStream:
    """Online ROSA for B sequences: ``push(ids_t)`` appends one token per sequence and returns
    its ROSA id, each in amortised O(1) on text (worst case O(n): see ``_rosa.c``).

    ``window=None`` runs over the whole unbounded history; ``window=W`` starts every sequence's
    automaton afresh after each W tokens, as the reference's per-window ROSA (scoring parity with
    windows of W from the first token).  The automata live in C memory and are advanced in
    place: ``clone()`` gives an independent copy.
    """

    def __init__(self, batch_size: int, vocab_size: int, mode: str = "exact", window: Optional[int] = None):
        check_int("batch_size", batch_size, low=1)
        check_vocab_size("vocab_size", vocab_size)
        if window is not None:
            check_int("window (None or an int)", window, low=1)
        self.mode, self.vocab_size, self.window = check_mode(mode), vocab_size, window
        self._lib = _load_library()
        self._sams = []
        for _ in range(batch_size):
            # a bounded window may use the dense transition table; the whole history uses edge lists
            h = self._lib.rosa_new(vocab_size, _MODE_CODE[mode], window or 1024, int(window is not None))
            if not h:
                raise MemoryError("ROSA: cannot allocate an automaton")
            self._sams.append(h)
        self.position = 0            # tokens pushed per sequence

    @property
    def batch_size(self) -> int:
        return len(self._sams)

    def push(self, ids_t) -> torch.Tensor:
        """ids_t (B,) integer ids -> (B,) int64 CPU ROSA ids of these positions."""
        if (not isinstance(ids_t, torch.Tensor) or ids_t.dim() != 1 or ids_t.shape[0] != self.batch_size
                or ids_t.dtype not in _INT_DTYPES):
            raise ValueError(f"ids_t must be an integer tensor of shape ({self.batch_size},), got {describe(ids_t)}")
        vals = ids_t.tolist()                      # one host copy (a device sync for a GPU tensor)
        if not all(0 <= v < self.vocab_size for v in vals):
            raise ValueError(f"ids_t must lie in [0, {self.vocab_size}), got {vals}")
        if self.window is not None and self.position and self.position % self.window == 0:
            for h in self._sams:
                self._lib.rosa_reset(h)
        push = self._lib.rosa_push
        out = [push(h, v) for h, v in zip(self._sams, vals)]
        if min(out) < -1:
            raise RuntimeError(f"ROSA failed: {_ERRORS.get(min(out), min(out))}")
        self.position += 1
        return torch.tensor(out, dtype=torch.int64)

    def extend(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, T) -> (B, T) ROSA ids, pushing the T tokens in order."""
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != self.batch_size:
            raise ValueError(f"ids must have shape ({self.batch_size}, T), got {describe(ids)}")
        x, _ = _check_ids(ids, self.vocab_size)
        cols = [self.push(x[:, t]) for t in range(x.shape[1])]
        return torch.stack(cols, 1) if cols else torch.empty((self.batch_size, 0), dtype=torch.int64)

    def clone(self) -> "RosaStream":
        new = object.__new__(RosaStream)
        new.mode, new.vocab_size, new.window, new.position = self.mode, self.vocab_size, self.window, self.position
        new._lib = self._lib
        new._sams = []
        for h in self._sams:
            c = self._lib.rosa_copy(h)
            if not c:
                raise MemoryError("ROSA: cannot copy an automaton")
            new._sams.append(c)
        return new

    def __del__(self):
        lib = getattr(self, "_lib", None)
        for h in getattr(self, "_sams", ()):
            if lib is not None and h:
                lib.rosa_free(h)
        self._sams = []

    def __repr__(self) -> str:
        return (f"RosaStream(batch_size={self.batch_size}, vocab_size={self.vocab_size}, mode={self.mode!r}, "
                f"window={self.window}, position={self.position})")
