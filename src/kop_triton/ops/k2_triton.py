"""The fused Triton K2 mixer's host side, no autograd: the argument checks and the launchers'
dtype handling around ``kop_triton.kernels.k2`` (``k2_fwd`` / ``k2_bwd``).

A leaf module: ``kop_triton.ops.k2`` (the eager autograd Function) and ``kop_triton.ops.library``
(the torch.library ops used under ``torch.compile``) both import it, and neither imports the
other at module level.
"""
from __future__ import annotations

import torch

from ._checks import check_same_device, check_tensor, describe, state_dtype, triton_compute
from .conv import _check_conv_args
from .scan import _check_scan_args


def _split_state(state):
    if state is None:
        return None, None
    if not isinstance(state, (tuple, list)) or len(state) != 2:
        raise TypeError(f"initial_state must be a (scan_state, conv_state) tuple, got {describe(state)}")
    return state[0], state[1]


def _check_k2_args(x, u, v, alpha, gamma, kernel, gate_logit, initial_state, cu_seqlens, backend):
    """-> the ``Varlen`` of cu_seqlens (None without), read once for both checks below."""
    check_tensor("x", x, 3, "(B, T, D)")
    check_tensor("u", u, 2, "(D, R)")
    check_tensor("v", v, 2, "(D, R)")
    check_tensor("alpha", alpha, 1, "(R,)")
    if not isinstance(gate_logit, torch.Tensor) or gate_logit.numel() != 1:
        raise TypeError(f"gate_logit must be a one-element tensor, got {describe(gate_logit)}")
    check_same_device(x=x, u=u, v=v, alpha=alpha, gamma=gamma, kernel=kernel, gate_logit=gate_logit)
    D = x.shape[-1]
    if u.shape[0] != D or v.shape != u.shape:
        raise ValueError(f"u and v must both have shape (D, R) with D = {D}, got u {describe(u)}, v {describe(v)}")
    R = u.shape[1]
    if alpha.shape != (R,):
        raise ValueError(f"alpha must have shape (R,) = ({R},), got {describe(alpha)}")
    s0, c0 = _split_state(initial_state)
    B, T, _ = x.shape
    qk_stub = x.new_empty(B, T, R)
    seqs = _check_scan_args(qk_stub, qk_stub, x, gamma, s0, cu_seqlens, backend)
    return _check_conv_args(x, kernel, c0, cu_seqlens, seqs)


def k2_triton_forward(x, u, v, alpha, gamma, kernel, gate_logit, scan_state, conv_state,
                      output_final_state, cu_seqlens, store_chunk_states=True, settings=None, seqs=None):
    """Fused forward (``kop_triton.kernels.k2.k2_fwd``), no autograd.
    -> (y, scan_final, conv_final, chunk_states, qkn).

    Arguments as ``k2_mixer`` (validated by the caller; initial states may be None).  Computes
    in float32 (float64 inputs in float32, cast back).  y (B, T, D) in x's dtype; the final
    states (N, R, D) and (N, K-1, D) in ``state_dtype(x)``, None unless ``output_final_state``;
    chunk_states (NC, R, D) and qkn (B*T*(3R+2),), float32: what ``k2_triton_backward`` needs
    (the scan state entering every 64-token chunk; the planes q, k and [q_hat, norms] of every
    token, ``kop_triton.kernels.k2.qk_planes``), None unless ``store_chunk_states``.  settings: a
    ``K2Settings`` (None: the defaults); seqs: the ``Varlen`` of cu_seqlens when already read.
    """
    from kop_triton.kernels.k2 import K2, k2_fwd
    xc, = triton_compute(x)
    y, sT, cT, states, qkn = k2_fwd(xc, u, v, alpha, gamma, kernel, gate_logit, scan_state, conv_state,
                                    output_final_state, cu_seqlens if seqs is None else seqs,
                                    store_chunk_states=store_chunk_states, settings=K2 if settings is None else settings)
    if output_final_state:
        sdt = state_dtype(x)
        sT, cT = sT.to(sdt), cT.to(sdt)
    return y.to(x.dtype), sT, cT, states, qkn


def k2_triton_backward(x, u, v, alpha, gamma, kernel, gate_logit, scan_state, conv_state,
                       cu_seqlens, chunk_states, qkn, dy, dscan, dconv, settings=None, seqs=None):
    """Backward of ``k2_triton_forward`` (``kop_triton.kernels.k2.k2_bwd``) from x and the
    forward's chunk_states and qkn, no autograd.
    -> (dx, du, dv, dalpha, dgamma, dkernel, dgate_logit, dscan_state, dconv_state), each in its
    input's dtype and shape; an initial-state gradient is None where that state is None.
    dy (B, T, D), dscan (N, R, D), dconv (N, K-1, D): cotangents, each may be None (zero).
    Deterministic: no atomics anywhere; every reduction runs in a fixed order.  settings, seqs: the
    forward's.
    """
    from kop_triton.kernels.k2 import K2, k2_bwd
    xc, = triton_compute(x)                                         # the forward's compute dtype
    grads = k2_bwd(xc, u, v, alpha, gamma, kernel, gate_logit, scan_state, conv_state,
                   cu_seqlens if seqs is None else seqs, chunk_states, qkn, dy, dscan, dconv,
                   settings=K2 if settings is None else settings)
    like = (x, u, v, alpha, gamma, kernel, gate_logit, scan_state, conv_state)
    return tuple(None if g is None else g.to(t.dtype).reshape(t.shape) for g, t in zip(grads, like))
