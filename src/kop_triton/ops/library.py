"""torch.library registration of the fused Triton K2 mixer, so ``torch.compile(fullgraph=True)``
keeps it in the graph as one opaque op (a fake implementation gives the output shapes for
tracing, a registered autograd formula the backward) instead of breaking the graph at the
Triton launch.  ``kop_triton.ops.k2.k2_mixer(backend="triton")`` calls it while compiling;
eager code calls the autograd Function of ``ops/k2.py`` directly (no dispatcher overhead).

Ops (namespace ``kop_triton``), thin wrappers of the launchers of ``kop_triton.ops.k2``:
  k2_mixer_fwd(x, u, v, alpha, gamma, kernel, gate_logit, scan_state?, conv_state?, cu_seqlens?,
               store_chunk_states)
      -> (y (B, T, D), scan_final (N, R, D), conv_final (N, K-1, D), chunk_states (NCP, R, D),
          qkn (B*T*(3R+2) or 0,))
      ``k2_triton_forward``.  chunk_states: the float32 scan state entering every 64-token
      chunk, in the layout of ``kop_triton.kernels.scan``, followed by zero rows up to a count
      that depends on shapes only (the fake implementation must know it without reading
      cu_seqlens): NCP = B * ceil(T / 64) (exact), or with N packed sequences
      ceil(T / 64) + N - 1 >= sum_n ceil(len_n / 64); NCP = 0 unless ``store_chunk_states``.
      qkn: the planes q, k and [q_hat, norms] of every token, flat (float32; empty unless
      ``store_chunk_states``; ``kop_triton.kernels.k2.qk_planes``).
      Neither is differentiable; both are saved for the backward.
  k2_mixer_bwd(x, u, v, alpha, gamma, kernel, gate_logit, scan_state?, conv_state?, cu_seqlens?,
               chunk_states, qkn, dy, dscan, dconv)
      -> [dx, du, dv, dalpha, dgamma, dkernel, dgate_logit, dscan_state, dconv_state]
      ``k2_triton_backward`` on the forward's chunk states (no forward is recomputed); an
      empty tensor stands for the gradient of an absent initial state.
Argument checks run inside the forward op (eagerly, where data-dependent checks are allowed).
"""
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ._checks import state_dtype
from kop_triton.kernels.config import CHUNK

from .k2_triton import _check_k2_args, _split_state, k2_triton_backward, k2_triton_forward

__all__ = ["k2_mixer_triton_op"]


def _n_seqs(x: Tensor, cu_seqlens: Optional[Tensor]):
    return x.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1


def _padded_chunk_rows(x: Tensor, cu_seqlens: Optional[Tensor]):
    """NCP, the op's chunk_states rows: from shapes only.  Packed sequences (each >= 1 token)
    need sum_n ceil(len_n / 64) <= ceil(T / 64) + N - 1 rows (ceil(a) + ceil(b) <= ceil(a + b) + 1)."""
    n_t = (x.shape[1] + CHUNK - 1) // CHUNK
    return x.shape[0] * n_t if cu_seqlens is None else n_t + cu_seqlens.shape[0] - 2


