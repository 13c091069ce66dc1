"""Fused Triton K2 mixer, forward and backward, parallel over chunks (ops: ``kop_triton.ops.k2``).
SPEC section 1, up to the output projection:

    q_t = alpha * normalize(x_t @ u),  k_t = normalize(x_t @ v)          (L2 over R, eps 1e-8)
    S_t = g * S_{t-1} + k_t (outer) x_t,   y_t = sigmoid(gate_logit) * conv(x)_t + q_t @ S_t

The work is split the way chunked linear attention is (the scan's algebra and its kernels,
``kop_triton.kernels.scan``): chunk-local work in parallel, one cheap pass that carries the
state across chunks, outputs in parallel.  Chunks of CHUNK = 64 tokens, cut into sub-chunks of
SUB_CHUNK = 16 (``kop_triton.kernels.config``); NC chunks in all (``kop_triton.kernels.varlen``).

Grids as below; past CUDA's 65,535 programs on axis y or z a launch runs on its grid flattened
onto axis x instead (``launch.grid_of``, the kernels' FLAT constexpr).

Forward, four launches (x is read three times, y written once):
  1. ``_k2_qk_kernel``       grid (rows / BM,): q = alpha * normalize(x @ u), k = normalize(x @ v),
                             and for the backward q_hat = normalize(x @ u) with the two norms, once
                             per token -> qkn, three float32 planes q | k | [q_hat, norms] of
                             (rows, R), (rows, R), (rows, R + 2) (reads x);
  2. ``_chunk_state_kernel`` (scan) grid (D / 64, NC): chunk-local states (k g^(L-1-j))^T @ x
                             (reads x);
     1+2 as one launch from ``K2Settings.fold_min_chunks`` (132) chunks on at R <= 32 (``fold_qk``):
     ``_k2_qk_state_kernel`` grid (1, NC): per chunk, the projection and then the chunk-local state
                             from the k still in registers, the chunk's x rows re-read from L2
                             (x leaves DRAM twice forward instead of three times);
  3. ``_state_pass_kernel``  (scan) grid (N, R*D / 128): the only walk over a sequence, elementwise
                             on the (R, D) chunk states, 16 chunks composed per step ->
                             S_prev[c] (the chunk states the backward reads) and the final state;
                             past 8K tokens per sequence on few programs (N R D < 32K) three
                             launches over groups of chunks
                             (``kernels/scan.py``: ``pass_group``, ``ChunkPlan.state_pass``);
  4. ``_k2_out_kernel``      grid (D / BD, NC): per chunk and channel block, the scores A of the
                             chunk (recomputed from q, k: O(R) per token read), o = A @ x +
                             (q g^(i+1)) @ S_prev, the conv tile, y = gate * conv + o (reads x, its
                             chunk and K - 1 rows before it; writes y).

Backward, from x, qkn (its q and k planes read in place) and the chunk states (no forward
recomputed; dy read three times, x twice, dx written once: about six D-wide passes per token):
  1. ``_chunk_state_kernel`` (scan, reversed) chunk-local (q g^(i+1))^T @ dy (reads dy);
  2. ``_state_pass_kernel``  (scan, reversed) -> G[c] (the gradient of the state after chunk c)
                             and d scan_state;
  3. ``_bwd_dqk_kernel``     (scan) grid (CHUNK / SUB_CHUNK, NC): dq, dk and dgamma partials (reads
                             x, dy);
  4. ``_k2_dp_kernel``       grid (rows / BM,): dq, dk through the normalisation -> dp (rows, 2R),
                             dalpha partials (O(R) per token);
  5. ``_k2_dx_kernel``       grid (D / BD, NC / G): per group of G chunks, dx = A^T dy +
                             (k g^(L-1-j)) @ G + gate * conv^T(dy) + dconv_final + dp @ [u | v]^T,
                             written once (reads dy, its chunk and K - 1 rows after it); from the
                             same sub-chunks' x rows, the group's partial sums of [du | dv] = x^T dp
                             (R <= 32, where the launch settings keep FUSE_DUV: not for bf16 at R <= 16
                             on plain inputs, whose dx kernel runs capped at 168 registers, 3 programs
                             per SM, kernels/settings.py) and of the conv's weight gradient W[l] = sum_t dy_t xe_{t-l}
                             (K <= 64), giving dkernel = gate W and dgate_logit = gate (1 - gate)
                             <W, kernel>;
     beyond those sizes one matrix product x^T dp and ``conv_bwd_dw`` (one or two more passes);
     d conv_state from the first K - 1 extended rows of conv^T (``conv_bwd_dx``, dh0 only).
The traffic of every launch is modelled in ``benchmarks/traffic.py``.

Deterministic: no atomics; dgamma, dalpha, du, dv and dkernel are per-block partials summed in a
fixed order (the chunk groups depend on shapes only).  Numerics as the scan's: float32
accumulation, every decay power g^n = exp2(n log2 g) with n >= 0, nothing divides by gamma;
tensor-core dots for bf16 / fp16 inputs, state products in fp32 for fp16.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import block, dot, f32, load_rows, log2_gamma, passthrough, state_arg, tile_ids
from .config import CHUNK, SUB_CHUNK
from .conv import _load_xe, conv_bwd_dw, conv_bwd_dx, conv_t_tile, conv_tile
from .launch import grid_of, launch, target_arch
from .scan import ChunkPlan, score_cols, score_rows
from .seqs import as_varlen
from .settings import K2, QK_TILE, K2Settings, kernel_settings
from .varlen import Layout, chunk_bounds, chunk_program, chunk_tile, seq_length

NORM_EPS = tl.constexpr(1e-8)   # a constexpr: the compiler rejects a plain Python float global
# What the dx kernel sums in place ([du | dv], the conv's weight gradient) and how many chunks one
# of its programs walks: ``K2Settings`` (kernels/settings.py), passed in (``settings=``; default K2).


def fold_qk(NC: int, BR: int, settings: K2Settings = K2) -> bool:
    """Whether k2_fwd runs ``_k2_qk_state_kernel`` (q, k and the chunk-local states in one pass
    over x) instead of ``_k2_qk_kernel`` and the chunk-state pass: the projection's (64, BR) float32
    tiles of a whole chunk within kernels/settings.py ``QK_TILE`` (R <= 32: a chunk is then the
    projection's own row block, ``_block_m``) and at least ``settings.fold_min_chunks`` chunks
    (``K2Settings``: why 132), or as ``settings.fold_qk`` forces."""
    if CHUNK * BR > QK_TILE:
        return False
    return NC >= settings.fold_min_chunks if settings.fold_qk is None else settings.fold_qk


def dx_group(NC: int, nd: int, settings: K2Settings = K2) -> int:
    """Chunks per _k2_dx_kernel program for NC chunks and nd channel blocks (``K2Settings``)."""
    if settings.dx_group is not None:
        return settings.dx_group
    return max(1, min(settings.max_dx_group, (NC * nd) // settings.dx_target_programs))


# --------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------


@triton.jit
def _project(x, u, v, alpha, q, k, qhn, o_m, m_m, D, R, BM: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr,
             DOT_MODE: tl.constexpr):
    """The rows o_m (mask m_m) of q = alpha * normalize(x @ u), k = normalize(x @ v) and
    qhn = [normalize(x @ u) | ||x u|| | ||x v||], stored; -> k of those rows, (BM, BR) float32
    (zero in masked rows)."""
    o_r, m_r = block(0, BR, R)
    b_pu = tl.zeros([BM, BR], dtype=tl.float32)
    b_pv = tl.zeros([BM, BR], dtype=tl.float32)
    for d0 in range(0, D, BD):
        o_d = d0 + tl.arange(0, BD)
        m_d = o_d < D
        b_x = tl.load(x + o_m[:, None] * D + o_d[None, :], mask=m_m[:, None] & m_d[None, :], other=0.)
        m_dr = m_d[:, None] & m_r[None, :]
        b_pu += dot(b_x, tl.load(u + o_d[:, None] * R + o_r[None, :], mask=m_dr, other=0.), DOT_MODE)
        b_pv += dot(b_x, tl.load(v + o_d[:, None] * R + o_r[None, :], mask=m_dr, other=0.), DOT_MODE)
    n_u = tl.sqrt(tl.sum(b_pu * b_pu, axis=1))
    n_v = tl.sqrt(tl.sum(b_pv * b_pv, axis=1))
    m_mr = m_m[:, None] & m_r[None, :]
    b_qh = b_pu / tl.maximum(n_u, NORM_EPS)[:, None]
    b_alpha = tl.load(alpha + o_r, mask=m_r, other=0.)
    b_k = b_pv / tl.maximum(n_v, NORM_EPS)[:, None]
    tl.store(q + o_m[:, None] * R + o_r[None, :], b_qh * b_alpha[None, :], mask=m_mr)
    tl.store(k + o_m[:, None] * R + o_r[None, :], b_k, mask=m_mr)
    W = R + 2
    tl.store(qhn + o_m[:, None] * W + o_r[None, :], b_qh, mask=m_mr)
    tl.store(qhn + o_m * W + R, n_u, mask=m_m)
    tl.store(qhn + o_m * W + R + 1, n_v, mask=m_m)
    return b_k


@triton.jit
def _k2_qk_kernel(x, u, v, alpha, q, k, qhn, M, D, R, BM: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr,
                  DOT_MODE: tl.constexpr):
    """For BM rows t: q[t] = alpha * normalize(x_t @ u), k[t] = normalize(x_t @ v) and
    qhn[t] = [normalize(x_t @ u) | ||x_t @ u|| | ||x_t @ v||].
    x: (M, D); u, v: (D, R), alpha (R,) float32; q, k: (M, R), qhn: (M, R + 2) float32."""
    o_m, m_m = block(tl.program_id(0).to(tl.int64), BM, M)
    _project(x, u, v, alpha, q, k, qhn, o_m, m_m, D, R, BM, BD, BR, DOT_MODE)


@triton.jit
def _k2_qk_state_kernel(x, u, v, alpha, lg, q, k, qhn, s, cu_seqlens, chunk_indices, T, D, R, NT,
                        BT: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr, IS_VARLEN: tl.constexpr,
                        DOT_MODE: tl.constexpr, FLAT: tl.constexpr):
    """``_k2_qk_kernel`` and the forward ``_chunk_state_kernel`` of one chunk in one program (the
    q/k projection folded into the chunk-state pass): q, k, qhn of the chunk's rows as
    ``_k2_qk_kernel``, then its chunk-local state s[c] = (k g^(L-1-j))^T @ x, BD channels a step,
    from the k still in registers.  The chunk's x rows are read twice, the second time right
    after the first (an L2 hit: 64 D-wide rows, 128 KB at D = 1024 in bf16), so x leaves DRAM
    once where the two kernels read it twice.  Grid (1, chunks, B), or flattened onto axis x
    (FLAT).  s: (NC, R, D) float32."""
    if FLAT:
        _, i_t, i_b = chunk_tile(1, NT, IS_VARLEN)
    else:
        i_t, i_b = tl.program_id(1), tl.program_id(2)
    _, _, _, i_s, L, t0 = chunk_bounds(cu_seqlens, chunk_indices, i_t, i_b, T, NT, BT, IS_VARLEN)
    o_t = tl.arange(0, BT)
    m_t = o_t < L
    o_m = t0 + o_t
    b_k = _project(x, u, v, alpha, q, k, qhn, o_m, m_t, D, R, BT, BD, BR, DOT_MODE)
    o_r, m_r = block(0, BR, R)
    b_lg = tl.load(lg + o_r, mask=m_r, other=0.)
    n = tl.where(m_t, L - 1 - o_t, 0).to(tl.float32)
    b_kt = tl.trans(b_k * tl.exp2(n[:, None] * b_lg[None, :]))                       # (BR, BT)
    p_s = s + i_s * R * D + o_r[:, None] * D
    for d0 in range(0, D, BD):
        o_d = d0 + tl.arange(0, BD)
        m_d = o_d < D
        b_x = load_rows(x, o_m, m_t, o_d, m_d, D)                                   # (BT, BD)
        tl.store(p_s + o_d[None, :], dot(b_kt, b_x, DOT_MODE), mask=m_r[:, None] & m_d[None, :])


@triton.jit
def _k2_out_kernel(x, q, k, lg, gate, w, c0, s, y, cu_seqlens, chunk_indices, T, D, R, K, NT,
                   BT: tl.constexpr, BC: tl.constexpr, BR: tl.constexpr, BRS: tl.constexpr,
                   BD: tl.constexpr, BK: tl.constexpr, DIAG_LOOP: tl.constexpr, PER_CHANNEL: tl.constexpr,
                   CONV_DOT: tl.constexpr, USE_C0: tl.constexpr, IS_VARLEN: tl.constexpr,
                   DOT_MODE: tl.constexpr, STATE_DOT_MODE: tl.constexpr, FLAT: tl.constexpr):
    """y of one chunk and BD channels, sub-chunk by sub-chunk I:
    y_I = gate * conv_I + A[I, :] @ x_chunk + (q_I g^(i+1)) @ S_prev[c].
    x, y: (rows, D); q, k: (rows, R) float32; s: S_prev (NC, R, D) float32; w: (K,) or (D, K);
    c0: (N, K-1, D) float32; gate: (1,) sigmoid(gate_logit).  Grid (D / BD, chunks, B): the
    channel blocks of one chunk run back to back and share its q, k and state rows in cache
    (flattened onto axis x past CUDA's y / z limits: FLAT, ``launch.grid_of``)."""
    if FLAT:
        i_d, i_t, i_b = chunk_tile(tl.cdiv(D, BD), NT, IS_VARLEN)
    else:
        i_d, i_t, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n, bos, i_tc, i_s, L, t0 = chunk_bounds(cu_seqlens, chunk_indices, i_t, i_b, T, NT, BT, IS_VARLEN)
    L_seq = seq_length(cu_seqlens, n, bos, T, IS_VARLEN)
    o_t = tl.arange(0, BT)
    o_c = tl.arange(0, BC)
    o_d, m_d = block(i_d, BD, D)
    b_gate = tl.load(gate)
    b_xC = load_rows(x, t0 + o_t, o_t < L, o_d, m_d, D)                            # (BT, BD)
    p_S = s + i_s * R * D
    for i_i in range(0, tl.cdiv(L, BC)):
        s_I = i_i * BC
        o_i = s_I + o_c
        m_Id = (o_i < L)[:, None] & m_d[None, :]
        b_A, b_Ad = score_rows(q, k, lg, t0, s_I, L, R, BT, BC, BR, BRS, DIAG_LOOP, DOT_MODE)
        b_xI = tl.load(x + (t0 + o_i)[:, None] * D + o_d[None, :], mask=m_Id, other=0.)
        b_o = dot(b_A, b_xC, DOT_MODE) + dot(b_Ad, b_xI, DOT_MODE)
        for r0 in range(0, BR, BK):                                                 # (q g^(i+1)) @ S_prev
            o_r = r0 + tl.arange(0, BK)
            m_r = o_r < R
            b_lg = tl.load(lg + o_r, mask=m_r, other=0.)
            b_q = tl.load(q + (t0 + o_i)[:, None] * R + o_r[None, :], mask=(o_i < L)[:, None] & m_r[None, :],
                          other=0.)
            b_q = b_q * tl.exp2((o_i + 1).to(tl.float32)[:, None] * b_lg[None, :])
            b_S = tl.load(p_S + o_r[:, None] * D + o_d[None, :], mask=m_r[:, None] & m_d[None, :], other=0.)
            b_o += dot(b_q, b_S, STATE_DOT_MODE)
        b_c = conv_tile(x, w, c0, bos, L_seq, n, i_tc * BT + s_I, o_d, m_d, D, K, BC, BC, BD,
                        PER_CHANNEL, USE_C0, CONV_DOT, DOT_MODE)
        tl.store(y + (t0 + o_i)[:, None] * D + o_d[None, :], (b_gate * b_c + b_o).to(y.dtype.element_ty),
                 mask=m_Id)


@triton.jit
def _k2_dp_kernel(qhn, k, alpha, dq, dk, dp, dalpha, M, R, BM: tl.constexpr, BR: tl.constexpr):
    """Backward of q = alpha * normalize(p_u), k = normalize(p_v) for BM rows:
        dp_u = (alpha dq - m_u q_hat <q_hat, alpha dq>) / max(||p_u||, eps)   (m: ||p|| >= eps)
        dp_v = (dk - m_v k <k, dk>) / max(||p_v||, eps),   dalpha partial = sum_rows dq * q_hat.
    qhn (M, R + 2), k (M, R): from _k2_qk_kernel; dq, dk: (M, R); dp: (M, 2R); dalpha: (M / BM, R)."""
    i_m = tl.program_id(0)
    o_m, m_m = block(i_m.to(tl.int64), BM, M)
    o_r, m_r = block(0, BR, R)
    m_mr = m_m[:, None] & m_r[None, :]
    b_qh = load_rows(qhn, o_m, m_m, o_r, m_r, R + 2)
    n_u = tl.load(qhn + o_m * (R + 2) + R, mask=m_m, other=1.)
    n_v = tl.load(qhn + o_m * (R + 2) + R + 1, mask=m_m, other=1.)
    b_k = load_rows(k, o_m, m_m, o_r, m_r, R)
    b_alpha = tl.load(alpha + o_r, mask=m_r, other=0.)
    b_dq = load_rows(dq, o_m, m_m, o_r, m_r, R).to(tl.float32)
    b_dk = load_rows(dk, o_m, m_m, o_r, m_r, R).to(tl.float32)
    b_dqh = b_dq * b_alpha[None, :]
    a_u = tl.where(n_u >= NORM_EPS, tl.sum(b_qh * b_dqh, axis=1), 0.)
    a_v = tl.where(n_v >= NORM_EPS, tl.sum(b_k * b_dk, axis=1), 0.)
    b_dpu = (b_dqh - b_qh * a_u[:, None]) / tl.maximum(n_u, NORM_EPS)[:, None]
    b_dpv = (b_dk - b_k * a_v[:, None]) / tl.maximum(n_v, NORM_EPS)[:, None]
    tl.store(dp + o_m[:, None] * (2 * R) + o_r[None, :], b_dpu, mask=m_mr)
    tl.store(dp + o_m[:, None] * (2 * R) + R + o_r[None, :], b_dpv, mask=m_mr)
    tl.store(dalpha + i_m * R + o_r, tl.sum(b_dq * b_qh, axis=0), mask=m_r)


@triton.jit
def _k2_dx_kernel(x, dy, q, k, lg, ds, dp, u, v, gate, w, c0, dfin, dx, duv_part, dw_part,
                  cu_seqlens, chunk_indices, T, D, R, K, NT, NC, G,
                  BT: tl.constexpr, BC: tl.constexpr, BR: tl.constexpr, BRS: tl.constexpr,
                  BD: tl.constexpr, BK: tl.constexpr, BW: tl.constexpr, DIAG_LOOP: tl.constexpr,
                  PER_CHANNEL: tl.constexpr, CONV_DOT: tl.constexpr, USE_C0: tl.constexpr,
                  USE_DFIN: tl.constexpr, FUSE_DUV: tl.constexpr, FUSE_DW: tl.constexpr,
                  IS_VARLEN: tl.constexpr, DOT_MODE: tl.constexpr, STATE_DOT_MODE: tl.constexpr,
                  FLAT: tl.constexpr):
    """dx of BD channels of a group of G consecutive chunks, sub-chunk by sub-chunk J:

        dx_J = A[:, J]^T @ dy_chunk + (k_J g^(L-1-j)) @ G[c] + gate * conv^T(dy)_J + dfinal_J
               + dp_J @ [u | v]^T

    and, from the x rows of the same sub-chunks, the group's partial sums of the weight
    gradients: FUSE_DUV  [du | dv] = x^T dp  -> duv_part (NG, D, 2R);
               FUSE_DW   W[l] = sum_t dy_t . xe_{t-l}  -> dw_part (NG * ceil(D/BD), BW) shared,
                         (NG, D, BW) per channel (K <= BW taps, one at a time).
    x, dy, dx: (rows, D); q, k: (rows, R) float32; ds: G (NC, R, D) float32; dp: (rows, 2R)
    float32; u, v: (D, R) float32; c0: (N, K-1, D) and dfin (d conv_final): float32.
    Grid (D / BD, NG), or flattened onto axis x (FLAT, ``launch.grid_of``)."""
    if FLAT:
        ND = tl.cdiv(D, BD)
        i_d, _, i_g = tile_ids(ND, 1)
    else:
        i_d, i_g = tl.program_id(0), tl.program_id(1)
        ND = tl.num_programs(0)
    o_t = tl.arange(0, BT)
    o_c = tl.arange(0, BC)
    o_d, m_d = block(i_d, BD, D)
    o_rr, m_rr = block(0, BR, R)
    o_l = tl.arange(0, BW)
    b_gate = tl.load(gate)
    b_du = tl.zeros([BD, BR], dtype=tl.float32)
    b_dv = tl.zeros([BD, BR], dtype=tl.float32)
    if PER_CHANNEL:
        b_w = tl.zeros([BD, BW], dtype=tl.float32)
    else:
        b_w = tl.zeros([BW], dtype=tl.float32)
    for c in range(i_g * G, tl.minimum(i_g * G + G, NC)):
        i_t, i_b = chunk_program(c, NT, IS_VARLEN)
        n, bos, i_tc, i_s, L, t0 = chunk_bounds(cu_seqlens, chunk_indices, i_t, i_b, T, NT, BT, IS_VARLEN)
        L_seq = seq_length(cu_seqlens, n, bos, T, IS_VARLEN)
        b_dyC = load_rows(dy, t0 + o_t, o_t < L, o_d, m_d, D)                      # (BT, BD)
        p_G = ds + i_s * R * D
        for i_j in range(0, tl.cdiv(L, BC)):
            s_J = i_j * BC
            o_j = s_J + o_c
            m_j = o_j < L
            m_Jd = m_j[:, None] & m_d[None, :]
            b_At, b_Atd = score_cols(q, k, lg, t0, s_J, L, R, BT, BC, BR, BRS, DIAG_LOOP, DOT_MODE)
            b_dyJ = tl.load(dy + (t0 + o_j)[:, None] * D + o_d[None, :], mask=m_Jd, other=0.)
            b_dx = dot(b_At, b_dyC, DOT_MODE) + dot(b_Atd, b_dyJ, DOT_MODE)
            n_k = tl.where(m_j, L - 1 - o_j, 0).to(tl.float32)
            for r0 in range(0, BR, BK):
                o_r = r0 + tl.arange(0, BK)
                m_r = o_r < R
                m_Jr = m_j[:, None] & m_r[None, :]
                b_lg = tl.load(lg + o_r, mask=m_r, other=0.)
                b_k = tl.load(k + (t0 + o_j)[:, None] * R + o_r[None, :], mask=m_Jr, other=0.)
                b_k = b_k * tl.exp2(n_k[:, None] * b_lg[None, :])
                m_rd = m_r[:, None] & m_d[None, :]
                b_G = tl.load(p_G + o_r[:, None] * D + o_d[None, :], mask=m_rd, other=0.)
                b_dx += dot(b_k, b_G, STATE_DOT_MODE)                              # (k g^(L-1-j)) @ G
                p_dp = dp + (t0 + o_j)[:, None] * (2 * R) + o_r[None, :]
                b_u = tl.load(u + o_d[None, :] * R + o_r[:, None], mask=m_rd, other=0.)  # u^T (BK, BD)
                b_v = tl.load(v + o_d[None, :] * R + o_r[:, None], mask=m_rd, other=0.)
                b_dx += dot(tl.load(p_dp, mask=m_Jr, other=0.), b_u, 0)              # dp @ [u | v]^T
                b_dx += dot(tl.load(p_dp + R, mask=m_Jr, other=0.), b_v, 0)
            b_dx += conv_t_tile(dy, w, dfin, bos, L_seq, n, i_tc * BT + s_J, o_d, m_d, D, K, b_gate, BC, BC, BD,
                                PER_CHANNEL, USE_DFIN, CONV_DOT, DOT_MODE)
            tl.store(dx + (t0 + o_j)[:, None] * D + o_d[None, :], b_dx.to(dx.dtype.element_ty), mask=m_Jd)
            if FUSE_DUV:                                                            # x_J^T dp_J
                b_xJ = tl.load(x + (t0 + o_j)[:, None] * D + o_d[None, :], mask=m_Jd, other=0.).to(tl.float32)
                m_Jrr = m_j[:, None] & m_rr[None, :]
                p_dpJ = dp + (t0 + o_j)[:, None] * (2 * R) + o_rr[None, :]
                b_du += dot(tl.trans(b_xJ), tl.load(p_dpJ, mask=m_Jrr, other=0.), 0)
                b_dv += dot(tl.trans(b_xJ), tl.load(p_dpJ + R, mask=m_Jrr, other=0.), 0)
            if FUSE_DW:                                                             # sum_j dy_j xe_{j-l}
                o_s = i_tc * BT + o_j                                               # positions in the sequence
                b_g = b_dyJ.to(tl.float32)
                for l in range(0, K):
                    b_xl = _load_xe(x, c0, bos, L_seq, n, o_s - l, o_d, m_j, m_d, D, K, USE_C0)
                    part = tl.sum(b_g * b_xl, axis=0)                                   # (BD,)
                    if PER_CHANNEL:
                        b_w = tl.where(o_l[None, :] == l, b_w + part[:, None], b_w)
                    else:
                        b_w = tl.where(o_l == l, b_w + tl.sum(part, axis=0), b_w)
    if FUSE_DUV:
        p_duv = duv_part + i_g.to(tl.int64) * D * 2 * R + o_d[:, None] * (2 * R) + o_rr[None, :]
        m_dr = m_d[:, None] & m_rr[None, :]
        tl.store(p_duv, b_du, mask=m_dr)
        tl.store(p_duv + R, b_dv, mask=m_dr)
    if FUSE_DW:
        if PER_CHANNEL:
            p_w = dw_part + i_g.to(tl.int64) * D * BW + o_d[:, None] * BW + o_l[None, :]
            tl.store(p_w, b_w, mask=m_d[:, None])
        else:
            tl.store(dw_part + (i_g.to(tl.int64) * ND + i_d) * BW + o_l, b_w)


# --------------------------------------------------------------------------------------
# launchers (no autograd)
# --------------------------------------------------------------------------------------


class _Plan:
    """What the K2 forward and backward share: the scan's chunk plan (``chunks``, a ``ChunkPlan``:
    chunk tables, tile settings, operand modes, the state pass), the flat view of x (``lay``), the
    conv's kind (K taps, shared or per channel, taps loop or Toeplitz product) and the op's
    ``K2Settings``; launch settings come from ``kernels/settings.py`` (``chunks.settings(kernel,
    K=...)``)."""

    def __init__(self, x, R, kernel, seqs, settings: K2Settings = K2):
        B, T, D = x.shape
        self.lay = Layout(x, seqs)
        # the chunk tables on cu_seqlens' own device (x's, but for the gate's meta-tensor workloads),
        # the kernels reading its offsets as int64
        self.chunks = ChunkPlan(B, T, R, D, x.dtype, seqs, CHUNK, x.device, settings.scan, int64_offsets=True)
        self.K = kernel.shape[-1]
        self.fp32 = self.chunks.dot_mode == 0
        self.per_channel = kernel.dim() == 2
        self.conv_dot = kernel.dim() == 1 and self.K > settings.conv.dot_min_taps


def k2_fwd(x, u, v, alpha, gamma, kernel, gate_logit, scan_state, conv_state,
           output_final_state, cu_seqlens, store_chunk_states=True, settings: K2Settings = K2):
    """Forward launcher (no autograd).  -> (y, scan_final, conv_final, chunk_states, qkn).

    x (B, T, D) float32/bfloat16/float16 (float64 is the caller's to convert); u, v (D, R);
    alpha, gamma (R,); kernel (K,) or (D, K); gate_logit one element; scan_state (N, R, D) or
    None; conv_state (N, K-1, D) or None.  y in x's dtype; final states float32 (None unless
    asked); chunk_states (NC, R, D) float32, the scan state entering every chunk in the layout
    of ``kop_triton.kernels.scan``, and qkn (B*T * (3R + 2),) float32, the planes q, k and
    [q_hat, ||x u||, ||x v||] of every token (``qk_planes``): what ``k2_bwd`` needs, both None
    unless ``store_chunk_states``.  With no tokens nothing is launched and the initial states
    pass through.  cu_seqlens: a tensor, or the ``Varlen`` read from it (``kop_triton.kernels.seqs``);
    settings: the op's tunables (``K2Settings``).
    """
    B, T, D = x.shape
    R = u.shape[1]
    P = _Plan(x, R, kernel, as_varlen(cu_seqlens), settings)
    C = P.chunks
    fp = dict(dtype=torch.float32, device=x.device)
    x2 = P.lay.rows(x)
    lg = log2_gamma(gamma)
    s0 = f32(scan_state)
    use_c0, c0 = state_arg(conv_state, P.K, x2)
    y = torch.empty(B * T, D, dtype=x.dtype, device=x.device)
    if B * T == 0:                          # no tokens: the scan state passes through unchanged
        sT = passthrough(scan_state, (C.N, R, D), x.device) if output_final_state else None
        states = torch.zeros(0, R, D, **fp) if store_chunk_states else None
        qkn = torch.zeros(0, **fp) if store_chunk_states else None
    else:
        qkn = torch.empty(B * T * (3 * R + 2), **fp)
        q, k, qhn = qk_planes(qkn, R)
        proj = dict(x=x2, u=f32(u), v=f32(v), alpha=f32(alpha), q=q, k=k, qhn=qhn, D=D, R=R, BR=C.BR,
                    DOT_MODE=C.dot_mode)
        if fold_qk(C.NC, C.BR, settings):
            # q, k and the chunk-local states in one pass over x (x leaves DRAM once, not twice)
            states = torch.empty(C.NC, R, D, **fp)
            grid, fl = grid_of((1, *C.grid_t))
            launch(_k2_qk_state_kernel, grid, FLAT=fl, **C.chunk_args(), **proj, lg=lg, s=states,
                   BT=CHUNK, IS_VARLEN=C.varlen, **C.settings("_k2_qk_state_kernel"))
        else:
            st = C.settings("_k2_qk_kernel")
            launch(_k2_qk_kernel, (triton.cdiv(B * T, st["BM"]),), **proj, M=B * T, **st)
            states = C.chunk_states(k, x2, lg, reverse=False)
        sT = C.state_pass(states, lg, s0, output_final_state, reverse=False)
        gate = torch.sigmoid(f32(gate_logit).reshape(1))
        # plain: the specialisation a register cap was gated on (kernels/settings.py)
        plain = not (C.varlen or use_c0 or P.per_channel) and D % 16 == 0 and R % 16 == 0
        st = C.settings("_k2_out_kernel", K=P.K, plain=plain)
        grid, fl = grid_of((triton.cdiv(D, st["BD"]), *C.grid_t))
        launch(_k2_out_kernel, grid, FLAT=fl, **C.chunk_args(),
               x=x2, q=q, k=k, lg=lg, gate=gate, w=f32(kernel), c0=c0,
               s=states, y=y, D=D, R=R, K=P.K, BT=CHUNK, BC=SUB_CHUNK, BR=C.BR,
               PER_CHANNEL=P.per_channel, CONV_DOT=P.conv_dot,
               USE_C0=use_c0, IS_VARLEN=C.varlen, DOT_MODE=C.dot_mode, STATE_DOT_MODE=C.state_dot_mode, **st)
        if not store_chunk_states:
            states = qkn = None
    cT = P.lay.final_rows(x2, conv_state if P.K > 1 else None, P.K) if output_final_state else None
    return y.view(B, T, D), sT, cT, states, qkn


def qk_planes(qkn, R: int):
    """The three planes of the forward's flat qkn buffer: q (M, R), k (M, R) and
    qhn (M, R + 2) = [q_hat | ||x u|| | ||x v||], contiguous views (no copy)."""
    M = qkn.numel() // (3 * R + 2)
    if qkn.dim() != 1 or M * (3 * R + 2) != qkn.numel():
        raise ValueError(f"qkn must be the forward's flat (rows * (3R + 2),) buffer for R = {R}, "
                         f"got shape {tuple(qkn.shape)}")
    return qkn[:M * R].view(M, R), qkn[M * R:2 * M * R].view(M, R), qkn[2 * M * R:].view(M, R + 2)


def k2_dp(qhn, k, alpha, dq, dk):
    """Backward of q = alpha * normalize(p_u), k = normalize(p_v) from the forward's qhn (M, R+2)
    and k (M, R) (``qk_planes``) -> (dp (M, 2R) = [dp_u | dp_v], dalpha (R,)), float32; dq, dk (M, R)."""
    M, R = dq.shape
    BR = max(16, triton.next_power_of_2(R))
    st = kernel_settings("_k2_dp_kernel", torch.float32, R=R, arch=target_arch(dq.device))
    n_m = triton.cdiv(M, st["BM"])
    dp = torch.empty(M, 2 * R, dtype=torch.float32, device=dq.device)
    da = torch.empty(n_m, R, dtype=torch.float32, device=dq.device)
    if M:
        launch(_k2_dp_kernel, (n_m,), qhn=qhn, k=k, alpha=f32(alpha), dq=dq.contiguous(),
               dk=dk.contiguous(), dp=dp, dalpha=da, M=M, R=R, BR=BR, **st)
    return dp, da.sum(dim=0, dtype=torch.float64).to(torch.float32)                # fixed order


def k2_bwd(x, u, v, alpha, gamma, kernel, gate_logit, scan_state, conv_state, cu_seqlens,
           chunk_states, qkn, dy, dscan, dconv, settings: K2Settings = K2):
    """Backward launcher of ``k2_fwd`` (no autograd) from x and the forward's chunk_states, qkn.
    -> (dx, du, dv, dalpha, dgamma, dkernel, dgate_logit, dscan_state, dconv_state): dx in x's
    dtype, the others float32 in their input's shape; an initial-state gradient is None where
    that state is None.  dy (B, T, D), dscan (N, R, D), dconv (N, K-1, D): cotangents, each may
    be None (zero).  cu_seqlens and settings as ``k2_fwd``'s (the same, for the same chunk states).
    """
    B, T, D = x.shape
    R = u.shape[1]
    seqs = as_varlen(cu_seqlens)
    P = _Plan(x, R, kernel, seqs, settings)
    C = P.chunks
    K, fp = P.K, dict(dtype=torch.float32, device=x.device)
    x2 = P.lay.rows(x)
    dy2 = torch.zeros_like(x2) if dy is None else P.lay.rows(dy.to(x.dtype))
    g = torch.sigmoid(f32(gate_logit).reshape(1))
    dht = f32(dscan)
    use_dfin, dfin = state_arg(dconv, K, dy2)
    need_dc0 = conv_state is not None
    if B * T == 0:                          # nothing ran: the initial states were the final ones
        z = lambda t: torch.zeros(t.shape, **fp)
        ds0 = None if scan_state is None else passthrough(dscan, scan_state.shape, x.device)
        dc0 = None if conv_state is None else passthrough(dconv, conv_state.shape, x.device)
        return (torch.zeros_like(x), z(u), z(v), z(alpha), z(gamma), z(kernel), z(gate_logit), ds0, dc0)
    if tuple(chunk_states.shape) != (C.NC, R, D):
        raise ValueError(f"chunk_states must have shape (NC, R, D) = {(C.NC, R, D)}, got {tuple(chunk_states.shape)}")
    lg = log2_gamma(gamma)
    af = f32(alpha)
    q, k, qhn = qk_planes(qkn, R)
    if q.shape[0] != B * T:
        raise ValueError(f"qkn holds {q.shape[0]} rows of q, k; the input has B * T = {B * T}")
    # G[c], d scan_state: the scan's reversed chunk-state kernel and state pass
    dstates = C.chunk_states(q, dy2, lg, reverse=True)
    ds0 = C.state_pass(dstates, lg, dht, scan_state is not None, reverse=True)
    dq, dk, dg = C.dqk(q, k, x2, dy2, lg, chunk_states, dstates)        # and the dgamma partials
    dp, dalpha = k2_dp(qhn, k, af, dq, dk)                              # through the normalisation
    # dx, written once; with it, per group of chunks, [du | dv] = x^T dp and the conv's weight
    # gradient W = sum_t dy_t xe_{t-l} (when fused: R <= 32 and K <= 64, else separate passes)
    uf, vf = f32(u), f32(v)
    use_c0, c0 = state_arg(conv_state, K, x2)
    dx = torch.empty(B * T, D, dtype=x.dtype, device=x.device)
    fuse = (not P.fp32) if settings.fuse_weight_grads is None else settings.fuse_weight_grads
    # plain: the specialisation a register cap was gated on (kernels/settings.py)
    plain = not (C.varlen or use_c0 or use_dfin) and D % 16 == 0 and R % 16 == 0
    st = C.settings("_k2_dx_kernel", K=K, plain=plain)
    # FUSE_DUV: a launch setting (kernels/settings.py: where its accumulators cost occupancy, off)
    fuse_duv = st.pop("FUSE_DUV") and C.BR <= settings.max_fused_r and fuse
    fuse_dw = K <= settings.max_fused_taps and fuse
    nd = triton.cdiv(D, st["BD"])
    G = dx_group(C.NC, nd, settings)
    NG = triton.cdiv(C.NC, G)
    BW = max(16, triton.next_power_of_2(K)) if fuse_dw else 16
    duv_part = torch.empty(NG, D, 2 * R, **fp) if fuse_duv else dp
    dw_part = (torch.empty(NG, D, BW, **fp) if P.per_channel else torch.empty(NG * nd, BW, **fp)) \
        if fuse_dw else dp
    grid, fl = grid_of((nd, NG))
    launch(_k2_dx_kernel, grid, FLAT=fl,
           x=x2, dy=dy2, q=q, k=k, lg=lg, ds=dstates, dp=dp, u=uf, v=vf, gate=g, w=f32(kernel),
           c0=c0, dfin=dfin, dx=dx, duv_part=duv_part, dw_part=dw_part,
           cu_seqlens=C.cu, chunk_indices=C.chunk_indices, T=T, D=D, R=R, K=K, NT=C.NT, NC=C.NC, G=G,
           BT=CHUNK, BC=SUB_CHUNK, BR=C.BR, BW=BW,
           PER_CHANNEL=P.per_channel, CONV_DOT=P.conv_dot, USE_C0=use_c0,
           USE_DFIN=use_dfin, FUSE_DUV=fuse_duv, FUSE_DW=fuse_dw, IS_VARLEN=C.varlen,
           DOT_MODE=C.dot_mode, STATE_DOT_MODE=C.state_dot_mode, **st)
    if fuse_duv:
        duv = duv_part.sum(0)                                               # fixed order
    else:
        # one matrix product (16-bit x with dp rounded to it, float32 accumulation)
        duv = (x2.t() @ dp.to(x2.dtype)).float() if x2.dtype != torch.float32 else x2.t() @ dp
    if fuse_dw:
        W = dw_part.sum(0)[..., :K] if P.per_channel else dw_part.sum(0)[:K]
    else:
        W = conv_bwd_dw(x, conv_state, dy2.view(B, T, D), K, kernel.dim() == 1, seqs, settings=settings.conv)
    dkernel = g * W
    dgate = (g * (1 - g) * (W * f32(kernel)).sum()).reshape(gate_logit.shape)
    dc0 = None
    if need_dc0:
        _, dc0 = conv_bwd_dx(dy2.view(B, T, D), kernel, dfin if use_dfin else None, True, seqs,
                             torch.float32, torch.float32, scale=g, dh0_only=True, settings=settings.conv)
    dgamma = dg.sum(dim=0, dtype=torch.float64).to(torch.float32)       # fixed-order reductions
    return (dx.view(B, T, D), duv[:, :R].contiguous(), duv[:, R:].contiguous(), dalpha, dgamma, dkernel,
            dgate, ds0, dc0)
