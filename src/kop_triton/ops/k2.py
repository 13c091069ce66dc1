"""The K2 mixing term (SPEC section 1, up to the output projection):

    q_t = alpha * normalize(x_t @ u),  k_t = normalize(x_t @ v)      (L2 over R, eps 1e-8)
    y_t = sigmoid(gate_logit) * conv(x)_t + q_t @ S_t,  S_t = gamma * S_{t-1} + k_t (outer) x_t

``normalize`` is ``x / max(||x||_2, 1e-8)`` (``F.normalize``), as in the reference implementation.

State layout: ``(scan_state, conv_state)`` with scan_state (N, R, D) and conv_state
(N, K-1, D), both float32 (float64 for float64 inputs); either entry of an initial state may
be None (zeros).  ``k2_mixer`` returns ``(y, final_state)``, final_state such a tuple or None.

Backends: "triton" (the fused kernel, ``kop_triton.kernels.k2``), "chunked" / "recurrent" /
"naive" (the unfused composition of the PyTorch references: the reference of the fused op),
"auto" (triton on CUDA, chunked elsewhere).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ._checks import check_same_device, check_tensor, describe, resolve_backend
from .conv import _check_conv_args, naive_causal_conv
from .scan import _check_scan_args, chunked_decayed_scan, naive_decayed_scan, recurrent_decayed_scan

NORM_EPS = 1e-8

_SCAN = {"naive": naive_decayed_scan, "recurrent": recurrent_decayed_scan, "chunked": chunked_decayed_scan}


def k2_qk(x, u, v, alpha):
    """q = alpha * normalize(x @ u), k = normalize(x @ v): (B, T, R) each, in x's dtype."""
    q = F.normalize(x @ u.to(x.dtype), dim=-1, eps=NORM_EPS) * alpha.to(x.dtype)
    k = F.normalize(x @ v.to(x.dtype), dim=-1, eps=NORM_EPS)
    return q, k


def _split_state(state):
    if state is None:
        return None, None
    if not isinstance(state, (tuple, list)) or len(state) != 2:
        raise TypeError(f"initial_state must be a (scan_state, conv_state) tuple, got {describe(state)}")
    return state[0], state[1]


def reference_k2_mixer(x, u, v, alpha, gamma, kernel, gate_logit, *, initial_state=None,
                       output_final_state=False, cu_seqlens=None, scan_backend="chunked"):
    """Unfused composition of the PyTorch references (the reference of the fused kernel)."""
    s0, c0 = _split_state(initial_state)
    q, k = k2_qk(x, u, v, alpha)
    y, s1 = _SCAN[scan_backend](q, k, x, gamma, initial_state=s0,
                                output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    c, c1 = naive_causal_conv(x, kernel, initial_state=c0, output_final_state=output_final_state,
                              cu_seqlens=cu_seqlens)
    out = torch.sigmoid(gate_logit.to(x.dtype)) * c + y
    return out, ((s1, c1) if output_final_state else None)


def triton_k2_mixer(x, u, v, alpha, gamma, kernel, gate_logit, *, initial_state=None,
                    output_final_state=False, cu_seqlens=None):
    raise NotImplementedError("the fused Triton K2 mixer is not implemented yet")


def _check_k2_args(x, u, v, alpha, gamma, kernel, gate_logit, initial_state, cu_seqlens, backend):
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
    _check_scan_args(qk_stub, qk_stub, x, gamma, s0, cu_seqlens, backend)
    _check_conv_args(x, kernel, c0, cu_seqlens)


def k2_mixer(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor,
             gamma: torch.Tensor, kernel: torch.Tensor, gate_logit: torch.Tensor, *,
             initial_state: Optional[Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]] = None,
             output_final_state: bool = False, cu_seqlens: Optional[torch.Tensor] = None,
             backend: str = "auto"):
    """The K2 mixing term: sigmoid(gate_logit) * causal_conv(x, kernel) + decayed scan of x.

    Args:
        x: (B, T, D) input (already RMS-normalised by the enclosing block).
        u, v: (D, R) query / key projections.  alpha: (R,) query scales.  gamma: (R,) decays in (0, 1].
        kernel: (K,) shared or (D, K) per-channel Kbase kernel (tap 0 = current token).
        gate_logit: one-element tensor; the Kbase gate is sigmoid(gate_logit).
        initial_state: optional (scan_state (N, R, D), conv_state (N, K-1, D)); entries may be None.
        output_final_state: also return the final (scan_state, conv_state).
        cu_seqlens: optional (N+1,) offsets of packed sequences in a B = 1 batch.
        backend: "auto" | "triton" | "chunked" | "recurrent" | "naive".

    Returns:
        (y, final_state): y (B, T, D) in x's dtype; final_state a tuple or None.
    """
    dev = x.device if isinstance(x, torch.Tensor) else torch.device("cpu")
    bk = resolve_backend(backend, dev)
    _check_k2_args(x, u, v, alpha, gamma, kernel, gate_logit, initial_state, cu_seqlens, bk)
    if bk == "triton":
        return triton_k2_mixer(x, u, v, alpha, gamma, kernel, gate_logit, initial_state=initial_state,
                               output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    return reference_k2_mixer(x, u, v, alpha, gamma, kernel, gate_logit, initial_state=initial_state,
                              output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                              scan_backend=bk)
