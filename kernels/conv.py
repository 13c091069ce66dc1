"""Triton kernels of the causal Kbase convolution (ops: ``kop_triton.ops.conv``).

    y_t = sum_{l<K} w[l] * xe_{t-l}          (tap 0 = current token)

where ``xe`` is a sequence's input extended on the left by its K-1 previous inputs (the
initial state, zeros when absent).  All sequences live in one flat (rows, D) buffer: row
``bos + t`` of sequence ``n`` with ``bos = cu[n]``, ``cu`` the (N+1,) int64 offsets (``b * T``
for a plain batch).  Relative position ``s < 0`` of sequence ``n`` is state row
``h0[n, K-1+s]``.

Two ways to evaluate one (BT, BD) output tile, chosen by the compile-time flag USE_DOT:
  taps      K broadcast multiply-adds of shifted (BT, BD) input tiles; any K, shared (K,)
            or per-channel (D, K) weights; O(T*K*D) on CUDA cores.
  Toeplitz  (shared weight only) the tile is sum over source blocks of W (BT, BS) @ xe (BS, BD)
            with W[i, j] = w[t0+i - s0-j] gathered from w, masked to 0 <= lag < K:
            ceil((BT+K-1)/BS) tensor-core products per tile, still O(T*K*D), never T x T.

Backward (no atomics, deterministic):
  dxe_s = sum_l w[l] dy_{s+l}  (+ dfinal for the last K-1 positions): the transposed
          operator, same two methods; rows s >= 0 go to dx, rows s < 0 to dh0.
  dw[l, d] = sum_t dy_t[d] xe_{t-l}[d]: per (split, lag block, channel block) partial
          sums over a fixed, strided set of time blocks, written to a (NS, K, D) buffer and
          summed over NS (and over D for a shared weight) by the launcher in a fixed order.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from ._common import dot, dot_mode, f32, state_arg, tile_ids
from .launch import grid_of, launch, target_arch
from .seqs import as_varlen
from .settings import CONV, ConvSettings, kernel_settings
from .varlen import Layout, seq_block

# Tile sizes and warps of the three kernels: kernels/settings.py (``kernel_settings``); when shared
# kernels switch to the Toeplitz product and the weight gradient's programs: ``ConvSettings`` there,
# passed in (``settings=``; default CONV).


# --------------------------------------------------------------------------------------
# jit helpers shared with the fused K2 kernel
# --------------------------------------------------------------------------------------


@triton.jit
def _load_xe(x, h0, bos, L, n, o_s, o_d, m_row, m_d, D, K, USE_H0: tl.constexpr):
    """Extended-input tile (len(o_s), BD) at relative positions o_s of sequence n, fp32."""
    p_x = x + (bos + o_s).to(tl.int64)[:, None] * D + o_d[None, :]
    b = tl.load(p_x, mask=(m_row & (o_s >= 0) & (o_s < L))[:, None] & m_d[None, :],
                other=0.).to(tl.float32)
    if USE_H0:
        p_h = h0 + (n.to(tl.int64) * (K - 1) + (K - 1 + o_s))[:, None] * D + o_d[None, :]
        b += tl.load(p_h, mask=(m_row & (o_s < 0) & (o_s >= 1 - K))[:, None] & m_d[None, :], other=0.)
    return b


@triton.jit
def conv_tile(x, w, h0, bos, L, n, t0, o_d, m_d, D, K,
              BT: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr,
              PER_CHANNEL: tl.constexpr, USE_H0: tl.constexpr, USE_DOT: tl.constexpr,
              DOT_MODE: tl.constexpr):
    """fp32 (BT, BD) tile of y_t = sum_l w[l] xe_{t-l}, rows t0 .. t0+BT-1 of sequence n."""
    o_t = t0 + tl.arange(0, BT)
    m_t = o_t < L
    acc = tl.zeros([BT, BD], dtype=tl.float32)
    if USE_DOT:
        o_j = tl.arange(0, BS)
        # source rows s0 .. s0+BS-1 cover t0-K+1 .. t0+BT-1
        for s0 in range(t0 - K + 1, t0 + BT, BS):
            o_s = s0 + o_j
            b_x = _load_xe(x, h0, bos, L, n, o_s, o_d, o_s < L, m_d, D, K, USE_H0)
            lag = o_t[:, None] - o_s[None, :]                        # (BT, BS)
            b_w = tl.load(w + lag, mask=(lag >= 0) & (lag < K), other=0.)
            acc += dot(b_w, b_x, DOT_MODE)
    else:
        # inputs of this sequence: lags l <= t; the initial state only for lags l > t0
        p_x = x + (bos + o_t).to(tl.int64)[:, None] * D + o_d[None, :]
        for l in range(0, tl.minimum(K, t0 + BT)):
            m = ((o_t >= l) & m_t)[:, None] & m_d[None, :]
            b_x = tl.load(p_x - l * D, mask=m, other=0.).to(tl.float32)
            acc += _tap(w, l, o_d, m_d, K, PER_CHANNEL) * b_x
        if USE_H0:
            # xe_{t-l} = h0[n, K-1+t-l] for l > t
            p_h = h0 + (n.to(tl.int64) * (K - 1) + K - 1 + o_t)[:, None] * D + o_d[None, :]
            for l in range(t0 + 1, K):
                m = ((o_t < l) & m_t)[:, None] & m_d[None, :]
                acc += _tap(w, l, o_d, m_d, K, PER_CHANNEL) * tl.load(p_h - l * D, mask=m, other=0.)
    return acc


@triton.jit
def _tap(w, l, o_d, m_d, K, PER_CHANNEL: tl.constexpr):
    """Tap l of the kernel: a scalar (shared) or a (1, BD) row (per channel)."""
    if PER_CHANNEL:
        return tl.load(w + o_d * K + l, mask=m_d, other=0.)[None, :]
    else:
        return tl.load(w + l)


# --------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------


@triton.jit
def _flat_ids(D, BD: tl.constexpr, NB, IS_VARLEN: tl.constexpr):
    """(i_d, i_t, i_b) of a flat conv grid (D / BD, blocks, B): channel block first; a packed
    batch's blocks are its table's rows (B = 1), a plain batch's NB per sequence."""
    i_d, _, r = tile_ids(tl.cdiv(D, BD), 1)
    if IS_VARLEN:
        return i_d, r, 0
    else:
        i_b = r // NB
        return i_d, r - i_b * NB, i_b


