"""torch.library registration of the fused Triton K2 mixer, so ``torch.compile(fullgraph=True)``
keeps it in the graph as one opaque op (with a fake/meta implementation for tracing and an
autograd formula) instead of breaking the graph at the Triton launch.

Ops (namespace ``kop_triton``):
  k2_mixer_fwd(x, u, v, alpha, gamma, kernel, gate_logit, scan_state?, conv_state?, cu_seqlens?)
      -> (y (B, T, D), final scan state (N, R, D), final conv state (N, K-1, D))
  k2_mixer_bwd(same inputs..., dy, dscan, dconv) -> gradients of the seven tensor inputs and of
      the two initial states (an empty tensor where an initial state was not given)

The backward op recomputes the forward of ``kop_triton.ops.k2.k2_mixer(backend="triton")``
under autograd and differentiates it: the Triton autograd Function does the real work, this
layer only makes it visible to the compiler.  The price is one extra fused forward per backward
(the op cannot hand the Function's saved chunk states across the op boundary), which is why
``KOperator`` uses this op only while compiling and calls ``k2_mixer`` directly in eager mode.
Argument checks run inside the op (eagerly, where data-dependent checks are allowed).
"""
import contextlib
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ._checks import state_dtype
from .k2 import k2_mixer

__all__ = ["k2_mixer_triton_op"]


def _n_seqs(x: Tensor, cu_seqlens: Optional[Tensor]):
    return x.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1


@torch.library.custom_op("kop_triton::k2_mixer_fwd", mutates_args=())
def k2_mixer_fwd(x: Tensor, u: Tensor, v: Tensor, alpha: Tensor, gamma: Tensor, kernel: Tensor,
                 gate_logit: Tensor, scan_state: Optional[Tensor], conv_state: Optional[Tensor],
                 cu_seqlens: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    with torch.no_grad():
        y, (s1, c1) = k2_mixer(x, u, v, alpha, gamma, kernel, gate_logit,
                               initial_state=(scan_state, conv_state), output_final_state=True,
                               cu_seqlens=cu_seqlens, backend="triton")
    # custom ops may not return views of their inputs
    return y.clone() if y._base is not None else y, s1.clone(), c1.clone()


@k2_mixer_fwd.register_fake
def _(x, u, v, alpha, gamma, kernel, gate_logit, scan_state, conv_state, cu_seqlens):
    N, D, R, K = _n_seqs(x, cu_seqlens), x.shape[-1], u.shape[-1], kernel.shape[-1]
    dt = state_dtype(x)
    return (torch.empty_like(x), x.new_empty((N, R, D), dtype=dt), x.new_empty((N, K - 1, D), dtype=dt))


_AUTOGRAD_KEYS = (torch._C.DispatchKey.AutogradFunctionality, torch._C.DispatchKey.ADInplaceOrView,
                  torch._C.DispatchKey.AutogradOther, torch._C.DispatchKey.AutogradNestedTensor)


@contextlib.contextmanager
def _autograd_inside_op():
    """A custom op's implementation runs below the autograd dispatch keys (they are in the
    thread's exclude set, and the autograd engine carries that set into nested backward calls);
    lift them so the Triton autograd Function can be re-run and differentiated in here."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in _AUTOGRAD_KEYS:
        exclude = exclude.remove(key)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude):
        with torch.enable_grad():
            yield


@torch.library.custom_op("kop_triton::k2_mixer_bwd", mutates_args=())
def k2_mixer_bwd(x: Tensor, u: Tensor, v: Tensor, alpha: Tensor, gamma: Tensor, kernel: Tensor,
                 gate_logit: Tensor, scan_state: Optional[Tensor], conv_state: Optional[Tensor],
                 cu_seqlens: Optional[Tensor], dy: Tensor, dscan: Tensor, dconv: Tensor) -> List[Tensor]:
    params = [t.detach().requires_grad_(True) for t in (x, u, v, alpha, gamma, kernel, gate_logit)]
    states = [None if s is None else s.detach().requires_grad_(True) for s in (scan_state, conv_state)]
    with _autograd_inside_op():
        y, (s1, c1) = k2_mixer(*params, initial_state=tuple(states), output_final_state=True,
                               cu_seqlens=cu_seqlens, backend="triton")
        inputs = params + [s for s in states if s is not None]
        grads = list(torch.autograd.grad((y, s1, c1), inputs, (dy, dscan, dconv), allow_unused=True))
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads)]
    out, rest = grads[:7], iter(grads[7:])
    for s in states:   # an absent initial state gets an empty placeholder gradient
        out.append(next(rest) if s is not None else x.new_empty((0,), dtype=torch.float32))
    return out


@k2_mixer_bwd.register_fake
def _(x, u, v, alpha, gamma, kernel, gate_logit, scan_state, conv_state, cu_seqlens, dy, dscan, dconv):
    grads = [torch.empty_like(t) for t in (x, u, v, alpha, gamma, kernel, gate_logit)]
    for s in (scan_state, conv_state):
        grads.append(torch.empty_like(s) if s is not None else x.new_empty((0,), dtype=torch.float32))
    return grads


def _setup_context(ctx, inputs, output):
    x, u, v, alpha, gamma, kernel, gate_logit, scan_state, conv_state, cu_seqlens = inputs
    ctx.has_state = (scan_state is not None, conv_state is not None)
    ctx.save_for_backward(x, u, v, alpha, gamma, kernel, gate_logit, scan_state, conv_state, cu_seqlens)


def _backward(ctx, dy, dscan, dconv):
    x, u, v, alpha, gamma, kernel, gate_logit, scan_state, conv_state, cu_seqlens = ctx.saved_tensors
    g = k2_mixer_bwd(x, u, v, alpha, gamma, kernel, gate_logit, scan_state, conv_state, cu_seqlens,
                     dy, dscan, dconv)
    ds = g[7] if ctx.has_state[0] else None
    dc = g[8] if ctx.has_state[1] else None
    return (*g[:7], ds, dc, None)


k2_mixer_fwd.register_autograd(_backward, setup_context=_setup_context)


def k2_mixer_triton_op(x, u, v, alpha, gamma, kernel, gate_logit, *, initial_state=None,
                       cu_seqlens=None):
    """The fused Triton K2 mixer as a compile-friendly op: returns (y, scan_final, conv_final).

    Same arguments as ``kop_triton.k2_mixer`` (backend fixed to "triton"; final states are
    always returned).  ``initial_state`` is None or a (scan_state, conv_state) pair whose entries
    may be None.
    """
    if initial_state is None:
        s0 = c0 = None
    elif isinstance(initial_state, (tuple, list)) and len(initial_state) == 2:
        s0, c0 = initial_state
    else:
        raise TypeError(f"initial_state must be a (scan_state, conv_state) pair, got {type(initial_state).__name__}")
    gate = gate_logit.reshape(()) if isinstance(gate_logit, Tensor) else gate_logit
    return k2_mixer_fwd(x, u, v, alpha, gamma, kernel, gate, s0, c0, cu_seqlens)
