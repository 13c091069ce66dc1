"""Modules: the KOperator sequence mixer and the blocks of the K-Stack (SPEC sections 1-2).

``KOperator`` is a drop-in causal sequence mixer, (B, T, D) -> (B, T, D):

    q_t = alpha * normalize(x_t @ u),  k_t = normalize(x_t @ v)
    S_t = gamma * S_{t-1} + k_t (outer) x_t,   y_t = q_t @ S_t
    c_t = sum_l kernel[l] * x_{t-l}
    out_t = proj(sigmoid(gate_logit) * c_t + y_t)

with gamma = gamma_min + (gamma_max - gamma_min) * sigmoid(decay_logit) and
alpha = alpha_cap * sigmoid(alpha_logit).  The recurrent state of one mixer is a
``KOperatorState(scan, conv)``: scan (B, R, D) and conv (B, K-1, D, the last K-1 inputs,
oldest first), both float32 (float64 for float64 inputs).  It is a plain named tuple of
tensors, so it passes through ``torch.compile`` and can be sliced or moved like a tensor pair.
"""
from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ops._checks import check_backend, check_bool, check_int, check_real, describe, resolve_backend, state_dtype
from .ops.conv import MAX_KERNEL_SIZE
from .ops.k2 import NORM_EPS, k2_mixer, k2_qk

RMS_EPS = 1e-8
INIT_STD = 0.02


class KOperatorState(NamedTuple):
    """Recurrent state of one KOperator: scan (B, R, D) and conv (B, K-1, D), float32."""
    scan: torch.Tensor
    conv: torch.Tensor


def init_decay_logit(rank: int, gamma_min: float, gamma_max: float) -> torch.Tensor:
    """Log-spaced time constants between 1/(1-gamma_min) and 1/(1-gamma_max) (SPEC section 1)."""
    tau_low = 1.0 / max(1.0 - gamma_min, 1e-6)
    tau_high = 1.0 / max(1.0 - min(gamma_max, 1.0 - 1e-6), 1e-6)
    tau = torch.logspace(math.log10(tau_low), math.log10(tau_high), rank, dtype=torch.float64)
    gamma = 1.0 - 1.0 / tau
    p = ((gamma - gamma_min) / (gamma_max - gamma_min)).clamp(1e-6, 1.0 - 1e-6)
    return torch.log(p / (1.0 - p)).float()


def init_kernel(kernel_size: int) -> torch.Tensor:
    """exp(-0.15 * lag), normalised to sum 1 (tap 0 = current token)."""
    w = torch.exp(-0.15 * torch.arange(kernel_size, dtype=torch.float64))
    return (w / w.sum()).float()


def _autocast_input(x: torch.Tensor, param_dtype: torch.dtype, name: str) -> torch.Tensor:
    """Under autocast, run the mixer in the autocast dtype (fp32 states are kept inside); without
    autocast the input must have the parameters' dtype (a TypeError naming both otherwise)."""
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (token features; embed token ids first, e.g. "
                        f"with nn.Embedding), got dtype {x.dtype}")
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return x.to(torch.get_autocast_dtype(dev)) if x.dtype == torch.float32 else x
    if x.dtype != param_dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but this KOperator's parameters are {param_dtype}; cast the "
                        f"input ({name}.to({param_dtype})) or the module (.to({x.dtype})), or run under "
                        f"torch.autocast for a {x.dtype} mixer with {param_dtype} weights")
    return x


def _check_state(state, want_s: tuple, want_c: tuple, name: str = "state") -> None:
    """A KOperatorState (scan, conv) of tensors with the given shapes, else a TypeError / ValueError."""
    if not isinstance(state, (tuple, list)) or len(state) != 2 or not all(isinstance(t, torch.Tensor) for t in state):
        raise TypeError(f"{name} must be a KOperatorState (scan {want_s}, conv {want_c}) of two tensors, "
                        f"got {describe(state)}")
    S, C = state
    if tuple(S.shape) != want_s or tuple(C.shape) != want_c:
        raise ValueError(f"{name} must hold scan {want_s} and conv {want_c}, got {describe(S)} and {describe(C)}")