@triton.jit
def _conv_fwd_kernel(x, w, h0, y, cu, table, T, D, K,
                     BT: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr,
                     PER_CHANNEL: tl.constexpr, USE_H0: tl.constexpr, USE_DOT: tl.constexpr,
                     IS_VARLEN: tl.constexpr, DOT_MODE: tl.constexpr, FLAT: tl.constexpr):
    """y of BT rows (block i_t of those of a sequence, or of the packed table) and BD channels;
    grid (blocks, D / BD, B), or flat (D / BD, blocks, B) on axis x (FLAT, ``launch.grid_of``)."""
    if FLAT:
        i_d, i_t, i_b = _flat_ids(D, BD, tl.cdiv(T, BT), IS_VARLEN)
    else:
        i_t, i_d, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n, bos, L, blk = seq_block(cu, table, i_t, i_b, T, IS_VARLEN)
    t0 = blk * BT
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    acc = conv_tile(x, w, h0, bos, L, n, t0, o_d, m_d, D, K, BT, BS, BD,
                    PER_CHANNEL, USE_H0, USE_DOT, DOT_MODE)
    o_t = t0 + tl.arange(0, BT)
    p_y = y + (bos + o_t).to(tl.int64)[:, None] * D + o_d[None, :]
    tl.store(p_y, acc.to(y.dtype.element_ty), mask=(o_t < L)[:, None] & m_d[None, :])


