"""Argument checks shared by every public op: one place, clear messages.

Every check raises ``TypeError`` (wrong kind of object / dtype) or ``ValueError`` (wrong
shape, value or combination) naming the argument and what was received.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

from kop_triton.kernels.seqs import Varlen

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BACKENDS = ("auto", "triton", "chunked", "recurrent", "naive")


def describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"tensor of shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"
    return f"{type(t).__name__} {t!r}"


def check_tensor(name: str, t, ndim: int, shape_hint: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape_hint}, got {describe(t)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating tensor (float16/bfloat16/float32/float64), got {describe(t)}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have shape {shape_hint} ({ndim} dims), got {describe(t)}")
    return t


def is_int(value) -> bool:
    """A Python int, and not a bool (``isinstance(True, int)`` holds)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(name: str, value, low: Optional[int] = None, high: Optional[int] = None) -> int:
    """``value`` if it is an int (a bool is not) in [low, high], else a ValueError naming ``name``,
    the range and what was received."""
    if (not is_int(value) or (low is not None and value < low)
            or (high is not None and value > high)):
        if high is None:
            rng = "" if low is None else f" >= {low}"
        else:
            rng = f" <= {high}" if low is None else f" in [{low}, {high}]"
        raise ValueError(f"{name} must be an int{rng}, got {value!r}")
    return value


def check_real(name: str, value) -> float:
    """``float(value)`` for a number (a Python or numpy number, a one-element tensor), else a
    TypeError naming ``name`` (a string is not a number here)."""
    if not isinstance(value, (str, bytes)):
        try:
            return float(value)
        except (TypeError, ValueError, RuntimeError):
            pass
    raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")