class KOperator(nn.Module):
    """Causal K2 sequence mixer (SPEC section 1), parallel form and O(1) recurrent step.

    Args:
        d_model: D, the channel width.
        rank: R, number of decayed key channels.
        kernel_size: K, taps of the causal Kbase kernel (ignored when ``shared_kernel`` is given).
        gamma_min, gamma_max: range of the learned decays, 0 < gamma_min < gamma_max <= 1.
        alpha_cap: alpha = alpha_cap * sigmoid(alpha_logit), alpha_cap > 0.
        shared_kernel: optional (K,) Parameter owned by an enclosing module (a stack sharing one
            kernel across layers); it is used, not registered here.  An owner wrapped by
            something that swaps parameter objects (FSDP2) should instead pass its kernel at
            call time, ``forward(..., kernel=...)`` / ``step(..., kernel=...)``, as KStack does.
        backend: "auto" (fused Triton on CUDA, chunked PyTorch elsewhere), "triton", "chunked",
            "recurrent" or "naive".  With "triton" ``k2_mixer`` runs the Triton autograd
            Function directly in eager mode and the torch.library op of
            ``kop_triton.ops.library`` while ``torch.compile`` traces (no graph break).

    ``forward(x, state=None, return_state=False)`` maps (B, T, D) -> (B, T, D); with
    ``return_state`` it returns ``(y, KOperatorState)``.  ``step(x_t, state)`` advances one
    token, (B, D) -> (B, D), in O(1) time and memory.  Under autocast the mixer runs in the
    autocast dtype with float32 states; the output projection follows autocast.
    """

    # ``kop_triton.context_parallel.enable`` sets a ContextParallel here: its ``k2_mixer`` (same
    # signature) then runs instead of ``k2_mixer``, exchanging states with the other ranks of a sequence
    context_parallel = None

    def __init__(self, d_model: int, rank: int = 16, kernel_size: int = 8, gamma_min: float = 0.05,
                 gamma_max: float = 1.0, alpha_cap: float = 1.0,
                 shared_kernel: Optional[nn.Parameter] = None, backend: str = "auto"):
        super().__init__()
        check_int("d_model", d_model, low=1)
        check_int("rank", rank, low=1)
        gamma_min, gamma_max = check_real("gamma_min", gamma_min), check_real("gamma_max", gamma_max)
        alpha_cap = check_real("alpha_cap", alpha_cap)
        if not (0.0 < gamma_min < gamma_max <= 1.0):
            raise ValueError(f"need 0 < gamma_min < gamma_max <= 1, got gamma_min={gamma_min}, "
                             f"gamma_max={gamma_max}")
        if not (alpha_cap > 0.0 and math.isfinite(alpha_cap)):
            raise ValueError(f"alpha_cap must be a positive finite float, got {alpha_cap}")
        self.backend = check_backend(backend)
        self.d_model, self.rank = d_model, rank
        self.gamma_min, self.gamma_max, self.alpha_cap = gamma_min, gamma_max, alpha_cap

        self.u = nn.Parameter(torch.randn(d_model, rank) * 0.05)
        self.v = nn.Parameter(torch.randn(d_model, rank) * 0.05)
        self.decay_logit = nn.Parameter(init_decay_logit(rank, gamma_min, gamma_max))
        self.alpha_logit = nn.Parameter(torch.zeros(rank))
        if shared_kernel is None:
            check_int("kernel_size", kernel_size, low=1, high=MAX_KERNEL_SIZE)
            self.kernel = nn.Parameter(init_kernel(kernel_size))
            self._shared = None
        else:
            if not isinstance(shared_kernel, torch.Tensor) or shared_kernel.dim() != 1:
                raise TypeError(f"shared_kernel must be a (K,) Parameter, got {describe(shared_kernel)}")
            check_int("shared_kernel's K", shared_kernel.shape[0], low=1, high=MAX_KERNEL_SIZE)
            self.register_parameter("kernel", None)
            # a tuple hides the Parameter from registration: the owner's state_dict holds it once
            self._shared = (shared_kernel,)
        self.gate_logit = nn.Parameter(torch.zeros(()))
        self.proj = nn.Linear(d_model, d_model)
        nn.init.normal_(self.proj.weight, std=INIT_STD)
        nn.init.zeros_(self.proj.bias)

    # ---- derived quantities ------------------------------------------------------------
    def get_kernel(self) -> torch.Tensor:
        return self.kernel if self._shared is None else self._shared[0]

    @property
    def kernel_size(self) -> int:
        return self.get_kernel().shape[0]

    def gamma(self) -> torch.Tensor:
        """(R,) decays, computed in float32 at least: a bf16 gamma could not tell 0.999 from 1."""
        logit = self.decay_logit if self.decay_logit.dtype == torch.float64 else self.decay_logit.float()
        return self.gamma_min + (self.gamma_max - self.gamma_min) * torch.sigmoid(logit)

    def alpha(self) -> torch.Tensor:
        logit = self.alpha_logit if self.alpha_logit.dtype == torch.float64 else self.alpha_logit.float()
        return self.alpha_cap * torch.sigmoid(logit)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, rank={self.rank}, kernel_size={self.kernel_size}, "
                f"shared_kernel={self._shared is not None}, gamma=[{self.gamma_min}, {self.gamma_max}], "
                f"alpha_cap={self.alpha_cap}, backend={self.backend!r}")

    def zero_state(self, batch_size: int, device=None, dtype=torch.float32) -> KOperatorState:
        device = self.u.device if device is None else device
        return KOperatorState(
            torch.zeros(batch_size, self.rank, self.d_model, device=device, dtype=dtype),
            torch.zeros(batch_size, self.kernel_size - 1, self.d_model, device=device, dtype=dtype))

    # ---- parallel form -----------------------------------------------------------------
    def forward(self, x: torch.Tensor, state: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                return_state: bool = False, cu_seqlens: Optional[torch.Tensor] = None,
                kernel: Optional[torch.Tensor] = None, extra: Optional[torch.Tensor] = None):
        """(B, T, D) -> (B, T, D); with ``return_state`` also the KOperatorState after the last token.

        ``kernel``: optional (K,) kernel used instead of the module's own / shared one.  A stack
        sharing one kernel passes its parameter here at call time, so wrappers that swap parameter
        objects (FSDP2) are seen; ``cu_seqlens``: packed sequences in a batch of one.
        ``extra``: optional (B, T, D) term added to the mixing output before the output projection
        (the K-Stack's ROSA term, ``sigmoid(rho_logit) * rosa_h``).
        """
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape (B, T, D={self.d_model}), got {describe(x)}")
        check_bool("return_state", return_state)
        xm = _autocast_input(x, self.u.dtype, "x")                    # (B, T, D)
        bk = resolve_backend(self.backend, x.device, check_runnable=False)   # k2_mixer checks it after the state
        # the mixer runs in xm's dtype (the autocast dtype under autocast) with fp32 states;
        # autocast itself is off inside, so the ops see consistent dtypes forward and backward
        with torch.autocast(x.device.type, enabled=False):
            w = self.get_kernel() if kernel is None else kernel
            # "triton": the autograd Function eagerly, the torch.library op under torch.compile
            mixer = k2_mixer if self.context_parallel is None else self.context_parallel.k2_mixer
            y, fin = mixer(xm, self.u, self.v, self.alpha(), self.gamma(), w, self.gate_logit,
                           initial_state=state, output_final_state=return_state,
                           cu_seqlens=cu_seqlens, backend=bk)
            final = KOperatorState(*fin) if return_state else None
        if extra is not None:
            if not isinstance(extra, torch.Tensor) or extra.shape != x.shape:
                raise ValueError(f"extra must have x's shape {tuple(x.shape)}, got {describe(extra)}")
            y = y + extra.to(y.dtype)
        out = self.proj(y)                                            # (B, T, D)
        return (out, final) if return_state else out

    # ---- recurrent form ----------------------------------------------------------------
    def step(self, x_t: torch.Tensor, state: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
             kernel: Optional[torch.Tensor] = None, extra: Optional[torch.Tensor] = None):
        """One token: x_t (B, D) -> (y_t (B, D), new KOperatorState).  O(1) in the sequence length.
        ``extra``: optional (B, D) term added before the output projection, as in ``forward``."""
        if not isinstance(x_t, torch.Tensor) or x_t.dim() != 2 or x_t.shape[-1] != self.d_model:
            raise ValueError(f"x_t must have shape (B, D={self.d_model}), got {describe(x_t)}")
        B = x_t.shape[0]
        w = self.get_kernel() if kernel is None else kernel
        K = w.shape[0]
        dt = state_dtype(x_t)
        if state is None:
            state = (torch.zeros(B, self.rank, self.d_model, device=x_t.device, dtype=dt),
                     torch.zeros(B, K - 1, self.d_model, device=x_t.device, dtype=dt))
        else:
            _check_state(state, (B, self.rank, self.d_model), (B, K - 1, self.d_model))
        S, C = state
        xm = _autocast_input(x_t, self.u.dtype, "x_t")                # (B, D)
        xs = xm.to(dt)
        q, k = k2_qk(xm, self.u, self.v, self.alpha())                # (B, R) each, as the parallel form
        S = self.gamma().to(dt)[:, None] * S.to(dt) + k.to(dt)[:, :, None] * xs[:, None, :]  # (B, R, D)
        y = (q.to(dt)[:, :, None] * S).sum(1)                         # (B, D)
        w = w.to(dt)
        window = torch.cat([C.to(dt), xs[:, None, :]], dim=1)         # (B, K, D), oldest first
        c = (w.flip(0)[None, :, None] * window).sum(1)                # (B, D), tap 0 = current token
        mix = torch.sigmoid(self.gate_logit).to(dt) * c + y
        mix = mix.to(xm.dtype)
        if extra is not None:
            if not isinstance(extra, torch.Tensor) or extra.shape != x_t.shape:
                raise ValueError(f"extra must have x_t's shape {tuple(x_t.shape)}, got {describe(extra)}")
            mix = mix + extra.to(mix.dtype)
        out = self.proj(mix)
        return out, KOperatorState(S, window[:, 1:])