@triton.jit
def conv_t_tile(dy, w, dfin, bos, L, n, s0, o_d, m_d, D, K, scale,
                BT: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr,
                PER_CHANNEL: tl.constexpr, USE_DFIN: tl.constexpr, USE_DOT: tl.constexpr,
                DOT_MODE: tl.constexpr):
    """fp32 (BT, BD) tile of the transposed operator at extended positions s0 .. s0+BT-1 of
    sequence n (negative: initial-state rows):  scale * sum_l w[l] dy_{s+l}  +  dfinal_{s-L+K-1}."""
    o_s = s0 + tl.arange(0, BT)
    m_s = o_s < L
    acc = tl.zeros([BT, BD], dtype=tl.float32)
    if USE_DOT:
        o_j = tl.arange(0, BS)
        # dy rows p in [s0, s0+BT+K-1) that exist (0 <= p < L)
        for p0 in range(tl.maximum(s0, 0), tl.minimum(s0 + BT + K - 1, L), BS):
            o_p = p0 + o_j
            p_g = dy + (bos + o_p).to(tl.int64)[:, None] * D + o_d[None, :]
            b_g = tl.load(p_g, mask=((o_p >= 0) & (o_p < L))[:, None] & m_d[None, :], other=0.)
            lag = o_p[None, :] - o_s[:, None]                        # (BT, BS)
            b_w = tl.load(w + lag, mask=(lag >= 0) & (lag < K), other=0.)
            acc += dot(b_w, b_g, DOT_MODE)
    else:
        # dy_{s+l} exists for 0 <= s+l < L: lags from max(0, -s) to min(K, L-s)
        p_g = dy + (bos + o_s).to(tl.int64)[:, None] * D + o_d[None, :]
        for l in range(tl.maximum(0, -(s0 + BT - 1)), tl.minimum(K, L - s0)):
            o_p = o_s + l
            m = ((o_p >= 0) & (o_p < L))[:, None] & m_d[None, :]
            b_g = tl.load(p_g + l * D, mask=m, other=0.).to(tl.float32)
            acc += _tap(w, l, o_d, m_d, K, PER_CHANNEL) * b_g
    acc = acc * scale
    if USE_DFIN:
        o_f = o_s - L + K - 1                                        # row of final_state
        p_f = dfin + (n * (K - 1) + o_f)[:, None] * D + o_d[None, :]
        acc += tl.load(p_f, mask=(m_s & (o_f >= 0))[:, None] & m_d[None, :], other=0.)
    return acc


@triton.jit
def _conv_bwd_dx_kernel(dy, w, dfin, dx, dh0, cu, table, scale, T, D, K,
                        BT: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr,
                        PER_CHANNEL: tl.constexpr, USE_DFIN: tl.constexpr, NEED_DH0: tl.constexpr,
                        STORE_DX: tl.constexpr, USE_DOT: tl.constexpr, IS_VARLEN: tl.constexpr,
                        DOT_MODE: tl.constexpr, FLAT: tl.constexpr):
    """dxe_s = scale * sum_l w[l] dy_{s+l} + dfinal_{s-L+K-1}, s from -(K-1) (NEED_DH0) or 0 to
    L-1; rows s >= 0 to dx (unless STORE_DX is off: the fused K2 backward writes those), s < 0
    to dh0.  scale: (1,) float32.  Grid (blocks, D / BD, B) or flat, as the forward's."""
    if FLAT:
        if not STORE_DX:
            NB = tl.cdiv(K - 1, BT)              # conv_bwd_dx(dh0_only=True): K - 1 rows a sequence
        elif NEED_DH0:
            NB = tl.cdiv(T + K - 1, BT)
        else:
            NB = tl.cdiv(T, BT)
        i_d, i_t, i_b = _flat_ids(D, BD, NB, IS_VARLEN)
    else:
        i_t, i_d, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n, bos, L, blk = seq_block(cu, table, i_t, i_b, T, IS_VARLEN)
    if NEED_DH0:
        s0 = blk * BT - (K - 1)
    else:
        s0 = blk * BT
    o_s = s0 + tl.arange(0, BT)
    m_s = o_s < L
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    acc = conv_t_tile(dy, w, dfin, bos, L, n, s0, o_d, m_d, D, K, tl.load(scale), BT, BS, BD,
                      PER_CHANNEL, USE_DFIN, USE_DOT, DOT_MODE)
    if STORE_DX:
        p_dx = dx + (bos + o_s).to(tl.int64)[:, None] * D + o_d[None, :]
        tl.store(p_dx, acc.to(dx.dtype.element_ty), mask=(m_s & (o_s >= 0))[:, None] & m_d[None, :])
    if NEED_DH0:
        p_h = dh0 + (n * (K - 1) + (K - 1 + o_s))[:, None] * D + o_d[None, :]
        tl.store(p_h, acc.to(dh0.dtype.element_ty), mask=(o_s < 0)[:, None] & m_d[None, :])


