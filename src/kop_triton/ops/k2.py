"""The K2 mixing term (SPEC section 1, up to the output projection):

    q_t = alpha * normalize(x_t @ u),  k_t = normalize(x_t @ v)      (L2 over R, eps 1e-8)
    y_t = sigmoid(gate_logit) * conv(x)_t + q_t @ S_t,  S_t = gamma * S_{t-1} + k_t (outer) x_t

``normalize`` is ``x / max(||x||_2, 1e-8)`` (``F.normalize``), as in the reference implementation.

State layout: ``(scan_state, conv_state)`` with scan_state (N, R, D) and conv_state
(N, K-1, D), both float32 (float64 for float64 inputs); either entry of an initial state may
be None (zeros).  ``k2_mixer`` returns ``(y, final_state)``, final_state such a tuple or None.

Backends:
  triton          the fused kernel, ``kop_triton.kernels.k2`` (its docstring lists the launches),
                  parallel over chunks in the forward and the backward: q, k computed once per
                  token, chunk-local states, one pass carrying the state across chunks, then
                  the outputs (scan, conv and gate in one kernel; dx in one kernel).  x read
                  three times and y written once in the forward; deterministic (no atomics).
                  Two launchers without autograd, ``k2_triton_forward`` / ``k2_triton_backward``
                  (``kop_triton.ops.k2_triton``), serve both the eager autograd Function and,
                  under ``torch.compile``, the torch.library ops of ``kop_triton.ops.library``
                  (one opaque graph node, no graph break).
  triton_unfused  PyTorch q, k + Triton scan + Triton conv + PyTorch gate-and-add: the
                  unfused comparison for the benchmarks.
  chunked         one fused PyTorch autograd Function (``kop_triton.ops.k2_chunked``): the
                  conv folded into the chunked scan's products, hand-written backward; the
                  unfused composition below where it does not apply (cu_seqlens, per-channel
                  kernels, K - 1 > 16, half-precision x).
  recurrent / naive  the unfused composition of the PyTorch references: the reference of
                  the fused ops.
  auto            triton on CUDA, chunked elsewhere.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ._checks import BACKENDS, check_bool, check_op_settings, check_triton_runnable, resolve_backend
from .scan_chunked import CPU_CHUNK
from .conv import naive_causal_conv
from .k2_triton import _check_k2_args, _split_state, k2_triton_backward, k2_triton_forward
from .scan import SCAN_BACKENDS

NORM_EPS = 1e-8
K2_BACKENDS = BACKENDS + ("triton_unfused",)


def k2_qk(x, u, v, alpha):
    """q = alpha * normalize(x @ u), k = normalize(x @ v): (B, T, R) each, in x's dtype."""
    q = F.normalize(x @ u.to(x.dtype), dim=-1, eps=NORM_EPS) * alpha.to(x.dtype)
    k = F.normalize(x @ v.to(x.dtype), dim=-1, eps=NORM_EPS)
    return q, k


