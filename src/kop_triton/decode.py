"""The fast recurrent step of a KStackLM: its parameters prepared once, a few fused ops per layer.

``KStackLM.step`` spends its time in per-op overhead: a d_model 64 model's step is a few hundred
kFLOP, so the cost is the number of tensor ops and the Python around them.  ``StepPlan`` holds,
for one set of parameter values, everything the step derives from them (gamma, alpha, the
sigmoid gate folded into the flipped Kbase kernel, [u | v] as one matrix, the transposed
linear weights, the K0 gain folded into its norm scale), and runs one token through the stack
with about 20 ops per K2 layer, each block one TorchScript function (no Python between its ops):

    x   = rms_norm(h)                           # (B, D)
    qk  = normalize((x @ [u|v]).view(B, 2, R)) * [alpha; 1]
    S'  = gamma * S + k (outer) x               # (B, R, D), a new tensor (the old state is kept)
    win = [conv state | x]                      # (B, K, D), oldest first
    mix = q @ S' + (g * flip(kernel)) @ win     # one baddbmm
    h   = h + proj(mix);  h = h + MLP(rms_norm(h))

Without ROSA, and for the usual stack [K1, K2 x n, K1, K0], the whole step (embedding, every
pass, the final norm and a tied linear head) is one scripted module (``StepPlan.fused``, ~0.05 s
to script): no Python between the blocks.  ``StepPlan.step_lists`` runs it on states held as two
lists with nothing checked (the transformers cache's entry); ``step`` checks and wraps them.

It computes the same function as the module step (``KOperator.step``), with the same state
(``KOperatorState(scan (B, R, D), conv (B, K-1, D))`` per K2 layer and pass), so the two paths
can be mixed token by token.  There are no host synchronisations (no ``.item()``, no data-
dependent Python branches), so on CUDA the step can run asynchronously.

A plan is valid while the parameters are unchanged: ``KStackLM`` keys its cached plan on each
parameter's version counter (an optimiser step or any in-place change rebuilds it on the next
step) and drops it in ``to()`` / ``load_state_dict``.  Plans cover the inference case (no autograd, eval mode, float32
or float64 weights, autocast off); ``KStackLM.step`` uses the module path otherwise.
"""
from __future__ import annotations

import operator
import warnings
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from .modules import KOperatorState, RMS_EPS
from .ops._checks import describe
from .ops.k2 import NORM_EPS
from .rosa import RosaStream


def _t(w: torch.Tensor) -> torch.Tensor:
    """A linear weight (out, in) as the contiguous (in, out) right operand of an mm."""
    return w.detach().t().contiguous()


# Measured on the dev CPU (1 thread, (1, 64) fp32): F.rms_norm 12 us, the three ops of _inv_rms
# and a multiply 7 us; F.normalize 11 us, vector_norm + clamp + divide 5 us; the ops below are
# chosen by such timings, each computing the module's formula (rounding differences only).

class _Norm:
    """RMS normalisation as ``t = rsqrt(mean(x^2) + eps)`` (one addmm reduces and adds eps)."""
    __slots__ = ("mean_w", "eps")

    def __init__(self, d, dt, device):
        self.mean_w = torch.full((d, 1), 1.0 / d, dtype=dt, device=device)     # (D, 1)
        self.eps = torch.full((1, 1), RMS_EPS, dtype=dt, device=device)

    def inv(self, h):
        """(B, D) -> (B, 1)."""
        return torch.rsqrt(torch.addmm(self.eps, h * h, self.mean_w))


class _ScaledLinear:
    """Linear(scale * rms(h)) * post = t * (h @ (diag(scale) W^T post)) + b post: the norm scale folded in."""
    __slots__ = ("wt", "b")

    def __init__(self, lin, scale, post=1.0):
        self.wt = (scale.detach()[:, None] * lin.weight.detach().t() * post).contiguous()   # (in, out)
        self.b = lin.bias.detach() * post

    def __call__(self, h, t):
        return torch.addcmul(self.b, torch.mm(h, self.wt), t)


class _Linear:
    __slots__ = ("wt", "b")

    def __init__(self, lin, pre=1.0):
        self.wt = (lin.weight.detach().t() * pre).contiguous()
        self.b = lin.bias.detach()

    def __call__(self, x):
        return torch.addmm(self.b, x, self.wt)


_SQRT1_2 = 0.7071067811865476
_VERSION = operator.attrgetter("_version")          # a parameter's in-place version counter