# --------------------------------------------------------------------------------------
# K-Stack blocks (SPEC section 2)
# --------------------------------------------------------------------------------------


def _cpu_fast_path(x: torch.Tensor) -> bool:
    """The hand-written CPU paths below apply: eager, a float32/float64 CPU tensor, no autocast."""
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())


class _RMSNormFn(torch.autograd.Function):
    """y = x * r * scale, r = 1 / sqrt(mean(x^2) + eps) (B, T, 1), with the backward written out:

        xhat = x * r,   dscale = sum_{b,t} dy * xhat
        dx = r * (dy * scale) - xhat * (r / D) * <dy * scale, xhat>

    Seven passes over (B, T, D) in the backward and three in the forward (autograd through the
    elementwise form takes about twice that); r is the only thing saved besides x."""

    @staticmethod
    def forward(ctx, x, scale, eps: float):
        D = x.shape[-1]
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)             # (B, T, 1)
        r = torch.rsqrt(norm * norm / D + eps)
        ctx.save_for_backward(x, scale, r)
        return (x * r).mul_(scale)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, scale, r = ctx.saved_tensors
        D = x.shape[-1]
        xhat = x * r
        t = dy * xhat
        dscale = t.reshape(-1, D).sum(0)
        dot = (t @ scale).unsqueeze(-1)                                      # <dy * scale, xhat>, (B, T, 1)
        dx = (dy * scale).mul_(r).addcmul_(xhat, dot * r, value=-1.0 / D)
        return dx, dscale, None


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * scale, eps 1e-8 (on CPU in float32/float64 through a Function with
    a hand-written backward, elsewhere as the elementwise expression)."""

    def __init__(self, d: int, eps: float = RMS_EPS):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(d))

    def forward(self, x):
        if _cpu_fast_path(x) and self.scale.dtype == x.dtype and x.shape[-1] > 0:
            return _RMSNormFn.apply(x, self.scale, self.eps)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.scale


class Dropout(nn.Dropout):
    """``nn.Dropout`` with a faster mask on CPU.  torch's CPU ``bernoulli_`` draws one 32-bit random
    number per element (measured 7 ns per element here); this draws 16 random bits per element from
    64-bit words (``random_`` over the full int64 range, 4 elements per word) and compares them with
    a threshold, so the drop probability is p rounded to a multiple of 2^-16 (0.1 -> 0.1000061),
    and kept values are scaled by 1 / (1 - that probability): the output is unbiased exactly.  Same
    RNG (torch's default CPU generator), so seeded runs repeat bit for bit.  Elsewhere (CUDA,
    autocast, torch.compile, in-place) it is ``nn.Dropout``."""

    def forward(self, x):
        if not (self.training and 0.0 < self.p < 1.0 and not self.inplace and _cpu_fast_path(x)):
            return super().forward(x)
        n = x.numel()
        bits = torch.empty(-(-n // 4), dtype=torch.int64).random_(-2 ** 63, None)
        r = bits.view(torch.int16)[:n].view(x.shape)                         # uniform over [-2^15, 2^15)
        drop = min(max(round(self.p * 65536), 1), 65535)                     # values below the threshold drop
        keep = (r >= drop - 32768).to(x.dtype).mul_(65536.0 / (65536 - drop))
        return x * keep


class MLP(nn.Module):
    """Linear(D, 2D) -> exact GELU -> dropout -> Linear(2D, D)."""

    def __init__(self, d: int, dropout: float = 0.0):
        super().__init__()
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)
        self.drop = Dropout(dropout)

    def forward(self, x):
        return self.down(self.drop(F.gelu(self.up(x))))


class K1Block(nn.Module):
    """h + Linear(norm1(h)), then h + MLP(norm2(h)): a token-wise block (no mixing over time)."""

    def __init__(self, d: int, mlp_dropout: float = 0.0):
        super().__init__()
        self.norm1 = RMSNorm(d)
        self.mix = nn.Linear(d, d)
        self.norm2 = RMSNorm(d)
        self.mlp = MLP(d, mlp_dropout)

    def forward(self, h):
        h = h + self.mix(self.norm1(h))
        return h + self.mlp(self.norm2(h))

    def step(self, h_t):
        """One token, (B, D) -> (B, D): the block is token-wise, so its step is its forward."""
        return self(h_t)

    def prepared_step(self) -> "PreparedK1":
        """The step with this block's current parameters folded in (inference; see ``PreparedK1``)."""
        return PreparedK1(self)