def check_bool(name: str, value) -> bool:
    """``value`` if it is a bool, else a TypeError naming ``name`` (a string such as 'no' would count as true)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool (True or False), got {type(value).__name__} {value!r}")
    return value


def check_values_in(name: str, t: torch.Tensor, low: int, high: int, what: str, ignore: Optional[int] = None) -> None:
    """Every value of the integer tensor ``t`` in [low, high) (or equal to ``ignore``), without
    reading ``t`` on the host (as ``check_gamma_range``): on CUDA, and under ``torch.compile``, an
    asynchronous device-side assert; on CPU a ValueError naming ``name``, ``what`` it must hold, the
    range received and the offending values."""
    if t.numel() == 0:
        return
    ok = (t >= low) & (t < high)
    if ignore is not None:
        ok |= t == ignore
    try:
        torch._assert_async(ok.all(), f"{name} must hold {what}")
    except RuntimeError:
        bad = t[~ok]
        raise ValueError(f"{name} must hold {what}, got values in [{int(t.min())}, {int(t.max())}] ({bad.numel()} "
                         f"outside, e.g. {bad[:4].tolist()})") from None


def check_token_ids(name: str, ids: torch.Tensor, vocab_size: int) -> None:
    """Token ids in [0, vocab_size) (``check_values_in``)."""
    check_values_in(name, ids, 0, vocab_size, f"token ids in [0, vocab_size={vocab_size})")


def check_same_device(**tensors) -> None:
    items = [(n, t) for n, t in tensors.items() if t is not None]
    if not items:
        return
    for n, t in items:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{n} must be a torch.Tensor, got {describe(t)}")
    n0, t0 = items[0]
    for n, t in items[1:]:
        if t.device != t0.device:
            raise ValueError(f"{n} is on {t.device} but {n0} is on {t0.device}; all inputs must share a device")


def check_same_dtype(**tensors) -> None:
    items = [(n, t) for n, t in tensors.items() if t is not None]
    n0, t0 = items[0]
    for n, t in items[1:]:
        if t.dtype != t0.dtype:
            raise TypeError(f"{n} has dtype {t.dtype} but {n0} has dtype {t0.dtype}; they must match")


def check_backend(backend: str, allowed: Sequence[str] = BACKENDS) -> str:
    if not isinstance(backend, str) or backend not in allowed:
        raise ValueError(f"backend must be one of {list(allowed)}, got {backend!r}")
    return backend


def resolve_backend(backend: str, device: torch.device, allowed: Sequence[str] = BACKENDS,
                    cpu_default: str = "chunked", check_runnable: bool = True) -> str:
    """"auto" -> "triton" on CUDA tensors, ``cpu_default`` elsewhere.  An explicit Triton
    backend is checked to be runnable here (CUDA tensors, or CPU tensors under the interpreter)
    unless ``check_runnable`` is False: the ops check their arguments first and call
    ``check_triton_runnable`` after, so a bad call gets the same error on every machine."""
    check_backend(backend, allowed)
    if backend == "auto":
        return "triton" if device.type == "cuda" else cpu_default
    if check_runnable:
        check_triton_runnable(backend, device)
    return backend


def check_triton_runnable(backend: str, device: torch.device) -> None:
    """A ValueError unless ``backend`` (any name; only the Triton ones are checked) can run on
    tensors on ``device`` here."""
    if not backend.startswith("triton") or device.type == "cuda":
        return
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return
    raise ValueError(
        f"backend={backend!r} runs Triton kernels on CUDA tensors (or on CPU tensors with "
        f"TRITON_INTERPRET=1 set before triton is imported), got tensors on {device}; "
        f"use backend='auto' or 'chunked' there")


def check_cu_seqlens(cu_seqlens: Optional[torch.Tensor], batch: int, seqlen: int,
                     device: torch.device, seqs: Optional[Varlen] = None) -> Optional[Varlen]:
    """Validate packed-sequence offsets -> the ``Varlen`` read from them (``kop_triton.kernels.seqs``:
    N, the lengths, the kernels' tables; the one host read of cu_seqlens in a call), or None.
    ``seqs``: the ``Varlen`` an earlier check of the same call already read (returned as is)."""
    if cu_seqlens is None:
        return None
    if seqs is not None and seqs.cu is cu_seqlens:
        return seqs
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be an int32/int64 tensor of shape (N+1,), got {describe(cu_seqlens)}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 or int64, got {describe(cu_seqlens)}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must have shape (N+1,) with N >= 1, got {describe(cu_seqlens)}")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but the inputs are on {device}")
    if batch != 1:
        raise ValueError(f"cu_seqlens requires a packed batch of size 1, got batch size {batch}")
    c = cu_seqlens.detach().tolist()                 # the one host read of the call
    if c[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {c[:4]}...")
    if c[-1] != seqlen:
        raise ValueError(f"cu_seqlens must end at the sequence length T={seqlen}, got last value {c[-1]}")
    if any(b <= a for a, b in zip(c[:-1], c[1:])):
        raise ValueError(f"cu_seqlens must be strictly increasing, got {c if len(c) <= 16 else c[:16]}")
    return Varlen(cu_seqlens, c)


def per_sequence(fn, sliced: tuple, shared: tuple, initial_state, output_final_state: bool, cu_seqlens, **kw):
    """Run a B = 1 op ``fn(*sliced_i, *shared, initial_state=h0_i, output_final_state=..., **kw)`` on
    each packed sequence i of ``cu_seqlens`` separately (the tensors of ``sliced`` cut along T, the
    state reset at every start) and join the outputs along T and the final states along N."""
    offsets = cu_seqlens.tolist()
    outs, finals = [], []
    for i, (s, e) in enumerate(zip(offsets[:-1], offsets[1:])):
        h0 = None if initial_state is None else initial_state[i:i + 1]
        o_i, f_i = fn(*(t[:, s:e] for t in sliced), *shared, initial_state=h0,
                      output_final_state=output_final_state, **kw)
        outs.append(o_i)
        finals.append(f_i)
    return torch.cat(outs, dim=1), (torch.cat(finals, dim=0) if output_final_state else None)


def state_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """States and accumulators: float32, or float64 when the inputs are float64.  Pass the data
    inputs (x; q, k, v), not the parameters: a float64 gamma or kernel with float32 inputs still
    gives float32 states."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def triton_compute(*tensors):
    """The Triton kernels' inputs: float64 tensors as float32 (the kernels compute in float32 at most;
    the caller casts the results back, states to ``state_dtype``), others unchanged, None stays None.
    The one float64 rule of the scan's and the K2 mixer's Triton paths (the conv's kernels read
    float64 themselves, as fp32)."""
    return tuple(t.float() if t is not None and t.dtype == torch.float64 else t for t in tensors)


def check_op_settings(settings, kind: str):
    """None, or a ``kop_triton.kernels.settings.<kind>`` (ScanSettings, ConvSettings, K2Settings: the
    Triton backend's tunables), else a TypeError naming the class wanted."""
    if settings is None:
        return None
    from kop_triton.kernels import settings as S
    return S.op_settings(settings, getattr(S, kind), None)


def check_gamma_range(gamma: torch.Tensor) -> None:
    """gamma in (0, 1] (NaN fails), without reading gamma on the host: the condition is one
    device tensor asserted with ``torch._assert_async`` -- on CUDA an asynchronous device-side
    assert (no synchronisation, capturable in a CUDA graph, traced by ``torch.compile``), on
    CPU checked at once and raised here as a ValueError naming the values."""
    if gamma.numel() == 0:
        return
    ok = ((gamma > 0) & (gamma <= 1)).all()
    try:
        torch._assert_async(ok, "gamma must lie in (0, 1]: some value is NaN, <= 0 or > 1 (raised by a device-side "
                                "or compiled check, which cannot show it: call eagerly on the CPU to see the values)")
    except RuntimeError:
        g = gamma.detach()
        raise ValueError(f"gamma must lie in (0, 1], got values in [{float(g.min())}, {float(g.max())}]"
                         f"{' (NaN present)' if bool(g.isnan().any()) else ''}") from None