class _Block:
    """A K1 or K2 block: norm1 (folded into K1's mix), the mixer, and the MLP with norm2 folded in.

    Exact GELU without F.gelu (10 us for 128 values on the dev CPU, erf + addcmul 2.6 us): with
    u' = u / sqrt(2) (scaled up-projection), gelu(u) = (u' + u' erf(u')) / sqrt(2), and the
    1 / sqrt(2) goes into the down-projection."""
    __slots__ = ("n1", "up", "down", "mix", "k2")

    def __init__(self, blk, k2):
        self.n1 = blk.norm1.scale.detach()
        self.up = _ScaledLinear(blk.mlp.up, blk.norm2.scale, post=_SQRT1_2)
        self.down = _Linear(blk.mlp.down, pre=_SQRT1_2)
        self.mix = None if k2 else _ScaledLinear(blk.mix, blk.norm1.scale)
        self.k2 = k2


class _K2:
    __slots__ = ("uv", "qk_scale", "gamma", "wg", "proj", "R", "K", "rho")

    def __init__(self, mixer, kernel, dt, rho_logit=None):
        with torch.no_grad():
            self.rho = None if rho_logit is None else torch.sigmoid(rho_logit.to(dt))   # ROSA blocks
            self.uv = torch.cat([mixer.u, mixer.v], 1).to(dt).contiguous()            # (D, 2R)
            alpha = mixer.alpha().to(dt)
            self.qk_scale = torch.stack([alpha, torch.ones_like(alpha)])              # (2, R)
            self.gamma = mixer.gamma().to(dt)[:, None].contiguous()                    # (R, 1)
            g = torch.sigmoid(mixer.gate_logit.to(dt))
            self.wg = (g * kernel.detach().to(dt).flip(0))[None, None, :].contiguous()  # (1, 1, K), oldest first
        self.proj = _Linear(mixer.proj)
        self.R, self.K = mixer.rank, kernel.shape[0]