ROSA_RHO_INIT = math.log(0.1 / 0.9)     # rho = sigmoid(rho_logit) starts at 0.1


class K2Block(nn.Module):
    """h + dropout(KOperator(norm1(h))), then h + MLP(norm2(h)); carries the mixer's state.

    With ``rosa=True`` the block owns ``rho_logit`` (init logit(0.1)) and, given the ROSA
    embedding ``rosa_h`` (B, T, D), adds ``sigmoid(rho_logit) * rosa_h`` to the mixer's output
    before its output projection (the reference implementation's ROSA branch)."""

    def __init__(self, d: int, mixer: KOperator, mlp_dropout: float = 0.0, residual_dropout: float = 0.0,
                 rosa: bool = False):
        super().__init__()
        self.norm1 = RMSNorm(d)
        self.mixer = mixer
        self.drop = Dropout(residual_dropout)
        self.norm2 = RMSNorm(d)
        self.mlp = MLP(d, mlp_dropout)
        if rosa:
            self.rho_logit = nn.Parameter(torch.tensor(ROSA_RHO_INIT))
        else:
            self.register_parameter("rho_logit", None)

    def _rosa_term(self, rosa_h):
        if rosa_h is None or self.rho_logit is None:
            return None
        return torch.sigmoid(self.rho_logit).to(rosa_h.dtype) * rosa_h

    def forward(self, h, state=None, return_state=False, kernel=None, rosa_h=None, cu_seqlens=None):
        m = self.mixer(self.norm1(h), state=state, return_state=return_state, kernel=kernel,
                       extra=self._rosa_term(rosa_h), cu_seqlens=cu_seqlens)
        m, new = m if return_state else (m, None)
        h = h + self.drop(m)
        h = h + self.mlp(self.norm2(h))
        return (h, new) if return_state else h

    def step(self, h_t, state, kernel=None, rosa_h=None):
        m, new = self.mixer.step(self.norm1(h_t), state, kernel=kernel, extra=self._rosa_term(rosa_h))
        h_t = h_t + self.drop(m)
        return h_t + self.mlp(self.norm2(h_t)), new

    def prepared_step(self, kernel=None) -> "PreparedK2":
        """The step with this block's current parameters folded in (inference; see ``PreparedK2``);
        ``kernel``: the stack's shared Kbase kernel, as for ``step``."""
        return PreparedK2(self, kernel)