@triton.jit
def _conv_bwd_dw_kernel(x, h0, dy, dw_part, cu, table, n_blocks, NT, T, D, K,
                        BT: tl.constexpr, BL: tl.constexpr, BD: tl.constexpr,
                        USE_H0: tl.constexpr, IS_VARLEN: tl.constexpr, FLAT: tl.constexpr):
    """dw_part[i_s, l, d] = sum over time blocks i_s, i_s+NS, ... of sum_t dy_t[d] xe_{t-l}[d];
    grid (K / BL, D / BD, NS) with NS <= 512 time splits (``conv_bwd_dw``), or flattened onto axis
    x (FLAT, ``launch.grid_of``)."""
    if FLAT:
        NS = tl.num_programs(0) // (tl.cdiv(K, BL) * tl.cdiv(D, BD))
        i_l, i_d, i_s = tile_ids(tl.cdiv(K, BL), tl.cdiv(D, BD))
    else:
        i_l, i_d, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        NS = tl.num_programs(2)
    l0 = i_l * BL
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    o_j = tl.arange(0, BL)
    acc = tl.zeros([BL, BD], dtype=tl.float32)
    for i_blk in range(i_s, n_blocks, NS):
        if IS_VARLEN:
            n, bos, L, blk = seq_block(cu, table, i_blk, 0, T, True)
        else:
            n, bos, L, blk = seq_block(cu, table, i_blk % NT, i_blk // NT, T, False)
        o_t = blk * BT + tl.arange(0, BT)
        m_t = o_t < L
        p_g = dy + (bos + o_t).to(tl.int64)[:, None] * D + o_d[None, :]
        b_g = tl.load(p_g, mask=m_t[:, None] & m_d[None, :], other=0.).to(tl.float32)
        p_x = x + (bos + o_t).to(tl.int64)[:, None] * D + o_d[None, :]
        for j in range(0, tl.minimum(BL, K - l0)):
            l = l0 + j
            b_x = tl.load(p_x - l * D, mask=((o_t >= l) & m_t)[:, None] & m_d[None, :], other=0.)
            part = tl.sum(b_g * b_x.to(tl.float32), axis=0)           # (BD,)
            if USE_H0:
                if l > blk * BT:                                      # rows t < l read h0
                    p_h = h0 + (n * (K - 1) + K - 1 - l + o_t)[:, None] * D + o_d[None, :]
                    b_h = tl.load(p_h, mask=((o_t < l) & m_t)[:, None] & m_d[None, :], other=0.)
                    part += tl.sum(b_g * b_h, axis=0)
            acc = tl.where(o_j[:, None] == j, acc + part[None, :], acc)
    p_w = dw_part + (i_s * K + l0 + o_j).to(tl.int64)[:, None] * D + o_d[None, :]
    tl.store(p_w, acc, mask=((l0 + o_j) < K)[:, None] & m_d[None, :])


# --------------------------------------------------------------------------------------
# launchers (no autograd)
# --------------------------------------------------------------------------------------


def _use_dot(weight: torch.Tensor, K: int, force=None, settings: ConvSettings = CONV) -> bool:
    if weight.dim() != 1:
        return False
    return (K > settings.dot_min_taps) if force is None else bool(force)


def conv_fwd(x, weight, initial_state, output_final_state, cu_seqlens, use_dot=None,
             settings: ConvSettings = CONV):
    """y (B, T, D) in x's dtype, final_state (N, K-1, D) or None.  ``use_dot`` forces a method
    (tests); None picks by ``settings.dot_min_taps``.  Inputs may be non-contiguous.  cu_seqlens:
    a tensor, or the ``Varlen`` read from it (``kop_triton.kernels.seqs``), or None."""
    B, T, D = x.shape
    K = weight.shape[-1]
    lay = Layout(x, as_varlen(cu_seqlens))
    x2, w = lay.rows(x), f32(weight)
    use_h0, h0 = state_arg(initial_state, K, x2)
    y = torch.empty(B * T, D, dtype=x.dtype, device=x.device)
    st = kernel_settings("_conv_fwd_kernel", x.dtype, D=D, K=K, arch=target_arch(x.device))
    dot = _use_dot(weight, K, use_dot, settings)
    if B * T > 0:
        gt, gb, tab = lay.grid_t(st["BT"])
        nd = triton.cdiv(D, st["BD"])
        grid, fl = grid_of((gt, nd, gb), (nd, gt, gb))
        launch(_conv_fwd_kernel, grid, FLAT=fl,
               x=x2, w=w, h0=h0, y=y, cu=lay.cu, table=tab, T=T, D=D, K=K,
               PER_CHANNEL=weight.dim() == 2, USE_H0=use_h0, USE_DOT=dot, IS_VARLEN=lay.varlen,
               DOT_MODE=dot_mode(x.dtype), **st)
    final = lay.final_rows(x2, initial_state if K > 1 else None, K) if output_final_state else None
    return y.view(B, T, D), final


def conv_bwd_dx(dy, weight, dfinal, need_dh0, cu_seqlens, dx_dtype, dh0_dtype, use_dot=None,
                scale=None, dh0_only=False, settings: ConvSettings = CONV):
    """dx (B, T, D) and dh0 (N, K-1, D) (None unless need_dh0) for cotangents dy (times
    ``scale``, a one-element tensor, when given), dfinal.  ``dh0_only``: compute only dh0 (the
    first K-1 extended rows of each
    sequence; dx is None) -- the fused K2 backward forms dx itself."""
    B, T, D = dy.shape
    K = weight.shape[-1]
    lay = Layout(dy, as_varlen(cu_seqlens))
    g2, w = lay.rows(dy), f32(weight)
    use_dfin, dfin = state_arg(dfinal, K, g2)
    need_dh0 = need_dh0 and K > 1
    sc = (torch.ones(1, dtype=torch.float32, device=dy.device) if scale is None
          else scale.detach().to(torch.float32).reshape(1).contiguous())
    dx = g2 if dh0_only else torch.empty(B * T, D, dtype=dx_dtype, device=dy.device)
    dh0 = (torch.empty(lay.N, K - 1, D, dtype=dh0_dtype, device=dy.device) if need_dh0 else dx)
    extra = K - 1 if need_dh0 else 0
    dot = _use_dot(weight, K, use_dot, settings)
    # dh0_only: a tile of K - 1 rows (kernels/settings.py)
    st = kernel_settings("_conv_bwd_dx_kernel", dy.dtype, D=D, K=K, arch=target_arch(dy.device),
                         dh0_only=dh0_only, use_dot=dot)
    if dh0_only:
        gt, gb, tab = (lay.grid_t(st["BT"], fixed_rows=K - 1) if need_dh0 else (0, 0, None))
    else:
        gt, gb, tab = lay.grid_t(st["BT"], extra)
    if gt * gb > 0:
        nd = triton.cdiv(D, st["BD"])
        grid, fl = grid_of((gt, nd, gb), (nd, gt, gb))
        launch(_conv_bwd_dx_kernel, grid, FLAT=fl,
               dy=g2, w=w, dfin=dfin, dx=dx, dh0=dh0, cu=lay.cu, table=tab, scale=sc, T=T, D=D, K=K,
               PER_CHANNEL=weight.dim() == 2, USE_DFIN=use_dfin,
               NEED_DH0=need_dh0, STORE_DX=not dh0_only, USE_DOT=dot,
               IS_VARLEN=lay.varlen, DOT_MODE=dot_mode(dy.dtype), **st)
    dx = None if dh0_only else dx.view(B, T, D)
    if need_dh0:
        return dx, dh0
    if K == 1 and dh0_dtype is not None:
        return dx, torch.zeros(lay.N, 0, D, dtype=dh0_dtype, device=dy.device)
    return dx, None


def conv_bwd_dw(x, initial_state, dy, K, shared, cu_seqlens, settings: ConvSettings = CONV):
    """float32 dw: (K,) when ``shared`` (summed over channels) else (D, K); fixed-order sums."""
    B, T, D = x.shape
    lay = Layout(x, as_varlen(cu_seqlens))
    x2, g2 = lay.rows(x), lay.rows(dy)
    use_h0, h0 = state_arg(initial_state, K, x2)
    st = kernel_settings("_conv_bwd_dw_kernel", x.dtype, D=D, K=K, arch=target_arch(x.device))
    gt, gb, tab = lay.grid_t(st["BT"])
    n_blocks = gt * gb
    n_ld = triton.cdiv(K, st["BL"]) * triton.cdiv(D, st["BD"])
    # time splits: enough programs to fill a GPU (settings.dw_programs), at most one per block;
    # depends on shapes only, so the summation order is fixed.
    NS = max(1, min(n_blocks, settings.dw_programs // n_ld))
    part = torch.empty(NS, K, D, dtype=torch.float32, device=x.device)
    if n_blocks == 0:
        part.zero_()
    else:
        grid, fl = grid_of((triton.cdiv(K, st["BL"]), triton.cdiv(D, st["BD"]), NS))
        launch(_conv_bwd_dw_kernel, grid, FLAT=fl,
               x=x2, h0=h0, dy=g2, dw_part=part, cu=lay.cu, table=tab, n_blocks=n_blocks, NT=gt, T=T,
               D=D, K=K, USE_H0=use_h0, IS_VARLEN=lay.varlen, **st)
    dw = part.sum(0)                                                  # (K, D)
    return dw.sum(1) if shared else dw.t().contiguous()