def _k2_block(h: torch.Tensor, S: torch.Tensor, C: torch.Tensor, eps: torch.Tensor, mean_w: torch.Tensor,
              n1: torch.Tensor, uv: torch.Tensor, qk_scale: torch.Tensor, gamma: torch.Tensor, wg: torch.Tensor,
              proj_wt: torch.Tensor, proj_b: torch.Tensor, up_wt: torch.Tensor, up_b: torch.Tensor,
              down_wt: torch.Tensor, down_b: torch.Tensor,
              rosa: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One K2 block: h (B, D), scan state S (B, R, D), conv state C (B, K-1, D) -> (h, S, C);
    ``rosa``: the block's ROSA term sigmoid(rho_logit) * rosa_h (B, D), added before the projection."""
    # in-place ops on the temporaries made here (never on h, S or C): no allocation for those
    B = h.shape[0]
    t = torch.addmm(eps, h * h, mean_w).rsqrt_()                     # (B, 1): 1 / rms(h)
    x = (h * n1).mul_(t)                                              # (B, D), the mixer input
    qk = torch.mm(x, uv).view(B, 2, -1)                               # (B, 2, R): x @ [u | v]
    qk = qk.mul_(qk_scale / torch.linalg.vector_norm(qk, dim=-1, keepdim=True).clamp_min_(1e-8))   # NORM_EPS
    x3 = x.unsqueeze(1)                                               # (B, 1, D)
    # select / narrow: one view op each where indexing makes two (a full slice of dim 0 first)
    S = (S * gamma).addcmul_(qk.select(1, 1).unsqueeze(2), x3)       # gamma * S + k (outer) x
    win = torch.cat([C, x3], 1)                                       # (B, K, D), oldest first
    c = torch.bmm(wg if B == 1 else wg.expand(B, 1, wg.shape[2]), win)   # (B, 1, D): g * Kbase conv
    if B < 16:                        # + q @ S: bmm for few rows, product and sum over R for many
        mix = c.baddbmm_(qk.narrow(1, 0, 1), S).squeeze(1)           # (B = 64: 35 us vs 26 us on the dev CPU)
    else:
        mix = (qk.select(1, 0).unsqueeze(2) * S).sum(1).add_(c.squeeze(1))
    if rosa is not None:
        mix = mix + rosa
    h = torch.addmm(proj_b, mix, proj_wt).add_(h)
    t = torch.addmm(eps, h * h, mean_w).rsqrt_()
    u = torch.addcmul(up_b, torch.mm(h, up_wt), t)                    # up(norm2(h)) / sqrt(2)
    h = torch.addmm(down_b, u.addcmul_(u, torch.erf(u)), down_wt).add_(h)
    return h, S, win.narrow(1, 1, win.shape[1] - 1)


def _k1_block(h: torch.Tensor, eps: torch.Tensor, mean_w: torch.Tensor, mix_wt: torch.Tensor, mix_b: torch.Tensor,
              up_wt: torch.Tensor, up_b: torch.Tensor, down_wt: torch.Tensor, down_b: torch.Tensor) -> torch.Tensor:
    """One K1 block (token-wise): h + mix(norm1(h)), then h + MLP(norm2(h))."""
    t = torch.addmm(eps, h * h, mean_w).rsqrt_()
    h = torch.addcmul(mix_b, torch.mm(h, mix_wt), t).add_(h)
    t = torch.addmm(eps, h * h, mean_w).rsqrt_()
    u = torch.addcmul(up_b, torch.mm(h, up_wt), t)
    return torch.addmm(down_b, u.addcmul_(u, torch.erf(u)), down_wt).add_(h)


def _k0_block(h: torch.Tensor, eps: torch.Tensor, mean_w: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """K0: h + norm(h) * gain + bias (the norm scale and the gain folded into w)."""
    t = torch.addmm(eps, h * h, mean_w).rsqrt_()
    return (h + b).addcmul_(h, t * w)


_SCRIPTED = {}
assert NORM_EPS == 1e-8, "the scripted _k2_block writes NORM_EPS as a literal (TorchScript reads no float globals)"


def _blocks(script: bool):
    """The block functions, compiled by TorchScript once per process (~0.1 s) when ``script``:
    measured 1.47x less CPU time per K2 block than calling the same ops from Python (dev CPU,
    B = 1, d_model 64).  Falls back to the Python functions if TorchScript is unavailable."""
    fns = (_k2_block, _k1_block, _k0_block)
    if not script:
        return fns
    if "fns" not in _SCRIPTED:
        try:
            with warnings.catch_warnings():       # deprecated in favour of torch.compile, whose minutes of
                warnings.simplefilter("ignore", DeprecationWarning)   # compilation the first token cannot wait for
                _SCRIPTED["fns"] = tuple(torch.jit.script(f) for f in fns)
        except Exception:  # pragma: no cover - TorchScript missing or refusing: same ops from Python
            _SCRIPTED["fns"] = fns
    return _SCRIPTED["fns"]


_K2_NAMES = ("eps", "mean_w", "n1", "uv", "qk_scale", "gamma", "wg", "proj_wt", "proj_b", "up_wt", "up_b",
             "down_wt", "down_b")
_K1_NAMES = ("eps", "mean_w", "mix_wt", "mix_b", "up_wt", "up_b", "down_wt", "down_b")
_K0_NAMES = ("eps", "mean_w", "w", "b")


def _holder(cls, names, tensors):
    m = cls()
    for name, t in zip(names, tensors):
        m.register_buffer(name, t, persistent=False)
    return m


class _K2Mod(torch.nn.Module):
    """A K2 block's prepared tensors as buffers, for the scripted whole step (``_StepMod``)."""

    def forward(self, h: torch.Tensor, S: torch.Tensor, C: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _k2_block(h, S, C, self.eps, self.mean_w, self.n1, self.uv, self.qk_scale, self.gamma, self.wg,
                         self.proj_wt, self.proj_b, self.up_wt, self.up_b, self.down_wt, self.down_b, None)


class _K1Mod(torch.nn.Module):
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return _k1_block(h, self.eps, self.mean_w, self.mix_wt, self.mix_b, self.up_wt, self.up_b, self.down_wt,
                         self.down_b)


class _K0Mod(torch.nn.Module):
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return _k0_block(h, self.eps, self.mean_w, self.w, self.b)


class _StepMod(torch.nn.Module):
    """The whole step of a [K1, K2 x n, K1, K0] stack without ROSA, scripted as one TorchScript module:
    embedding (and projection), every pass of the stack, the final norm and (tied linear head) the
    logits, with no Python between the blocks.  ``forward(ids (B,), scan states, conv states)`` ->
    (logits (B, V), or the final-normed hidden state (B, D) for the other heads; new scan states;
    new conv states), the states as lists in the model's order (layer within pass)."""

    __constants__ = ["n_passes", "n_k2", "has_proj", "has_eta", "linear_head"]

    def __init__(self, plan: "StepPlan"):
        super().__init__()
        self.first = _holder(_K1Mod, _K1_NAMES, plan.args[0])
        self.k2 = torch.nn.ModuleList([_holder(_K2Mod, _K2_NAMES, a) for a in plan.args[1:-1]])
        self.last = _holder(_K1Mod, _K1_NAMES, plan.args[-1])
        self.k0 = _holder(_K0Mod, _K0_NAMES, plan.k0_args)
        self.n_passes, self.n_k2 = plan.n_passes, len(plan.k2)
        self.has_proj, self.has_eta = plan.emb_proj is not None, plan.eta is not None
        self.linear_head = plan.head_wt is not None
        empty = plan.emb.new_zeros(0)
        for name, t in (("emb", plan.emb), ("emb_proj", plan.emb_proj), ("eta", plan.eta), ("norm", plan.norm),
                        ("head_wt", plan.head_wt), ("eps", plan.nrm.eps), ("mean_w", plan.nrm.mean_w)):
            self.register_buffer(name, empty if t is None else t, persistent=False)

    def forward(self, ids: torch.Tensor, S: List[torch.Tensor],
                C: List[torch.Tensor]) -> Tuple[torch.Tensor, List[torch.Tensor], List[torch.Tensor]]:
        h = torch.embedding(self.emb, ids)
        if self.has_proj:
            h = torch.mm(h, self.emb_proj)
        S2: List[torch.Tensor] = []
        C2: List[torch.Tensor] = []
        for p in range(self.n_passes):
            g = self.first(h)
            i = p * self.n_k2
            for m in self.k2:
                g, s, c = m(g, S[i], C[i])
                S2.append(s)
                C2.append(c)
                i += 1
            g = self.k0(self.last(g))
            if self.has_eta:
                h = h + self.eta * (g - h)
            else:
                h = g
        t = torch.addmm(self.eps, h * h, self.mean_w).rsqrt_()
        if self.linear_head:
            return torch.mm(h, self.head_wt).mul_(t), S2, C2
        return h * t * self.norm, S2, C2


def _script_step(plan: "StepPlan"):
    """``_StepMod`` of the plan, scripted (~0.04 s; None if TorchScript refuses: the block path then)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.script(_StepMod(plan))
    except Exception:  # pragma: no cover - TorchScript missing or refusing
        return None


class StepPlan:
    """One token through a KStackLM with prepared parameters: ``plan.step(ids_t, state)``."""

    def __init__(self, model, script: bool = True):
        p0 = next(model.parameters())
        self.dtype = dt = p0.dtype
        self.device = p0.device
        stack = model.stack
        self.blocks: List[_Block] = []
        self.k2: List[_K2] = []
        for blk in stack.blocks:
            name = type(blk).__name__
            if name == "K2Block":
                kern = blk.mixer.get_kernel() if stack.shared_kernel is None else stack.shared_kernel
                self.blocks.append(_Block(blk, True))
                self.k2.append(_K2(blk.mixer, kern, dt, getattr(blk, "rho_logit", None)))
            elif name == "K1Block":
                self.blocks.append(_Block(blk, False))
            else:                                                     # K0: h + norm(h) * gain + bias
                self.k0_w = (blk.norm.scale * blk.gain).detach()
                self.k0_b = blk.bias.detach()
        self.emb = model.emb.weight.detach()
        self.emb_proj = None if isinstance(model.emb_proj, torch.nn.Identity) else _t(model.emb_proj.weight)
        self.norm = model.norm.scale.detach()
        self.eta = None if model.eta_logit is None else torch.sigmoid(model.eta_logit.detach())
        self.n_passes = model.n_passes
        self.rosa = model.config.rosa != "off"
        self.rosa_step = model._rosa_step            # (rosa_h, RosaStream) for the new tokens
        self.D = model.config.d_model
        self.head = model.logits_from_hidden
        self.nrm = _Norm(self.D, dt, self.device)
        self.head_wt = None
        if model.config.head == "linear" and self.emb_proj is None:
            self.head_wt = (self.norm[:, None] * self.emb.t()).contiguous()          # (D, V)
        self.params = [p for p in model.parameters()]
        self.versions = self.version_key()
        self.k2_fn, self.k1_fn, self.k0_fn = _blocks(script)
        n = self.nrm
        self.args = []                # per block: the tensors its function takes after h (and the states)
        i = 0
        for blk in self.blocks:
            if blk.k2:
                m = self.k2[i]
                i += 1
                self.args.append((n.eps, n.mean_w, blk.n1, m.uv, m.qk_scale, m.gamma, m.wg, m.proj.wt, m.proj.b,
                                  blk.up.wt, blk.up.b, blk.down.wt, blk.down.b))
            else:
                self.args.append((n.eps, n.mean_w, blk.mix.wt, blk.mix.b, blk.up.wt, blk.up.b, blk.down.wt,
                                  blk.down.b))
        self.k0_args = (n.eps, n.mean_w, self.k0_w, self.k0_b)
        self.fused = None             # the whole step as one scripted module (no ROSA, the usual stack)
        if script and not self.rosa and [b.k2 for b in self.blocks] == [False] + [True] * len(self.k2) + [False]:
            self.fused = _script_step(self)
        self.fused_forward = None if self.fused is None else self.fused.forward   # skips nn.Module.__call__

    def version_key(self):
        return tuple(map(_VERSION, self.params))

    def _stack(self, h, states, out, rosa_h):
        i = 0
        for blk, args in zip(self.blocks, self.args):
            if blk.k2:
                S, C = states[i]
                rho = self.k2[i].rho
                h, S, C = self.k2_fn(h, S, C, *args, None if rho is None else rho * rosa_h)
                out.append(KOperatorState(S, C))
                i += 1
            else:
                h = self.k1_fn(h, *args)
        return self.k0_fn(h, *self.k0_args)

    def check(self, state, B):
        """The model state (zeros when None), its length and shapes checked (a few tuple compares);
        a ROSA model's RosaStream (the last entry) is left to ``KStackLM._rosa_step``."""
        if self.rosa and state is not None and len(state) and isinstance(state[-1], RosaStream):
            state = state[:-1]
        if state is None:
            return tuple(KOperatorState(torch.zeros(B, m.R, self.D, dtype=self.dtype, device=self.device),
                                        torch.zeros(B, m.K - 1, self.D, dtype=self.dtype, device=self.device))
                         for m in self.k2 * self.n_passes)
        if not isinstance(state, (tuple, list)) or len(state) != len(self.k2) * self.n_passes:
            raise ValueError(f"state must be a tuple of {len(self.k2) * self.n_passes} KOperatorState (one per "
                             f"K2 layer and pass), got {describe(state)}")
        for i, s in enumerate(state):
            m = self.k2[i % len(self.k2)]
            if (not isinstance(s, (tuple, list)) or len(s) != 2 or s[0].shape != (B, m.R, self.D)
                    or s[1].shape != (B, m.K - 1, self.D)):
                got = (f"{describe(s[0])} and {describe(s[1])}" if isinstance(s, (tuple, list)) and len(s) == 2
                       else describe(s))
                raise ValueError(f"state[{i}] must be a KOperatorState with scan {(B, m.R, self.D)} and conv "
                                 f"{(B, m.K - 1, self.D)}, got {got}")
        return state

    def step_lists(self, ids_t: torch.Tensor, scan: List[torch.Tensor],
                   conv: List[torch.Tensor]) -> Tuple[torch.Tensor, List[torch.Tensor], List[torch.Tensor]]:
        """The step on states held as two lists (scan states, conv states; one per K2 layer and pass),
        nothing checked: ids_t (B,) -> (logits (B, V), new scan states, new conv states).  For
        callers that keep the state themselves between tokens (the transformers cache); needs
        ``fused`` (no ROSA)."""
        out, scan, conv = self.fused_forward(ids_t, scan, conv)
        return (out if self.head_wt is not None else self.head(out)), scan, conv

    def step(self, ids_t: torch.Tensor, state) -> Tuple[torch.Tensor, tuple]:
        """ids_t (B,) -> (logits (B, V), new state), as ``KStackLM.step``."""
        if self.fused is not None:
            state = self.check(state, ids_t.shape[0])
            logits, scan, conv = self.step_lists(ids_t, [s[0] for s in state], [s[1] for s in state])
            return logits, tuple(map(KOperatorState, scan, conv))
        rosa_h = stream = None
        if self.rosa:
            rosa_h, stream = self.rosa_step(ids_t, state)             # (B, D), the stream advanced
        state = self.check(state, ids_t.shape[0])
        h = F.embedding(ids_t, self.emb)                              # (B, E)
        if self.emb_proj is not None:
            h = torch.mm(h, self.emb_proj)                            # (B, D)
        n = len(self.k2)
        new: list = []
        for p in range(self.n_passes):
            h_new = self._stack(h, state[p * n:(p + 1) * n], new, rosa_h)
            h = h_new if self.eta is None else h + self.eta * (h_new - h)
        if stream is not None:
            new.append(stream)
        t = self.nrm.inv(h)
        if self.head_wt is not None:                                  # tied head, E = D: final norm folded in
            return torch.mm(h, self.head_wt) * t, tuple(new)
        return self.head(h * t * self.norm), tuple(new)