def _chunk_rows(x: Tensor, cu_seqlens: Optional[Tensor]) -> int:
    """The rows the kernels fill (eager only: reads cu_seqlens)."""
    if cu_seqlens is None:
        return _padded_chunk_rows(x, None)
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    return int(((lens + CHUNK - 1) // CHUNK).sum())


@torch.library.custom_op("kop_triton::k2_mixer_fwd", mutates_args=())
def k2_mixer_fwd(x: Tensor, u: Tensor, v: Tensor, alpha: Tensor, gamma: Tensor, kernel: Tensor,
                 gate_logit: Tensor, scan_state: Optional[Tensor], conv_state: Optional[Tensor],
                 cu_seqlens: Optional[Tensor], store_chunk_states: bool
                 ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    seqs = _check_k2_args(x, u, v, alpha, gamma, kernel, gate_logit, (scan_state, conv_state), cu_seqlens, "triton")
    y, s1, c1, states, qkn = k2_triton_forward(x, u, v, alpha, gamma, kernel, gate_logit, scan_state, conv_state,
                                          True, cu_seqlens, store_chunk_states, seqs=seqs)
    R, D = u.shape[1], x.shape[-1]
    if states is None:
        states = x.new_empty((0, R, D), dtype=torch.float32)
        qkn = x.new_empty((0,), dtype=torch.float32)
    pad = _padded_chunk_rows(x, cu_seqlens) - states.shape[0]
    if store_chunk_states and pad > 0:
        states = torch.cat([states, states.new_zeros(pad, R, D)])
    return y, s1, c1, states, qkn


@k2_mixer_fwd.register_fake
def _(x, u, v, alpha, gamma, kernel, gate_logit, scan_state, conv_state, cu_seqlens, store_chunk_states):
    N, D, R, K = _n_seqs(x, cu_seqlens), x.shape[-1], u.shape[-1], kernel.shape[-1]
    dt = state_dtype(x)
    rows = _padded_chunk_rows(x, cu_seqlens) if store_chunk_states else 0
    tokens = x.shape[0] * x.shape[1] if store_chunk_states else 0
    return (x.new_empty(x.shape), x.new_empty((N, R, D), dtype=dt), x.new_empty((N, K - 1, D), dtype=dt),
            x.new_empty((rows, R, D), dtype=torch.float32), x.new_empty((tokens * (3 * R + 2),), dtype=torch.float32))


@torch.library.custom_op("kop_triton::k2_mixer_bwd", mutates_args=())
def k2_mixer_bwd(x: Tensor, u: Tensor, v: Tensor, alpha: Tensor, gamma: Tensor, kernel: Tensor,
                 gate_logit: Tensor, scan_state: Optional[Tensor], conv_state: Optional[Tensor],
                 cu_seqlens: Optional[Tensor], chunk_states: Tensor, qkn: Tensor, dy: Tensor, dscan: Tensor,
                 dconv: Tensor) -> List[Tensor]:
    states = chunk_states[:_chunk_rows(x, cu_seqlens)]
    grads = k2_triton_backward(x, u, v, alpha, gamma, kernel, gate_logit, scan_state, conv_state,
                               cu_seqlens, states, qkn, dy, dscan, dconv)
    empty = x.new_empty((0,), dtype=torch.float32)        # the gradient of an absent initial state
    return [empty.clone() if g is None else g.contiguous() for g in grads]


@k2_mixer_bwd.register_fake
def _(x, u, v, alpha, gamma, kernel, gate_logit, scan_state, conv_state, cu_seqlens, chunk_states,
      qkn, dy, dscan, dconv):
    grads = [t.new_empty(t.shape) for t in (x, u, v, alpha, gamma, kernel, gate_logit)]
    for s in (scan_state, conv_state):
        grads.append(x.new_empty((0,), dtype=torch.float32) if s is None else s.new_empty(s.shape))
    return grads


def _setup_context(ctx, inputs, output):
    x, u, v, alpha, gamma, kernel, gate_logit, scan_state, conv_state, cu_seqlens, store = inputs
    chunk_states, qkn = output[3], output[4]
    ctx.mark_non_differentiable(chunk_states, qkn)
    ctx.stored = store
    ctx.save_for_backward(x, u, v, alpha, gamma, kernel, gate_logit, scan_state, conv_state, cu_seqlens,
                          chunk_states, qkn)


def _backward(ctx, dy, dscan, dconv, _dchunk_states, _dqkn):
    if not ctx.stored:
        raise RuntimeError("kop_triton::k2_mixer_fwd ran with store_chunk_states=False, so it cannot "
                           "be differentiated (k2_mixer_triton_op sets it when a gradient is needed)")
    *inputs, chunk_states, qkn = ctx.saved_tensors
    g = k2_mixer_bwd(*inputs, chunk_states, qkn, dy, dscan, dconv)
    ds = g[7] if inputs[7] is not None else None
    dc = g[8] if inputs[8] is not None else None
    return (*g[:7], ds, dc, None, None)


k2_mixer_fwd.register_autograd(_backward, setup_context=_setup_context)


def k2_mixer_triton_op(x, u, v, alpha, gamma, kernel, gate_logit, *, initial_state=None,
                       cu_seqlens=None):
    """The fused Triton K2 mixer as a compile-friendly op: returns (y, scan_final, conv_final).

    Same arguments as ``kop_triton.k2_mixer`` (backend fixed to "triton"; final states are
    always returned).  ``initial_state`` is None or a (scan_state, conv_state) pair whose entries
    may be None.  The chunk states for the backward are stored only when grad mode is on and an
    input requires a gradient.
    """
    s0, c0 = _split_state(initial_state)
    gate = gate_logit.reshape(()) if isinstance(gate_logit, Tensor) else gate_logit
    tensors = (x, u, v, alpha, gamma, kernel, gate, s0, c0)
    need = torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in tensors)
    y, s1, c1, _, _ = k2_mixer_fwd(x, u, v, alpha, gamma, kernel, gate, s0, c0, cu_seqlens, need)
    return y, s1, c1
