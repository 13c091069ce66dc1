"""The K2 mixing term (SPEC section 1, up to the output projection):

    q_t = alpha * normalize(x_t @ u),  k_t = normalize(x_t @ v)      (L2 over R, eps 1e-8)
    y_t = sigmoid(gate_logit) * conv(x)_t + q_t @ S_t,  S_t = gamma * S_{t-1} + k_t (outer) x_t

``normalize`` is ``x / max(||x||_2, 1e-8)`` (``F.normalize``), as in the reference implementation.

State layout: ``(scan_state, conv_state)`` with scan_state (N, R, D) and conv_state
(N, K-1, D), both float32 (float64 for float64 inputs); either entry of an initial state may
be None (zeros).  ``k2_mixer`` returns ``(y, final_state)``, final_state such a tuple or None.

Backends:
  triton          the fused kernel, ``kop_triton.kernels.k2``.  Forward: one kernel reads x per
                  16-token sub-chunk and computes the projection, normalisation, conv and scan
                  in registers, writing only y (plus chunk-boundary scan states every 64 tokens
                  for the backward): no (B, T, R) q/k and no conv output in memory.  Backward
                  (not one kernel): q, k recomputed by PyTorch from x; the scan backward kernels
                  of ``kop_triton.kernels.scan`` on the saved chunk states; the conv backward
                  kernels of ``kop_triton.kernels.conv``; projection/normalisation chained by
                  autograd.  Deterministic (no atomics).
  triton_unfused  PyTorch q, k + Triton scan + Triton conv + PyTorch gate-and-add: the
                  unfused comparison for the benchmarks.
  chunked / recurrent / naive  the unfused composition of the PyTorch references: the
                  reference of the fused op.
  auto            triton on CUDA, chunked elsewhere.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ._checks import BACKENDS, check_same_device, check_tensor, describe, resolve_backend, state_dtype
from .conv import _check_conv_args, naive_causal_conv
from .scan import _check_scan_args, chunked_decayed_scan, naive_decayed_scan, recurrent_decayed_scan

NORM_EPS = 1e-8
K2_BACKENDS = BACKENDS + ("triton_unfused",)

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


class _TritonK2Mixer(torch.autograd.Function):
    """Fused forward (``kop_triton.kernels.k2.k2_fwd``); backward from x and the saved
    chunk-boundary scan states:

      * q, k recomputed from x by PyTorch (projection + normalisation, float32) -- the only
        (B, T, R) tensors of the whole op, and only in the backward;
      * the scan part by ``kop_triton.kernels.scan.scan_bwd`` on the chunk states the fused
        forward stored (dq, dk, its share of dx, dgamma, d scan_state);
      * the conv part by ``kop_triton.kernels.conv``: dx and d conv_state for the cotangent
        gate * dy; one weight-gradient pass W = conv_bwd_dw(x, dy) gives both
        dkernel = gate * W and dgate_logit = gate (1 - gate) <W, kernel> (the conv is linear in
        its kernel, so <dy, conv(x)> = <W, kernel>: the conv output is never recomputed);
      * dq, dk chained through the normalisation and projection by autograd on the recomputed
        q, k (dx, du, dv, dalpha).
    Deterministic: no atomics anywhere; every reduction runs in a fixed order.
    """

    @staticmethod
    def forward(ctx, x, u, v, alpha, gamma, kernel, gate_logit, scan_state, conv_state,
                output_final_state, cu_seqlens):
        from kop_triton.kernels.k2 import k2_fwd
        xc = x.float() if x.dtype == torch.float64 else x
        need_grad = any(ctx.needs_input_grad[:9])
        y, sT, cT, states = k2_fwd(xc, u, v, alpha, gamma, kernel, gate_logit, scan_state,
                                   conv_state, output_final_state, cu_seqlens,
                                   store_chunk_states=need_grad)
        ctx.save_for_backward(x, u, v, alpha, gamma, kernel, gate_logit, scan_state, conv_state,
                              states, cu_seqlens)
        ctx.set_materialize_grads(False)
        sdt = state_dtype(x)
        y = y.to(x.dtype)
        if not output_final_state:
            return y, None, None
        return y, sT.to(sdt), cT.to(sdt)

    @staticmethod
    def backward(ctx, dy, dscan, dconv):
        from kop_triton.kernels.conv import conv_bwd_dw, conv_bwd_dx
        from kop_triton.kernels.k2 import CHUNK
        from kop_triton.kernels.scan import scan_bwd
        x, u, v, alpha, gamma, kernel, gate_logit, s0, c0, states, cu = ctx.saved_tensors
        xc = x.float() if x.dtype == torch.float64 else x
        if dy is None:
            dy = torch.zeros_like(xc)
        dyc = dy.to(xc.dtype)
        K = kernel.shape[-1]
        # q, k recomputed (float32) under autograd, to chain dq, dk back to x, u, v, alpha
        with torch.enable_grad():
            leaves = [t.detach().float().requires_grad_() for t in (xc, u, v, alpha)]
            q, k = k2_qk(*leaves)
        dq, dk, dxs, dgamma, ds0 = scan_bwd(q.detach().to(xc.dtype), k.detach().to(xc.dtype), xc,
                                            gamma, None if s0 is None else s0.float(), states, dyc,
                                            None if dscan is None else dscan.float(), cu, CHUNK)
        dx_qk, du, dv, dalpha = torch.autograd.grad((q, k), leaves, (dq.float(), dk.float()))
        g = torch.sigmoid(gate_logit.detach().float())
        dxc, dc0 = conv_bwd_dx(dyc.float() * g, kernel, None if dconv is None else dconv.float(),
                               c0 is not None, cu, torch.float32, torch.float32)
        W = conv_bwd_dw(xc, None if c0 is None else c0.float(), dyc, K, kernel.dim() == 1, cu)
        dkernel = g * W
        dgate = (g * (1 - g) * (W * kernel.detach().float()).sum()).reshape(gate_logit.shape)
        dx = (dxs.float() + dxc + dx_qk).to(x.dtype)
        return (dx, du.to(u.dtype), dv.to(v.dtype), dalpha.to(alpha.dtype), dgamma.to(gamma.dtype),
                dkernel.to(kernel.dtype), dgate.to(gate_logit.dtype),
                None if s0 is None else ds0.to(s0.dtype), None if c0 is None else dc0.to(c0.dtype),
                None, None)


def triton_k2_mixer(x, u, v, alpha, gamma, kernel, gate_logit, *, initial_state=None,
                    output_final_state=False, cu_seqlens=None):
    """The fused Triton kernel (see ``_TritonK2Mixer`` for what the backward fuses).

    Computes in float32 (float64 inputs are computed in float32 and cast back); the final
    states are float32 (float64 for float64 inputs, like the references).
    """
    s0, c0 = _split_state(initial_state)
    B, T, D = x.shape
    if T == 0:
        return reference_k2_mixer(x, u, v, alpha, gamma, kernel, gate_logit, initial_state=initial_state,
                                  output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    y, sT, cT = _TritonK2Mixer.apply(x, u, v, alpha, gamma, kernel, gate_logit, s0, c0,
                                     bool(output_final_state), cu_seqlens)
    if not output_final_state:
        return y, None
    return y, (sT, cT)


def triton_unfused_k2_mixer(x, u, v, alpha, gamma, kernel, gate_logit, *, initial_state=None,
                            output_final_state=False, cu_seqlens=None):
    """The unfused Triton composition (the benchmarks' comparison for the fused kernel):
    PyTorch q, k (materialised (B, T, R)), ``decayed_scan(backend="triton")``,
    ``causal_conv(backend="triton")`` (materialised (B, T, D) conv output), PyTorch gate-and-add."""
    from .conv import triton_causal_conv
    from .scan import triton_decayed_scan
    s0, c0 = _split_state(initial_state)
    q, k = k2_qk(x, u, v, alpha)
    y, s1 = triton_decayed_scan(q, k, x, gamma, initial_state=s0, output_final_state=output_final_state,
                                cu_seqlens=cu_seqlens)
    c, c1 = triton_causal_conv(x, kernel, initial_state=c0, output_final_state=output_final_state,
                               cu_seqlens=cu_seqlens)
    out = torch.sigmoid(gate_logit.to(x.dtype)) * c + y
    return out, ((s1, c1) if output_final_state else None)


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
        backend: "auto" | "triton" | "triton_unfused" | "chunked" | "recurrent" | "naive".
            "triton" is the fused kernel (module docstring); "triton_unfused" composes the Triton
            scan and conv with PyTorch q/k and gating (the benchmarks' unfused comparison);
            the others compose the PyTorch references; "auto" is triton on CUDA, chunked elsewhere.

    Returns:
        (y, final_state): y (B, T, D) in x's dtype; final_state a tuple or None.
    """
    dev = x.device if isinstance(x, torch.Tensor) else torch.device("cpu")
    bk = resolve_backend(backend, dev, K2_BACKENDS)
    _check_k2_args(x, u, v, alpha, gamma, kernel, gate_logit, initial_state, cu_seqlens,
                   "triton" if bk.startswith("triton") else bk)
    if bk == "triton_unfused":
        return triton_unfused_k2_mixer(x, u, v, alpha, gamma, kernel, gate_logit, initial_state=initial_state,
                                       output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    if bk == "triton":
        return triton_k2_mixer(x, u, v, alpha, gamma, kernel, gate_logit, initial_state=initial_state,
                               output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    return reference_k2_mixer(x, u, v, alpha, gamma, kernel, gate_logit, initial_state=initial_state,
                              output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                              scan_backend=bk)