class K0Block(nn.Module):
    """h + (RMSNorm(h) * gain + bias)."""

    def __init__(self, d: int):
        super().__init__()
        self.norm = RMSNorm(d)
        self.gain = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d))

    def forward(self, h):
        return h + (self.norm(h) * self.gain + self.bias)

    def step(self, h_t):
        return self(h_t)

    def prepared_step(self) -> "PreparedK0":
        return PreparedK0(self)


# --------------------------------------------------------------------------------------
# Prepared steps: each block's token step with its current parameters folded in (inference)
# --------------------------------------------------------------------------------------
#
# ``K*Block.prepared_step()`` returns a module holding, for the block's parameter values at that
# moment, what its step derives from them (the norm scales folded into the following linear
# weights, the transposed weights, the K2 mixer's gamma, alpha, the sigmoid gate folded into the
# flipped kernel, [u | v] as one matrix), and running one token with a few fused ops and no
# Python between them once scripted.  All prepared blocks share one TorchScript interface,
#
#     forward(h (B, D), S, C, S2, C2, rosa (B, D) or None) -> h (B, D)
#
# with S / C the scan and conv states of every K2 layer and pass (inputs) and S2 / C2 the new
# ones (appended to, in order): a K2 block reads S[len(S2)], so a model's prepared step is a walk
# over its blocks (``kop_triton.decode``).  They compute the block's ``step`` (rounding
# differences only; tests/test_decode.py checks them against it) and are valid while the
# parameters are unchanged: the model rebuilds them (``KStackLM.prepared_step``).
# Measured on the dev CPU (1 thread, (1, 64) fp32): F.rms_norm 12 us, addmm of h*h with a (D, 1)
# column of 1/D plus rsqrt 7 us; F.normalize 11 us, vector_norm + clamp + divide 5 us; exact GELU
# 10 us with F.gelu, erf + addcmul 2.6 us: with u' = u / sqrt(2) (up-projection scaled),
# gelu(u) = (u' + u' erf(u')) / sqrt(2), and the 1 / sqrt(2) goes into the down-projection.

