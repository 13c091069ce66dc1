"""Causal Kbase convolution: y_t = sum_{l<K} weight[l] * x_{t-l}  (tap 0 = current token).

Shapes: x (B, T, D); weight (K,) shared by every channel (the paper's Kbase) or (D, K)
per channel (depthwise); states (N, K-1, D) = the K-1 inputs before t = 0, oldest first,
float32 (float64 for float64 inputs). ``final_state`` has the same layout, so consecutive
pieces of a stream chain exactly.

Backends (same signature, same return tuple ``(y, final_state)``):
  naive   ``F.conv1d`` on the input left-padded with the initial state: the ground truth
  triton  the Triton kernels in ``kop_triton.kernels.conv``: K taps per output tile for short
          or per-channel kernels, a blocked Toeplitz product on tensor cores (tl.dot) for shared
          kernels of more than 32 taps, O(T*K*D) either way; backward for x, weight and
          initial_state without atomics (weight partials per time block, summed in fixed order)
  auto    triton on CUDA tensors, naive elsewhere (``F.conv1d`` is the fast CPU path)
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ._checks import (check_bool, check_cu_seqlens, check_op_settings, check_same_device, check_tensor,
                      check_triton_runnable, describe, per_sequence, resolve_backend, state_dtype)

MAX_KERNEL_SIZE = 4096
CONV_BACKENDS = ("auto", "triton", "naive")


def naive_causal_conv(x, weight, *, initial_state=None, output_final_state=False, cu_seqlens=None):
    """``F.conv1d`` (depthwise, flipped taps) on x left-padded by the K-1 previous inputs."""
    if cu_seqlens is not None:
        return per_sequence(naive_causal_conv, (x,), (weight,), initial_state, output_final_state, cu_seqlens)
    dt = state_dtype(x)
    B, T, D = x.shape
    K = weight.shape[-1]
    w = weight.to(dt).expand(D, K) if weight.dim() == 1 else weight.to(dt)
    h0 = (torch.zeros(B, K - 1, D, dtype=dt, device=x.device) if initial_state is None
          else initial_state.to(dt))
    xp = torch.cat([h0, x.to(dt)], dim=1)                          # (B, K-1+T, D)
    if T == 0:
        y = xp.new_zeros(B, 0, D) + w.sum() * 0                    # keeps the graph to weight
    else:
        y = F.conv1d(xp.transpose(1, 2), w.flip(-1).unsqueeze(1), groups=D).transpose(1, 2)
    final = xp[:, xp.shape[1] - (K - 1):] if output_final_state else None
    return y.to(x.dtype), final


class _TritonCausalConv(torch.autograd.Function):
    """Autograd wrapper of the launchers in ``kop_triton.kernels.conv`` (no math here); ``seqs`` (the
    ``Varlen`` of cu_seqlens, read once) and ``settings`` (``ConvSettings``) are kept for the backward."""

    @staticmethod
    def forward(ctx, x, weight, initial_state, output_final_state, cu_seqlens, seqs, settings):
        from kop_triton.kernels.conv import conv_fwd
        y, final = conv_fwd(x, weight, initial_state, output_final_state, seqs, settings=settings)
        ctx.save_for_backward(x, weight, initial_state, cu_seqlens)
        ctx.seqs, ctx.settings = seqs, settings
        return y, final

    @staticmethod
    def backward(ctx, dy, dfinal):
        from kop_triton.kernels.conv import conv_bwd_dw, conv_bwd_dx
        x, weight, h0, cu = ctx.saved_tensors
        K = weight.shape[-1]
        dx = dw = dh0 = None
        need_x, need_w, need_h0 = ctx.needs_input_grad[:3]
        if dy is None:
            dy = torch.zeros_like(x)
        if need_x or need_h0:
            dx, dh0 = conv_bwd_dx(dy, weight, dfinal, need_h0, ctx.seqs, x.dtype,
                                  None if h0 is None else h0.dtype, settings=ctx.settings)
        if need_w:
            dw = conv_bwd_dw(x, h0, dy, K, weight.dim() == 1, ctx.seqs, settings=ctx.settings).to(weight.dtype)
        return (dx if need_x else None), dw, (dh0 if need_h0 else None), None, None, None, None


def triton_causal_conv(x, weight, *, initial_state=None, output_final_state=False, cu_seqlens=None,
                       settings=None, seqs=None):
    """The Triton kernels (taps for short or per-channel kernels, a blocked Toeplitz product on
    tensor cores for long shared kernels); forward and backward for x, weight and initial_state.
    settings: a ``ConvSettings`` (None: the defaults); seqs: the ``Varlen`` the argument check read
    from cu_seqlens (None: read here)."""
    from kop_triton.kernels.seqs import as_varlen
    from kop_triton.kernels.settings import CONV, ConvSettings, op_settings
    settings = op_settings(settings, ConvSettings, CONV)
    seqs = as_varlen(cu_seqlens) if seqs is None else seqs
    y, final = _TritonCausalConv.apply(x, weight, initial_state, bool(output_final_state), cu_seqlens, seqs, settings)
    return y, (final if output_final_state else None)


def _check_conv_args(x, weight, initial_state, cu_seqlens, seqs=None):
    """-> the ``Varlen`` of cu_seqlens (None without): its one host read (``check_cu_seqlens``; ``seqs``:
    already read by an earlier check of the same call)."""
    check_tensor("x", x, 3, "(B, T, D)")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a tensor of shape (K,) or (D, K), got {describe(weight)}")
    if weight.dim() not in (1, 2) or not weight.is_floating_point():
        raise ValueError(f"weight must be a floating tensor of shape (K,) or (D, K), got {describe(weight)}")
    check_same_device(x=x, weight=weight, initial_state=initial_state)
    B, T, D = x.shape
    K = weight.shape[-1]
    if weight.dim() == 2 and weight.shape[0] != D:
        raise ValueError(f"weight of shape (D, K) must have D = {D} rows to match x, got {describe(weight)}")
    if not 1 <= K <= MAX_KERNEL_SIZE:
        raise ValueError(f"weight must have 1 <= K <= {MAX_KERNEL_SIZE} taps, got {describe(weight)}")
    seqs = check_cu_seqlens(cu_seqlens, B, T, x.device, seqs)
    N = B if seqs is None else seqs.N
    if initial_state is not None:
        if initial_state.dtype not in (torch.float32, torch.float64):   # states are fp32 (fp64), as decayed_scan's
            raise TypeError(f"initial_state must be a float tensor of dtype float32 (or float64) and shape "
                            f"(N, K-1, D), got {describe(initial_state)}")
        want = (N, K - 1, D)
        if tuple(initial_state.shape) != want:
            raise ValueError(f"initial_state must have shape (N, K-1, D) = {want}, got {describe(initial_state)}")
    return seqs


def causal_conv(x: torch.Tensor, weight: torch.Tensor, *, initial_state: Optional[torch.Tensor] = None,
                output_final_state: bool = False, cu_seqlens: Optional[torch.Tensor] = None,
                backend: str = "auto", settings=None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Causal convolution with a shared (K,) or per-channel (D, K) kernel.

    Args:
        x: (B, T, D).  weight: (K,) or (D, K), tap 0 multiplies the current token.
        initial_state: optional (N, K-1, D), the K-1 inputs before t = 0, oldest first.
        output_final_state: also return the last K-1 inputs, (N, K-1, D).
        cu_seqlens: optional (N+1,) offsets of packed sequences in a B = 1 batch.
        backend: "auto" | "triton" | "naive".
        settings: the Triton backend's tunables, a ``kop_triton.kernels.settings.ConvSettings``
            (None: its defaults, ``CONV``); the naive backend ignores it.

    Returns:
        (y, final_state): y (B, T, D) in x's dtype; final_state None unless asked for.
    """
    dev = x.device if isinstance(x, torch.Tensor) else torch.device("cpu")
    bk = resolve_backend(backend, dev, CONV_BACKENDS, cpu_default="naive", check_runnable=False)
    seqs = _check_conv_args(x, weight, initial_state, cu_seqlens)
    check_bool("output_final_state", output_final_state)
    settings = check_op_settings(settings, "ConvSettings")
    check_triton_runnable(bk, dev)          # after the argument checks: the same error for a bad call anywhere
    if bk == "triton":
        return triton_causal_conv(x, weight, initial_state=initial_state, output_final_state=output_final_state,
                                  cu_seqlens=cu_seqlens, settings=settings, seqs=seqs)
    return naive_causal_conv(x, weight, initial_state=initial_state, output_final_state=output_final_state,
                             cu_seqlens=cu_seqlens)