def reference_k2_mixer(x, u, v, alpha, gamma, kernel, gate_logit, *, initial_state=None,
                       output_final_state=False, cu_seqlens=None, scan_backend="chunked"):
    """Unfused composition of the PyTorch references (the reference of the fused kernel)."""
    s0, c0 = _split_state(initial_state)
    q, k = k2_qk(x, u, v, alpha)
    y, s1 = SCAN_BACKENDS[scan_backend](q, k, x, gamma, initial_state=s0,
                                        output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    c, c1 = naive_causal_conv(x, kernel, initial_state=c0, output_final_state=output_final_state,
                              cu_seqlens=cu_seqlens)
    out = torch.sigmoid(gate_logit.to(x.dtype)) * c + y
    return out, ((s1, c1) if output_final_state else None)


# --------------------------------------------------------------------------------------
# q, k and their analytic backward (PyTorch: the chunked path's; the Triton path has
# kop_triton.kernels.k2._k2_dp_kernel)
# --------------------------------------------------------------------------------------


def _normalize_fwd(p):
    """p_hat = p / max(||p||, eps) over the last axis (``F.normalize``) -> (p_hat, n, m) with
    n = max(||p||, eps) and m = (||p|| >= eps), both (..., 1): where m holds the norm divides."""
    norm = torch.linalg.vector_norm(p, dim=-1, keepdim=True)
    n = norm.clamp_min(NORM_EPS)
    return p / n, n, norm >= NORM_EPS


def _normalize_bwd(p_hat, n, m, dp_hat):
    """Backward of p_hat = p / max(||p||, eps):

        dp = (dp_hat - m * p_hat <p_hat, dp_hat>) / n

    Where the norm divides (m) the gradient loses its component along p_hat; below eps the
    divisor is the constant eps and the map is a plain scale.  m includes ||p|| == eps, where
    ``clamp_min`` passes its gradient, so this is exactly autograd through ``F.normalize``."""
    along = (p_hat * dp_hat).sum(-1, keepdim=True) * m
    return (dp_hat - p_hat * along) / n


def _qk_fwd(x, uv, alpha):
    """q, k from one projection p = x @ [u | v] (..., 2R) -> (q, k, saved for ``_qk_bwd``)."""
    R = alpha.shape[0]
    p = x @ uv
    q_hat, n_q, m_q = _normalize_fwd(p[..., :R])
    k, n_k, m_k = _normalize_fwd(p[..., R:])
    return q_hat * alpha, k, (q_hat, n_q, m_q, k, n_k, m_k)


def _qk_bwd(x, uv, alpha, saved, dq, dk):
    """-> (dp (..., 2R), duv (D, 2R), dalpha (R,)) for q = alpha * q_hat, k; the caller forms
    dx = dp @ uv^T (one product for both projections, accumulated where it is needed)."""
    q_hat, n_q, m_q, k, n_k, m_k = saved
    dalpha = (dq * q_hat).flatten(0, -2).sum(0)
    dp = torch.cat([_normalize_bwd(q_hat, n_q, m_q, dq * alpha), _normalize_bwd(k, n_k, m_k, dk)], -1)
    duv = x.flatten(0, -2).t() @ dp.flatten(0, -2)
    return dp, duv, dalpha


def k2_qk_backward(x, u, v, alpha, dq, dk):
    """Analytic backward of ``k2_qk`` (recomputed from x, in the inputs' dtype) ->
    (dx, du, dv, dalpha), what autograd through ``k2_qk`` gives.  With q_hat = normalize(x @ u):

        dalpha = sum_{b,t} dq * q_hat
        d(x @ u) = normalize_bwd(alpha * dq),   d(x @ v) = normalize_bwd(dk)
        dx = d(x @ u) @ u^T + d(x @ v) @ v^T,   du = x^T d(x @ u),   dv = x^T d(x @ v)
    """
    R = u.shape[1]
    uv = torch.cat([u, v], 1)
    _, _, saved = _qk_fwd(x, uv, alpha)
    dp, duv, dalpha = _qk_bwd(x, uv, alpha, saved, dq, dk)
    return dp @ uv.t(), duv[:, :R], duv[:, R:], dalpha


# --------------------------------------------------------------------------------------
# fused Triton path: launchers (no autograd) -> thin autograd Function
# --------------------------------------------------------------------------------------


class _TritonK2Mixer(torch.autograd.Function):
    """Autograd wrapper of ``k2_triton_forward`` / ``k2_triton_backward`` (no math here); ``seqs``
    (the ``Varlen`` of cu_seqlens, read once) and ``settings`` (``K2Settings``) kept for the backward."""

    @staticmethod
    def forward(ctx, x, u, v, alpha, gamma, kernel, gate_logit, scan_state, conv_state,
                output_final_state, cu_seqlens, seqs, settings):
        y, sT, cT, states, qkn = k2_triton_forward(x, u, v, alpha, gamma, kernel, gate_logit, scan_state,
                                                   conv_state, output_final_state, cu_seqlens,
                                                   store_chunk_states=any(ctx.needs_input_grad[:9]),
                                                   settings=settings, seqs=seqs)
        ctx.save_for_backward(x, u, v, alpha, gamma, kernel, gate_logit, scan_state, conv_state,
                              cu_seqlens, states, qkn)
        ctx.seqs, ctx.settings = seqs, settings
        ctx.set_materialize_grads(False)
        return y, sT, cT

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, dscan, dconv):
        return (*k2_triton_backward(*ctx.saved_tensors, dy, dscan, dconv, settings=ctx.settings, seqs=ctx.seqs),
                None, None, None, None)


def triton_k2_mixer(x, u, v, alpha, gamma, kernel, gate_logit, *, initial_state=None,
                    output_final_state=False, cu_seqlens=None, settings=None, seqs=None):
    """The fused Triton kernel (see ``k2_triton_backward`` for what the backward fuses).

    Computes in float32 (float64 inputs are computed in float32 and cast back); the final
    states are float32 (float64 for float64 inputs, like the references).  settings: a
    ``K2Settings`` (None: the defaults); seqs: the ``Varlen`` the argument check read from
    cu_seqlens (None: read here).
    """
    from kop_triton.kernels.seqs import as_varlen
    from kop_triton.kernels.settings import K2, K2Settings, op_settings
    settings = op_settings(settings, K2Settings, K2)
    seqs = as_varlen(cu_seqlens) if seqs is None else seqs
    s0, c0 = _split_state(initial_state)
    y, sT, cT = _TritonK2Mixer.apply(x, u, v, alpha, gamma, kernel, gate_logit, s0, c0,
                                     bool(output_final_state), cu_seqlens, seqs, settings)
    if not output_final_state:
        return y, None
    return y, (sT, cT)