_SQRT1_2 = 0.7071067811865476


def _detached(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone()


def _rms_buffers(mod: nn.Module, norm: "RMSNorm", name: str, ref: torch.Tensor) -> None:
    """``name``_eps (1, 1) and ``name``_mean (D, 1): rsqrt(addmm(eps, h*h, mean)) = 1 / rms(h)."""
    d = norm.scale.shape[0]
    mod.register_buffer(name + "_eps", torch.full((1, 1), norm.eps, dtype=ref.dtype, device=ref.device),
                        persistent=False)
    mod.register_buffer(name + "_mean", torch.full((d, 1), 1.0 / d, dtype=ref.dtype, device=ref.device),
                        persistent=False)


def _linear_buffers(mod: nn.Module, name: str, lin: nn.Linear, scale=None, post: float = 1.0, pre: float = 1.0):
    """``name``_wt (in, out) = diag(scale) W^T * post * pre and ``name``_b = b * post."""
    w = lin.weight.detach().t()
    if scale is not None:
        w = scale.detach()[:, None] * w
    wt = (w * (post * pre)).contiguous()
    b = lin.bias.detach() * post if lin.bias is not None else wt.new_zeros(wt.shape[1])
    mod.register_buffer(name + "_wt", wt, persistent=False)
    mod.register_buffer(name + "_b", b.clone(), persistent=False)


def _mlp_buffers(mod: nn.Module, norm2: "RMSNorm", mlp: "MLP", ref: torch.Tensor) -> None:
    _rms_buffers(mod, norm2, "n2", ref)
    _linear_buffers(mod, "up", mlp.up, scale=norm2.scale, post=_SQRT1_2)
    _linear_buffers(mod, "down", mlp.down, pre=_SQRT1_2)


class PreparedK1(nn.Module):
    """K1Block's step, folded: h + mix(norm1(h)), then h + MLP(norm2(h))."""

    def __init__(self, blk: "K1Block"):
        super().__init__()
        ref = blk.mix.weight
        _rms_buffers(self, blk.norm1, "n1", ref)
        _linear_buffers(self, "mix", blk.mix, scale=blk.norm1.scale)
        _mlp_buffers(self, blk.norm2, blk.mlp, ref)

    def forward(self, h: torch.Tensor, S: List[torch.Tensor], C: List[torch.Tensor], S2: List[torch.Tensor],
                C2: List[torch.Tensor], rosa: Optional[torch.Tensor]) -> torch.Tensor:
        t = torch.addmm(self.n1_eps, h * h, self.n1_mean).rsqrt_()
        h = torch.addcmul(self.mix_b, torch.mm(h, self.mix_wt), t).add_(h)
        t = torch.addmm(self.n2_eps, h * h, self.n2_mean).rsqrt_()
        u = torch.addcmul(self.up_b, torch.mm(h, self.up_wt), t)    # up(norm2(h)) / sqrt(2)
        return torch.addmm(self.down_b, u.addcmul_(u, torch.erf(u)), self.down_wt).add_(h)


class PreparedK0(nn.Module):
    """K0Block's step, folded: h + norm(h) * gain + bias (the norm scale and the gain in one vector)."""

    def __init__(self, blk: "K0Block"):
        super().__init__()
        _rms_buffers(self, blk.norm, "n", blk.gain)
        self.register_buffer("w", (blk.norm.scale * blk.gain).detach().clone(), persistent=False)
        self.register_buffer("b", _detached(blk.bias), persistent=False)

    def forward(self, h: torch.Tensor, S: List[torch.Tensor], C: List[torch.Tensor], S2: List[torch.Tensor],
                C2: List[torch.Tensor], rosa: Optional[torch.Tensor]) -> torch.Tensor:
        t = torch.addmm(self.n_eps, h * h, self.n_mean).rsqrt_()
        return (h + self.b).addcmul_(h, t * self.w)


class PreparedK2(nn.Module):
    """K2Block's step, folded; its states: scan S (B, R, D), conv C (B, K-1, D), oldest first.

        x   = norm1(h);  qk = normalize((x @ [u|v]).view(B, 2, R)) * [alpha; 1]
        S'  = gamma * S + k (outer) x;  win = [C | x]  (B, K, D)
        mix = q @ S' + (g * flip(kernel)) @ win  (+ sigmoid(rho_logit) * rosa_h with ROSA)
        h   = h + proj(mix);  h = h + MLP(norm2(h))

    In-place ops only on the temporaries made here, never on h, S or C (the caller's states stay valid)."""

    __constants__ = ["norm_eps", "has_rho"]

    def __init__(self, blk: "K2Block", kernel=None):
        super().__init__()
        mixer = blk.mixer
        kernel = mixer.get_kernel() if kernel is None else kernel
        ref = mixer.u
        dt = ref.dtype
        self.norm_eps = NORM_EPS
        self.has_rho = blk.rho_logit is not None
        with torch.no_grad():
            _rms_buffers(self, blk.norm1, "n1", ref)
            self.register_buffer("n1", _detached(blk.norm1.scale), persistent=False)
            self.register_buffer("uv", torch.cat([mixer.u, mixer.v], 1).to(dt).contiguous(), persistent=False)
            alpha = mixer.alpha().to(dt)
            self.register_buffer("qk_scale", torch.stack([alpha, torch.ones_like(alpha)]), persistent=False)
            self.register_buffer("gamma", mixer.gamma().to(dt)[:, None].contiguous(), persistent=False)
            g = torch.sigmoid(mixer.gate_logit.to(dt))
            self.register_buffer("wg", (g * kernel.detach().to(dt).flip(0))[None, None, :].contiguous(),
                                 persistent=False)                   # (1, 1, K), oldest first
            rho = torch.sigmoid(blk.rho_logit.detach().to(dt)) if self.has_rho else ref.new_zeros(())
            self.register_buffer("rho", rho.clone(), persistent=False)
            _linear_buffers(self, "proj", mixer.proj)
            _mlp_buffers(self, blk.norm2, blk.mlp, ref)

    def forward(self, h: torch.Tensor, S: List[torch.Tensor], C: List[torch.Tensor], S2: List[torch.Tensor],
                C2: List[torch.Tensor], rosa: Optional[torch.Tensor]) -> torch.Tensor:
        i = len(S2)
        B = h.shape[0]
        t = torch.addmm(self.n1_eps, h * h, self.n1_mean).rsqrt_()      # (B, 1): 1 / rms(h)
        x = (h * self.n1).mul_(t)                                         # (B, D), the mixer input
        qk = torch.mm(x, self.uv).view(B, 2, -1)                          # (B, 2, R): x @ [u | v]
        qk = qk.mul_(self.qk_scale / torch.linalg.vector_norm(qk, dim=-1, keepdim=True).clamp_min_(self.norm_eps))
        x3 = x.unsqueeze(1)                                               # (B, 1, D)
        # select / narrow: one view op each where indexing makes two
        s = (S[i] * self.gamma).addcmul_(qk.select(1, 1).unsqueeze(2), x3)     # gamma * S + k (outer) x
        win = torch.cat([C[i], x3], 1)                                    # (B, K, D), oldest first
        wg = self.wg
        c = torch.bmm(wg if B == 1 else wg.expand(B, 1, wg.shape[2]), win)     # (B, 1, D): g * Kbase conv
        if B < 16:                    # + q @ S: bmm for few rows, product and sum over R for many
            mix = c.baddbmm_(qk.narrow(1, 0, 1), s).squeeze(1)           # (B = 64: 35 us vs 26 us on the dev CPU)
        else:
            mix = (qk.select(1, 0).unsqueeze(2) * s).sum(1).add_(c.squeeze(1))
        if self.has_rho and rosa is not None:
            mix = mix + self.rho * rosa
        h = torch.addmm(self.proj_b, mix, self.proj_wt).add_(h)
        t = torch.addmm(self.n2_eps, h * h, self.n2_mean).rsqrt_()
        u = torch.addcmul(self.up_b, torch.mm(h, self.up_wt), t)        # up(norm2(h)) / sqrt(2)
        h = torch.addmm(self.down_b, u.addcmul_(u, torch.erf(u)), self.down_wt).add_(h)
        S2.append(s)
        C2.append(win.narrow(1, 1, win.shape[1] - 1))
        return h
