"""Decayed scan: S_t = diag(gamma) S_{t-1} + k_t (outer) v_t,  o_t = q_t @ S_t.

Shapes: q, k (B, T, R); v (B, T, D); gamma (R,) in (0, 1]; states (N, R, D) float32
(float64 when the inputs are float64), N = B, or the number of packed sequences when
``cu_seqlens`` is given (then B must be 1 and the state resets at every sequence start).

Backends (same signature, same return tuple ``(o, final_state)``):
  naive      direct quadratic formula, any dtype; the ground truth
  recurrent  step-by-step loop (the generation form)
  chunked    chunked algorithm in PyTorch: the fast path on CPU
  triton     the Triton kernels in ``kop_triton.kernels.scan`` (CUDA, or CPU under TRITON_INTERPRET=1)
  auto       triton on CUDA tensors, chunked elsewhere

Numerics (SPEC section 4): every decay product is gamma^n with n >= 0, so small gammas
underflow to 0 and never overflow; accumulation in float32 (float64 for float64 inputs).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from kop_triton.kernels.config import CHUNK, check_rank   # check_rank: the one R <= 128 limit

from .scan_chunked import CPU_CHUNK, chunked_scan
from ._checks import (check_bool, check_cu_seqlens, check_gamma_range, check_op_settings, check_same_device,
                      check_same_dtype, check_tensor, check_triton_runnable, describe, per_sequence,
                      resolve_backend, state_dtype, triton_compute)


# --------------------------------------------------------------------------------------
# PyTorch references
# --------------------------------------------------------------------------------------


def _decay_powers(gamma: torch.Tensor, exponents: torch.Tensor) -> torch.Tensor:
    """gamma[r] ** exponents[...] for integer exponents >= 0 -> (R, *exponents.shape).

    ``torch.pow`` with a tensor exponent keeps the gradient w.r.t. gamma exact
    (n * gamma^(n-1)) and never forms a negative power.
    """
    e = exponents.to(gamma.dtype)
    return torch.pow(gamma.reshape((-1,) + (1,) * exponents.dim()), e)


def _causal_decay_matrix(gamma: torch.Tensor, n: int) -> torch.Tensor:
    """(R, n, n) with [r, i, j] = gamma_r^(i-j) for j <= i, 0 above the diagonal."""
    i = torch.arange(n, device=gamma.device)
    diff = i[:, None] - i[None, :]
    pw = _decay_powers(gamma, diff.clamp(min=0))
    return torch.where(diff >= 0, pw, torch.zeros((), dtype=gamma.dtype, device=gamma.device))


def naive_decayed_scan(q, k, v, gamma, *, initial_state=None, output_final_state=False,
                       cu_seqlens=None):
    """Direct formula: o_t = sum_{j<=t} sum_r q_tr gamma_r^(t-j) k_jr v_j + q_t gamma^(t+1) S0.

    Quadratic in T (a (R, T, T) decay tensor): the ground truth for tests, not for speed.
    """
    if cu_seqlens is not None:
        return per_sequence(naive_decayed_scan, (q, k, v), (gamma,), initial_state, output_final_state, cu_seqlens)
    dt = state_dtype(q, k, v)
    qf, kf, vf, g = q.to(dt), k.to(dt), v.to(dt), gamma.to(dt)
    T = q.shape[1]
    L = _causal_decay_matrix(g, T)                              # (R, T, T)
    A = torch.einsum("btr,bjr,rtj->btj", qf, kf, L)              # (B, T, T)
    o = A @ vf                                                   # (B, T, D)
    t = torch.arange(T, device=q.device)
    if initial_state is not None:
        h0 = initial_state.to(dt)
        o = o + torch.einsum("btr,rt,brd->btd", qf, _decay_powers(g, t + 1), h0)
    final = None
    if output_final_state:
        final = torch.einsum("bjr,rj,bjd->brd", kf, _decay_powers(g, T - 1 - t), vf)
        if initial_state is not None:
            final = final + _decay_powers(g, torch.tensor(T, device=q.device))[:, None] * initial_state.to(dt)
    return o.to(v.dtype), final


def recurrent_decayed_scan(q, k, v, gamma, *, initial_state=None, output_final_state=False,
                           cu_seqlens=None):
    """Step-by-step recurrence, one token at a time (the decoding form)."""
    if cu_seqlens is not None:
        return per_sequence(recurrent_decayed_scan, (q, k, v), (gamma,), initial_state, output_final_state, cu_seqlens)
    dt = state_dtype(q, k, v)
    B, T, R = q.shape
    D = v.shape[-1]
    g = gamma.to(dt)[:, None]
    S = (torch.zeros(B, R, D, dtype=dt, device=q.device) if initial_state is None
         else initial_state.to(dt))
    outs = []
    for t in range(T):
        S = g * S + k[:, t, :, None].to(dt) * v[:, t, None, :].to(dt)
        outs.append(torch.einsum("br,brd->bd", q[:, t].to(dt), S))
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(B, 0, D, dtype=dt)
    return o.to(v.dtype), (S if output_final_state else None)


def chunked_decayed_scan(q, k, v, gamma, *, initial_state=None, output_final_state=False,
                         cu_seqlens=None, chunk_size: int = CPU_CHUNK):
    """Chunked algorithm in PyTorch (linear in T) with a hand-written backward (ops/scan_chunked.py)."""
    if cu_seqlens is not None:
        return per_sequence(chunked_decayed_scan, (q, k, v), (gamma,), initial_state, output_final_state,
                            cu_seqlens, chunk_size=chunk_size)
    dt = state_dtype(q, k, v)
    B, T, R = q.shape
    D = v.shape[-1]
    h0 = None if initial_state is None else initial_state.to(dt)
    if T == 0:
        final = None
        if output_final_state:
            final = h0 * 1 if h0 is not None else torch.zeros(B, R, D, dtype=dt, device=q.device)
        return v.new_zeros(B, 0, D), final
    o, final = chunked_scan(q.to(dt), k.to(dt), v.to(dt), gamma.to(dt), h0, output_final_state, chunk_size)
    return o.to(v.dtype), final


# --------------------------------------------------------------------------------------
# Triton path (kernels in kop_triton.kernels.scan)
# --------------------------------------------------------------------------------------


class _TritonDecayedScan(torch.autograd.Function):
    """Thin autograd wrapper over kop_triton.kernels.scan.scan_fwd / scan_bwd (float32 states).

    The kernels are imported on first use, so the package imports without triton installed.
    ``seqs`` (the ``Varlen`` of cu_seqlens, read once) and ``settings`` (``ScanSettings``) are kept
    for the backward.
    """

    @staticmethod
    def forward(ctx, q, k, v, gamma, initial_state, output_final_state, cu_seqlens, seqs, settings):
        from kop_triton.kernels.scan import scan_fwd
        o, final, chunk_states = scan_fwd(q, k, v, gamma, initial_state, output_final_state,
                                          seqs, CHUNK, settings)
        ctx.save_for_backward(q, k, v, gamma, initial_state, chunk_states, cu_seqlens)
        ctx.seqs, ctx.settings = seqs, settings
        ctx.set_materialize_grads(False)
        return o, final

    @staticmethod
    def backward(ctx, do, dfinal):
        from kop_triton.kernels.scan import scan_bwd
        q, k, v, gamma, initial_state, chunk_states, cu_seqlens = ctx.saved_tensors
        if do is None:
            do = torch.zeros_like(v)
        dq, dk, dv, dgamma, dh0 = scan_bwd(q, k, v, gamma, initial_state, chunk_states, do,
                                           dfinal, ctx.seqs, CHUNK, ctx.settings)
        return dq, dk, dv, dgamma.to(gamma.dtype), dh0, None, None, None, None


def triton_decayed_scan(q, k, v, gamma, *, initial_state=None, output_final_state=False,
                        cu_seqlens=None, settings=None, seqs=None):
    """The Triton kernels (CUDA, or CPU tensors under TRITON_INTERPRET=1); R <= 128.

    Computes in float32 (float64 inputs are computed in float32 and cast back); the final
    state is float32 (float64 for float64 inputs, like the references).  settings: a
    ``ScanSettings`` (None: the defaults); seqs: the ``Varlen`` the argument check read from
    cu_seqlens (None: read here).
    """
    from kop_triton.kernels.seqs import as_varlen
    from kop_triton.kernels.settings import SCAN, ScanSettings, op_settings
    settings = op_settings(settings, ScanSettings, SCAN)
    seqs = as_varlen(cu_seqlens) if seqs is None else seqs
    B, T, R = q.shape
    D = v.shape[-1]
    out_dtype = v.dtype
    st_dtype = state_dtype(q, k, v)
    N = B if seqs is None else seqs.N
    if T == 0:
        # nothing to scan: o is empty and the state passes through unchanged
        o = v.new_zeros(B, 0, D)
        if not output_final_state:
            return o, None
        if initial_state is None:
            return o, torch.zeros(N, R, D, dtype=st_dtype, device=q.device)
        return o, initial_state.to(st_dtype) * 1
    q, k, v, h0 = triton_compute(q, k, v, initial_state)
    o, final = _TritonDecayedScan.apply(q, k, v, gamma, h0, bool(output_final_state), cu_seqlens, seqs, settings)
    o = o.to(out_dtype)
    if final is not None:
        final = final.to(st_dtype)
    return o, final


# --------------------------------------------------------------------------------------
# Public op
# --------------------------------------------------------------------------------------

# the PyTorch scans by backend name (k2's reference composition picks its scan from here too)
SCAN_BACKENDS = {
    "naive": naive_decayed_scan,
    "recurrent": recurrent_decayed_scan,
    "chunked": chunked_decayed_scan,
}


def _check_scan_args(q, k, v, gamma, initial_state, cu_seqlens, backend, seqs=None):
    """-> the ``Varlen`` of cu_seqlens (None without): its one host read (``check_cu_seqlens``)."""
    check_tensor("q", q, 3, "(B, T, R)")
    check_tensor("k", k, 3, "(B, T, R)")
    check_tensor("v", v, 3, "(B, T, D)")
    check_tensor("gamma", gamma, 1, "(R,)")
    check_same_device(q=q, k=k, v=v, gamma=gamma, initial_state=initial_state)
    check_same_dtype(q=q, k=k, v=v)
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {tuple(q.shape)}, got {describe(k)}")
    B, T, R = q.shape
    if v.shape[:2] != (B, T):
        raise ValueError(f"v must have shape (B, T, D) = ({B}, {T}, D) to match q, got {describe(v)}")
    if gamma.shape[0] != R:
        raise ValueError(f"gamma must have shape (R,) = ({R},) to match q, got {describe(gamma)}")
    if R < 1 or v.shape[-1] < 1:
        raise ValueError(f"R and D must be >= 1, got q {describe(q)}, v {describe(v)}")
    check_gamma_range(gamma)
    seqs = check_cu_seqlens(cu_seqlens, B, T, q.device, seqs)
    N = B if seqs is None else seqs.N
    if initial_state is not None:
        if not isinstance(initial_state, torch.Tensor):
            raise TypeError(f"initial_state must be a tensor of shape (N, R, D), got {describe(initial_state)}")
        if initial_state.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"initial_state must be float32 (or float64), got {describe(initial_state)}")
        want = (N, R, v.shape[-1])
        if tuple(initial_state.shape) != want:
            raise ValueError(f"initial_state must have shape (N, R, D) = {want}, got {describe(initial_state)}")
    if backend == "triton":
        check_rank(R)
    return seqs


def decayed_scan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gamma: torch.Tensor, *,
                 initial_state: Optional[torch.Tensor] = None, output_final_state: bool = False,
                 cu_seqlens: Optional[torch.Tensor] = None,
                 backend: str = "auto", settings=None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Decayed linear-attention scan with a constant per-channel decay.

    S_t = diag(gamma) S_{t-1} + k_t (outer) v_t  (S is (R, D), float32),   o_t = q_t @ S_t.

    Args:
        q, k: (B, T, R) queries and keys.  v: (B, T, D) values (same dtype as q, k).
        gamma: (R,) decays in (0, 1].
        initial_state: optional (N, R, D) float32 state before t = 0 (zeros when None).
        output_final_state: also return the (N, R, D) float32 state after the last token.
        cu_seqlens: optional int32/int64 (N+1,) offsets of packed sequences in a B = 1 batch.
        backend: "auto" | "triton" | "chunked" | "recurrent" | "naive".
        settings: the Triton backend's tunables, a ``kop_triton.kernels.settings.ScanSettings``
            (None: its defaults, ``SCAN``); the other backends ignore it.

    Returns:
        (o, final_state): o is (B, T, D) in v's dtype; final_state is None unless asked for.
    """
    dev = q.device if isinstance(q, torch.Tensor) else torch.device("cpu")
    bk = resolve_backend(backend, dev, check_runnable=False)
    seqs = _check_scan_args(q, k, v, gamma, initial_state, cu_seqlens, bk)
    check_bool("output_final_state", output_final_state)
    settings = check_op_settings(settings, "ScanSettings")
    check_triton_runnable(bk, dev)          # after the argument checks: the same error for a bad call anywhere
    if bk == "triton":
        return triton_decayed_scan(q, k, v, gamma, initial_state=initial_state, output_final_state=output_final_state,
                                   cu_seqlens=cu_seqlens, settings=settings, seqs=seqs)
    return SCAN_BACKENDS[bk](q, k, v, gamma, initial_state=initial_state, output_final_state=output_final_state,
                             cu_seqlens=cu_seqlens)
