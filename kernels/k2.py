"""Fused Triton forward of the K2 mixing term (ops: ``kop_triton.ops.k2``), SPEC section 1:

    q_t = alpha * normalize(x_t @ u),  k_t = normalize(x_t @ v)         (L2 over R, eps 1e-8)
    S_t = g * S_{t-1} + k_t (outer) x_t,   y_t = sigmoid(gate_logit) * conv(x)_t + q_t @ S_t

One program per (sequence, D-block of BD channels) walks its sequence in sub-chunks of BC = 16
tokens.  Per sub-chunk it loads the x rows once per D-slice (once in all when D <= BD = 64 and
R <= 32; otherwise its own slice is read a second time, from cache), and in registers:
  * projects them onto u and v (over all of D, in BD-wide slices) and normalises -> q, k (BC, BR);
  * scores A[i, j] = sum_r q_ir k_jr g_r^(i-j), j <= i, with the exact masked decay
    (``kop_triton.kernels.scan.diag_scores``; every exponent >= 0; g^n = exp2(n * log2 g), log2 g
    computed on the host in float64);
  * o = A @ x + (q * g^(i+1)) @ S, S the (BR, BD) float32 state entering the sub-chunk;
  * c = the causal convolution tile (``kop_triton.kernels.conv.conv_tile``: taps, or the
    Toeplitz product for long shared kernels), reading the previous K-1 rows / the conv state;
  * writes y = gate * c + o once, then S <- g^Lc * S + (k * g^(Lc-1-j))^T @ x.
Neither q, k (B, T, R) nor the conv output touch memory.  Every CHUNK = 64 tokens the state
entering the chunk is stored to ``chunk_states`` in the layout of
``kop_triton.kernels.scan`` (the input of its ``scan_bwd``): (NC, R, D) float32, entry
``b * ceil(T/64) + c`` (or ``chunk_offsets[n] + c`` for packed sequences).

Cost: the projection is recomputed by every D-block of a sequence (D/BD times), the price of
keeping the walk parallel over channels; everything else is done once.  The walk over a
sequence is sequential (T/16 steps), parallel over sequences and channel blocks.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import conv as _conv
from ._common import dot, dot_mode
from .launch import launch, sm_count, target_arch
from .conv import _Layout, conv_tile
from .scan import diag_scores

SUB_CHUNK = 16          # tokens per step: the smallest tl.dot tile
CHUNK = 64              # chunk_states granularity = the scan's DEFAULT_CHUNK (scan_bwd's chunk_size)
NORM_EPS = tl.constexpr(1e-8)   # a constexpr: the compiler rejects a plain Python float global
MAX_BLOCK_D = 64


# D is not specialised on the value 1 (Triton's default for integer arguments): that variant spilled
# 0.3-0.6 KB at R = 128 on every target while the generic one does not, and it gains nothing.
@triton.jit(do_not_specialize=["D"])
def _k2_fwd_kernel(x, u, v, alpha, lg, gate, w, c0, s0, y, sT, states, cu, chunk_offsets,
                   T, D, R, K, NT,
                   BC: tl.constexpr, CH: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr,
                   SINGLE_D: tl.constexpr, PER_CHANNEL: tl.constexpr, CONV_DOT: tl.constexpr,
                   USE_C0: tl.constexpr, USE_S0: tl.constexpr, STORE_FINAL: tl.constexpr, STORE_STATES: tl.constexpr,
                   IS_VARLEN: tl.constexpr, DOT_MODE: tl.constexpr):
    """x, y: (rows, D); u, v: (D, R) fp32; alpha, lg: (R,) fp32; gate: (1,) fp32 sigmoid(gate_logit);
    w: (K,) or (D, K) fp32; c0: (N, K-1, D), s0 / sT: (N, R, D), states: (NC, R, D) fp32."""
    i_d, i_n = tl.program_id(0), tl.program_id(1)
    if IS_VARLEN:
        bos = tl.load(cu + i_n).to(tl.int64)
        L = (tl.load(cu + i_n + 1) - bos).to(tl.int32)
        c_base = tl.load(chunk_offsets + i_n).to(tl.int64)
    else:
        bos = i_n.to(tl.int64) * T
        L = T
        c_base = i_n.to(tl.int64) * NT
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    o_r = tl.arange(0, BR)
    m_r = o_r < R
    o_c = tl.arange(0, BC)
    b_lg = tl.load(lg + o_r, mask=m_r, other=0.)
    b_alpha = tl.load(alpha + o_r, mask=m_r, other=0.)
    b_gate = tl.load(gate)
    m_rd = m_r[:, None] & m_d[None, :]
    p_S = o_r[:, None] * D + o_d[None, :]                                   # (BR, BD) in an (R, D) state
    b_S = tl.zeros([BR, BD], dtype=tl.float32)
    if USE_S0:
        b_S = tl.load(s0 + i_n.to(tl.int64) * R * D + p_S, mask=m_rd, other=0.)
    b_gq = tl.exp2((o_c + 1).to(tl.float32)[:, None] * b_lg[None, :])      # g^(i+1)  (BC, BR)

    for t0 in range(0, L, BC):
        if STORE_STATES:
            if t0 % CH == 0:
                p_st = states + (c_base + t0 // CH) * R * D + p_S
                tl.store(p_st, b_S, mask=m_rd)
        Lc = tl.minimum(L - t0, BC)
        m_t = o_c < Lc
        rows = (bos + t0 + o_c).to(tl.int64)
        # this program's x tile (BC, BD)
        b_x = tl.load(x + rows[:, None] * D + o_d[None, :], mask=m_t[:, None] & m_d[None, :],
                      other=0.).to(tl.float32)
        # q, k: projection over all of D, normalisation over R
        if SINGLE_D:                                                        # D <= BD: the same tile
            m_dr = m_d[:, None] & m_r[None, :]
            b_pu = dot(b_x, tl.load(u + o_d[:, None] * R + o_r[None, :], mask=m_dr, other=0.), DOT_MODE)
            b_pv = dot(b_x, tl.load(v + o_d[:, None] * R + o_r[None, :], mask=m_dr, other=0.), DOT_MODE)
        else:
            b_pu = tl.zeros([BC, BR], dtype=tl.float32)
            b_pv = tl.zeros([BC, BR], dtype=tl.float32)
            for d0 in range(0, D, BD):
                o_p = d0 + tl.arange(0, BD)
                m_p = o_p < D
                b_xp = tl.load(x + rows[:, None] * D + o_p[None, :], mask=m_t[:, None] & m_p[None, :], other=0.)
                m_pr = m_p[:, None] & m_r[None, :]
                b_u = tl.load(u + o_p[:, None] * R + o_r[None, :], mask=m_pr, other=0.)
                b_v = tl.load(v + o_p[:, None] * R + o_r[None, :], mask=m_pr, other=0.)
                b_pu += dot(b_xp, b_u, DOT_MODE)
                b_pv += dot(b_xp, b_v, DOT_MODE)
        n_u = tl.maximum(tl.sqrt(tl.sum(b_pu * b_pu, axis=1)), NORM_EPS)
        n_v = tl.maximum(tl.sqrt(tl.sum(b_pv * b_pv, axis=1)), NORM_EPS)
        b_q = b_pu / n_u[:, None] * b_alpha[None, :]                        # (BC, BR), 0 on pad rows
        b_k = b_pv / n_v[:, None]
        # decayed scan of the sub-chunk
        b_A = diag_scores(b_q, b_k, b_lg, BC, BR > 32)                      # (BC, BC)
        b_o = dot(b_A, b_x, DOT_MODE) + dot(b_q * b_gq, b_S, 0)
        # causal convolution tile
        b_c = conv_tile(x, w, c0, bos, L, i_n, t0, o_d, m_d, D, K, BC, BC, BD,
                        PER_CHANNEL, USE_C0, CONV_DOT, DOT_MODE)
        b_y = b_gate * b_c + b_o
        tl.store(y + rows[:, None] * D + o_d[None, :], b_y.to(y.dtype.element_ty),
                 mask=m_t[:, None] & m_d[None, :])
        # state passing: S <- g^Lc S + (k * g^(Lc-1-j))^T @ x
        n_k = tl.where(m_t, Lc - 1 - o_c, 0).to(tl.float32)
        b_kd = b_k * tl.exp2(n_k[:, None] * b_lg[None, :])
        b_S = tl.exp2(Lc.to(tl.float32) * b_lg)[:, None] * b_S + dot(tl.trans(b_kd), b_x, 0)
    if STORE_FINAL:
        tl.store(sT + i_n.to(tl.int64) * R * D + p_S, b_S, mask=m_rd)


# Launch settings of _k2_fwd_kernel (``launch_settings``, checked by the offline compile gate; the
# few-byte spills below are ptxas's choices for this sequential walk, different on each target):
#   sm_90 / sm_100: 8 warps, 1 stage (4 warps spilled 4-12 B: fp32 with states on sm_90, 16-bit at
#   BD = 32 on sm_100);
#   sm_80: 4 warps, 1 stage for R <= 64 (8 warps spilled 4-68 B: 16-bit with states, per-channel
#   kernels), 8 warps, 2 stages at R = 128 (4 warps spilled 0.5-1.3 KB there);
#   R > 32: 16 channels per program and no single-tile projection (BD >= 32 and SINGLE_D spilled
#   0.3-0.9 KB at R = 128).


def launch_settings(BR: int, device: torch.device):
    """(num_warps, num_stages) of _k2_fwd_kernel for the target (comment above)."""
    arch = target_arch(device)
    if arch is not None and arch < 90:
        return (4, 1) if BR <= 64 else (8, 2)
    return 8, 1


def block_d(D: int, N: int, device: torch.device, R: int = 1) -> int:
    """Channels per program.  The walk over a sequence is sequential, so the grid is only
    N * ceil(D / BD) programs: on a GPU, BD shrinks (64 -> 32 -> 16) until that fills every SM
    once, trading a repeated projection (each program projects all of D) for parallelism.
    Not yet tuned by measurement (no GPU in the session that wrote it); 64 off the GPU."""
    bd = min(MAX_BLOCK_D, max(16, triton.next_power_of_2(D)))
    if R > 32:               # the (BC, R) x (R, BD) fp32 state product spilled 0.3-0.9 KB at BD >= 32
        return 16
    sms = sm_count(device)
    if sms is None:
        return bd
    while bd > 16 and N * triton.cdiv(D, bd) < sms:
        bd //= 2
    return bd


def chunk_offsets_of(cu_seqlens: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """(N+1,) int64 exclusive cumulative sum of ceil(len_n / chunk): the first chunk_states
    row of every packed sequence (the layout of ``kop_triton.kernels.scan``)."""
    cu = cu_seqlens.to(torch.int64)
    n_chunks = (cu[1:] - cu[:-1] + chunk - 1) // chunk
    return torch.cat([cu.new_zeros(1), n_chunks.cumsum(0)])


def k2_fwd(x, u, v, alpha, gamma, kernel, gate_logit, scan_state, conv_state,
           output_final_state, cu_seqlens, store_chunk_states=True):
    """Fused forward launcher (no autograd).  -> (y, scan_final, conv_final, chunk_states).

    x (B, T, D) float32/bfloat16/float16 (float64 is the caller's to convert); u, v (D, R);
    alpha, gamma (R,); kernel (K,) or (D, K); gate_logit one element; scan_state (N, R, D) or
    None; conv_state (N, K-1, D) or None.  y in x's dtype; final states float32 (None unless
    asked); chunk_states (NC, R, D) float32 in the scan kernels' layout (None unless asked).
    With no tokens (B * T = 0) nothing is launched and the initial states pass through.
    """
    B, T, D = x.shape
    R = u.shape[1]
    K = kernel.shape[-1]
    lay = _Layout(x, cu_seqlens)
    N = lay.N
    x2 = x.contiguous().view(B * T, D)
    f32 = dict(dtype=torch.float32)
    uf, vf = u.detach().to(**f32).contiguous(), v.detach().to(**f32).contiguous()
    af = alpha.detach().to(**f32).contiguous()
    lg = torch.log2(gamma.detach().to(torch.float64)).to(torch.float32).contiguous()
    gate = torch.sigmoid(gate_logit.detach().to(**f32).reshape(1)).contiguous()
    w = kernel.detach().to(**f32).contiguous()
    use_c0 = conv_state is not None and K > 1
    c0 = conv_state.detach().to(**f32).contiguous() if use_c0 else x2
    s0 = scan_state.detach().to(**f32).contiguous() if scan_state is not None else None
    NT = triton.cdiv(T, CHUNK)
    if cu_seqlens is None:
        NC, offs = B * NT, None
    else:
        offs = chunk_offsets_of(lay.cu)
        NC = sum(triton.cdiv(b - a, CHUNK) for a, b in zip(lay.cu_host[:-1], lay.cu_host[1:]))
    states = torch.empty(NC, R, D, **f32, device=x.device) if store_chunk_states else None
    sT = torch.empty(N, R, D, **f32, device=x.device) if output_final_state else None
    y = torch.empty(B * T, D, dtype=x.dtype, device=x.device)
    BD = block_d(D, N, x.device, R)
    BR = max(16, triton.next_power_of_2(R))
    warps, stages = launch_settings(BR, x.device)
    conv_dot = kernel.dim() == 1 and K > _conv.DOT_MIN_TAPS
    if B * T == 0:                          # no tokens: the scan state passes through unchanged
        if sT is not None and s0 is not None:
            sT.copy_(s0)
        elif sT is not None:
            sT.zero_()
    else:
        launch(_k2_fwd_kernel, (triton.cdiv(D, BD), N),
               x=x2, u=uf, v=vf, alpha=af, lg=lg, gate=gate, w=w, c0=c0, s0=s0, y=y, sT=sT,
               states=states, cu=lay.cu, chunk_offsets=offs, T=T, D=D, R=R, K=K, NT=NT, BC=SUB_CHUNK,
               CH=CHUNK, BD=BD, BR=BR, SINGLE_D=D <= BD and R <= 32, PER_CHANNEL=kernel.dim() == 2,
               CONV_DOT=conv_dot, USE_C0=use_c0, USE_S0=s0 is not None, STORE_FINAL=output_final_state,
               STORE_STATES=store_chunk_states, IS_VARLEN=cu_seqlens is not None,
               DOT_MODE=dot_mode(x.dtype),
               num_warps=warps, num_stages=stages)
    cT = lay.final_rows(x2, conv_state if K > 1 else None, K) if output_final_state else None
    return y.view(B, T, D), sT, cT, states