def triton_unfused_k2_mixer(x, u, v, alpha, gamma, kernel, gate_logit, *, initial_state=None,
                            output_final_state=False, cu_seqlens=None, settings=None, seqs=None):
    """The unfused Triton composition (the benchmarks' comparison for the fused kernel):
    PyTorch q, k (materialised (B, T, R)), ``decayed_scan(backend="triton")``,
    ``causal_conv(backend="triton")`` (materialised (B, T, D) conv output), PyTorch gate-and-add."""
    from kop_triton.kernels.seqs import as_varlen
    from kop_triton.kernels.settings import K2, K2Settings, op_settings
    from .conv import triton_causal_conv
    from .scan import triton_decayed_scan
    settings = op_settings(settings, K2Settings, K2)
    seqs = as_varlen(cu_seqlens) if seqs is None else seqs
    s0, c0 = _split_state(initial_state)
    q, k = k2_qk(x, u, v, alpha)
    y, s1 = triton_decayed_scan(q, k, x, gamma, initial_state=s0, output_final_state=output_final_state,
                                cu_seqlens=cu_seqlens, settings=settings.scan, seqs=seqs)
    c, c1 = triton_causal_conv(x, kernel, initial_state=c0, output_final_state=output_final_state,
                               cu_seqlens=cu_seqlens, settings=settings.conv, seqs=seqs)
    out = torch.sigmoid(gate_logit.to(x.dtype)) * c + y
    return out, ((s1, c1) if output_final_state else None)


def _check_compiled_settings(settings) -> None:
    """Under torch.compile k2_mixer runs its torch.library op, which takes the default settings only."""
    from kop_triton.kernels.settings import K2
    if settings != K2:
        raise ValueError("k2_mixer(settings=...) other than the defaults (kop_triton.kernels.settings.K2) is not "
                         "supported under torch.compile: its torch.library op runs the defaults; call k2_mixer "
                         f"eagerly to run {settings}")


def k2_mixer(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor,
             gamma: torch.Tensor, kernel: torch.Tensor, gate_logit: torch.Tensor, *,
             initial_state: Optional[Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]] = None,
             output_final_state: bool = False, cu_seqlens: Optional[torch.Tensor] = None,
             backend: str = "auto", settings=None):
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
            "triton" is the fused kernel (module docstring; under ``torch.compile`` the
            torch.library op of ``kop_triton.ops.library``); "triton_unfused" composes the Triton
            scan and conv with PyTorch q/k and gating (the benchmarks' unfused comparison);
            the others compose the PyTorch references; "auto" is triton on CUDA, chunked elsewhere.
        settings: the Triton backends' tunables, a ``kop_triton.kernels.settings.K2Settings`` (None:
            its defaults, ``K2``; under ``torch.compile`` only the defaults); the others ignore it.

    Returns:
        (y, final_state): y (B, T, D) in x's dtype; final_state a tuple or None.
    """
    dev = x.device if isinstance(x, torch.Tensor) else torch.device("cpu")
    bk = resolve_backend(backend, dev, K2_BACKENDS, check_runnable=False)
    check_bool("output_final_state", output_final_state)
    if settings is not None:
        settings = check_op_settings(settings, "K2Settings")
    if bk == "triton" and torch.compiler.is_compiling():
        check_triton_runnable(bk, dev)
        if settings is not None:
            _check_compiled_settings(settings)
        # under torch.compile: the torch.library op, one opaque graph node (no graph break);
        # its eager implementation runs the argument checks, which read gamma and cu_seqlens
        from .library import k2_mixer_triton_op
        y, s1, c1 = k2_mixer_triton_op(x, u, v, alpha, gamma, kernel, gate_logit,
                                       initial_state=initial_state, cu_seqlens=cu_seqlens)
        return y, ((s1, c1) if output_final_state else None)
    seqs = _check_k2_args(x, u, v, alpha, gamma, kernel, gate_logit, initial_state, cu_seqlens,
                          "triton" if bk.startswith("triton") else bk)
    check_triton_runnable(bk, dev)          # after the argument checks: the same error for a bad call anywhere
    if bk == "triton_unfused":
        return triton_unfused_k2_mixer(x, u, v, alpha, gamma, kernel, gate_logit, initial_state=initial_state,
                                       output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                                       settings=settings, seqs=seqs)
    if bk == "triton":
        return triton_k2_mixer(x, u, v, alpha, gamma, kernel, gate_logit, initial_state=initial_state,
                               output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                               settings=settings, seqs=seqs)
    if bk == "chunked":
        # the fused chunked Function (conv folded into the scan's chunk products) where it applies
        from .k2_chunked import chunked_k2_mixer, fused_supported
        if fused_supported(x, kernel, CPU_CHUNK, cu_seqlens):
            return chunked_k2_mixer(x, u, v, alpha, gamma, kernel, gate_logit, initial_state=_split_state(initial_state),
                                    output_final_state=output_final_state)
    return reference_k2_mixer(x, u, v, alpha, gamma, kernel, gate_logit, initial_state=initial_state,
                              output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                              scan_backend=bk)
