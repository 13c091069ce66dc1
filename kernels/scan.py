"""Triton kernels of the decayed scan (forward and backward), chunk-parallel.

Math (per sequence, per key channel r; S is (R, D) float32, S_{-1} = initial state):

    S_t = gamma * S_{t-1} + k_t (outer) v_t          o_t = q_t @ S_t

The sequence is cut into chunks of BT tokens (the last one may be shorter: L <= BT tokens).
With i, j chunk-local positions, S_prev[c] the state entering chunk c and g = gamma:

    A[i, j]     = sum_r q_ir k_jr g_r^(i-j)                    (j <= i, same chunk)
    o_i         = sum_j A[i, j] v_j + (q_i * g^(i+1)) @ S_prev[c]
    S_prev[c+1] = g^L * S_prev[c] + (k * g^(L-1-j))^T @ v       (chunk-local state dS[c])

Backward, with G[c] = dLoss/d(state after chunk c) (G = dfinal after the last chunk):

    G[c-1]  = g^L(c) * G[c] + (q * g^(i+1))^T @ do             (over chunk c; dh0 = G[-1])
    dA[i,j] = do_i . v_j
    dv_j    = sum_{i>=j} A[i, j] do_i + (k_j * g^(L-1-j)) @ G[c]
    dq_ir   = sum_{j<=i} dA[i,j] k_jr g^(i-j) + g^(i+1) (do_i . S_prev[c]_r)
    dk_jr   = sum_{i>=j} dA[i,j] q_ir g^(i-j) + g^(L-1-j) (v_j . G[c]_r)
    dg_r    = sum_{j<i} dA[i,j] q_ir k_jr (i-j) g^(i-j-1)              (a) intra-chunk
            + sum_i (i+1) g^i q_ir (do_i . S_prev[c]_r)                   (b) query side
            + sum_{j<L-1} (L-1-j) g^(L-2-j) k_jr (v_j . G[c]_r)           (c) key side
            + L g^(L-1) sum_d S_prev[c]_rd G[c]_rd                        (d) state decay

Numerics: every power is g^n = exp2(n * log2 g) with n >= 0 (log2 g computed once on the host
in float64); nothing divides by gamma.  The intra-chunk term never needs a negative power:
the chunk is split into sub-chunks of BC tokens; for a row sub-block I (first index s_I) and
columns j < s_I, g^(i-j) = g^(i-s_I) * g^(s_I-j), both exponents >= 0, so that part is one
tl.dot of (q_I * g^(i-s_I)) and (k * g^(s_I-j))^T; the diagonal BC x BC sub-block uses the
exact masked decay, one column (or row) of the sub-block at a time, so only (BC, BR) tensors
are live.  For (a), n g^(n-1) with
n = a + b splits the same way: a g^(a-1) g^b + g^a b g^(b-1).  dk uses the sub-block's last
index e_I as the split point (i > e_I >= j).  All accumulation is float32; 16-bit inputs use
tensor-core dots (state dots stay float32 for float16 inputs, whose range a long-run state
can exceed).  Measured vs the float64 naive reference (interpreter, T <= 4096): relative RMS
<= 4e-7 in float32, <= 6e-4 in float16, <= 9e-3 in bfloat16 (o and every gradient).

Kernels (every grid is parallel over chunks; only the state passing walks the chunks;
with cu_seqlens the chunk axis runs over all NC chunks of the packed batch and B is 1).  Past
65,535 programs on axis y or z (CUDA's limit: over 4M tokens in one sequence or packed, B >
65,535, R*D > 8.4M) a launch runs on a flat grid instead (``launch.grid_of``, FLAT: the (N0, NT,
B) grid below, N0 first, all on axis x):
    _intra_A_kernel       A (rows of every chunk), grid (NT, BT // BC, B); flat (BT // BC, NT, B)
    _chunk_state_kernel   chunk-local states dS[c] (forward) / dH[c] (backward), grid (D/BD, NT, B)
    _state_pass_kernel    sequential pass over the chunks of a sequence, elementwise in (R, D),
                          grid (N, R*D / BLOCK), flat (R*D / BLOCK, N); forward in time, or
                          reversed for the backward; pass_chunks (``ScanSettings``) chunks composed per dependent step
    sequences of over 8K tokens on fewer than 256 programs (``pass_group``) run the pass in three
    launches over groups of G chunks (never across a sequence), NG groups in all, G ~ sqrt(chunks
    per sequence):
    _group_sum_kernel     A: every group's total (its maps composed from h = 0), grid (R*D / BLOCK, NG)
    _state_pass_kernel    B: the walk above over the NG totals (a group as one chunk of G*BT tokens)
                          -> the value entering every group, and the final state
    _group_apply_kernel   C: each group's walk from its entry value, in place on s, grid (R*D / BLOCK, NG)
    _chunk_out_kernel     o (forward) / dv (backward), grid (D/BD, NT, B)
    _bwd_dqk_kernel       dq, dk and per-(chunk, sub-chunk) partial dgamma, grid (BT // BC, NT, B)

The tile kernels' grids run the channel blocks of one chunk back to back (D/BD first), so the
chunk's q, k, A rows they all read are shared in cache; _intra_A and _bwd_dqk run the sub-chunks
of one chunk back to back for the same reason.

No atomics anywhere: dgamma partials are written to a (chunks * sub-chunks, R) buffer and
summed by torch in a fixed order, so two runs give bitwise-identical gradients.

Layout of ``chunk_states`` (returned by scan_fwd, consumed by scan_bwd): a float32 tensor of
shape (NC, R, D), contiguous, where NC is the total number of chunks of size ``chunk_size``:
  * without cu_seqlens: NC = B * ceil(T / chunk_size); entry b * ceil(T / chunk_size) + c is
    the state entering chunk c of batch row b;
  * with cu_seqlens: NC = sum_n ceil(len_n / chunk_size); entry chunk_offsets[n] + c (with
    chunk_offsets the exclusive cumulative sum of ceil(len_n / chunk_size)) is the state
    entering chunk c of sequence n.
"The state entering chunk c" is the state after all earlier tokens of the same sequence:
the initial state (zeros when None) for c = 0.  The final state is not part of it.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import block, dot, dot_mode, load_rows, log2_gamma, passthrough, tile_ids
from .config import CHUNK, SUB_CHUNK, check_rank
from .launch import grid_of, launch, target_arch
from .seqs import as_varlen
from .settings import SCAN, ScanSettings, kernel_settings
from .varlen import chunk_bounds, chunk_tile

# The state pass's tunables (elements per program, chunks per dependent step, when it runs over
# groups of chunks): ``ScanSettings`` (kernels/settings.py), passed in (``settings=``; default SCAN).


def pass_group(nt_max: int, programs: int = 1, settings: ScanSettings = SCAN) -> int:
    """Chunks per group of the grouped state pass for sequences of at most ``nt_max`` chunks, the
    single-level pass having ``programs`` programs; 0: the single-level walk (it already takes
    <= settings.pass_max_steps dependent steps, or has enough programs to be bound by its bytes).
    Past that, G ~ sqrt(chunks per sequence), a power of two >= pass_chunks, balances level B's
    steps against level C's: at T = 1M (16,384 chunks) G = 128, 8 + 8 steps instead of 1,024.  A
    function of shapes only (the longest sequence's chunks), so every sum has a fixed order."""
    st = settings
    if st.pass_group is not None:
        return st.pass_group
    if triton.cdiv(nt_max, st.pass_chunks) <= st.pass_max_steps or programs >= st.pass_level_programs:
        return 0
    return max(st.pass_chunks, triton.next_power_of_2(math.isqrt(nt_max - 1) + 1))


# --------------------------------------------------------------------------------------
# jit helpers
# --------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------


@triton.jit
def _diag_decay(o_c, b_lg, DERIV: tl.constexpr):
    """(BC, BC, BR) exact decay of a diagonal sub-block, c = i - j (chunk-local, same offset):
    g^c where c >= 0 (DERIV=False), or c g^(c-1) where c > 0 (DERIV=True); 0 elsewhere."""
    n = (o_c[:, None] - o_c[None, :])[:, :, None]
    if DERIV:
        pw = tl.exp2(tl.maximum(n - 1, 0).to(tl.float32) * b_lg[None, None, :])
        return tl.where(n > 0, n.to(tl.float32) * pw, 0.)
    else:
        pw = tl.exp2(tl.maximum(n, 0).to(tl.float32) * b_lg[None, None, :])
        return tl.where(n >= 0, pw, 0.)


@triton.jit
def diag_scores(b_q, b_k, b_lg, BC: tl.constexpr, LOOP: tl.constexpr):
    """(BC, BC) scores of a diagonal sub-block, A[i, j] = sum_r q_ir k_jr g_r^(i-j) for j <= i,
    0 above the diagonal, with the exact masked decay.  LOOP: one column j at a time, so only
    (BC, BR) tensors are live (the (BC, BC, BR) broadcast spilled 1.1 KB per thread at BR = 128,
    sm_90); otherwise that broadcast (BR <= 32: it fits, and is 4x cheaper in the interpreter)."""
    o_c = tl.arange(0, BC)
    if not LOOP:
        return tl.sum(b_q[:, None, :] * b_k[None, :, :] * _diag_decay(o_c, b_lg, False), axis=2)
    b_A = tl.zeros([BC, BC], dtype=tl.float32)
    for c in range(0, BC):
        k_c = tl.sum(tl.where((o_c == c)[:, None], b_k, 0.), axis=0)                # k[c, :]  (BR,)
        n_1 = (o_c - c)[:, None]                                                    # i - c
        col = tl.sum(tl.where(n_1 >= 0, b_q * k_c[None, :] *
                              tl.exp2(tl.maximum(n_1, 0).to(tl.float32) * b_lg[None, :]), 0.), axis=1)
        b_A = tl.where((o_c == c)[None, :], col[:, None], b_A)
    return b_A


@triton.jit
def score_rows(q, k, lg, t0, s_I, L, R, BT: tl.constexpr, BC: tl.constexpr, BR: tl.constexpr,
               BRS: tl.constexpr, DIAG_LOOP: tl.constexpr, DOT_MODE: tl.constexpr):
    """Rows i of sub-chunk I (first chunk-local index s_I) of A[i, j] = sum_r q_ir k_jr g_r^(i-j):
    -> (b_A (BC, BT): the columns j < s_I, 0 elsewhere;  b_Ad (BC, BC): the diagonal block j in I,
    0 above its diagonal).  q, k: (rows, R); t0: first row of the chunk; L: its length."""
    o_c = tl.arange(0, BC)
    o_i = s_I + o_c                           # chunk-local rows of the sub-chunk   (BC,)
    o_j = tl.arange(0, BT)                    # chunk-local columns                  (BT,)
    m_i = o_i < L
    m_j = o_j < L
    m_off = o_j < s_I
    n_k = tl.where(m_off, s_I - o_j, 0).to(tl.float32)
    b_A = tl.zeros([BC, BT], dtype=tl.float32)
    b_Ad = tl.zeros([BC, BC], dtype=tl.float32)
    # the sum over r, in slices of BRS channels (a (BT, 128) fp32 key tile spilled 1.8 KB, sm_90)
    for r0 in range(0, BR, BRS):
        o_r = r0 + tl.arange(0, BRS)
        m_r = o_r < R
        b_lg = tl.load(lg + o_r, mask=m_r, other=0.)                               # (BRS,)
        m_Ir = m_i[:, None] & m_r[None, :]
        b_q = tl.load(q + (t0 + o_i)[:, None] * R + o_r[None, :], mask=m_Ir, other=0.).to(tl.float32)
        b_kI = tl.load(k + (t0 + o_i)[:, None] * R + o_r[None, :], mask=m_Ir, other=0.).to(tl.float32)
        b_k = tl.load(k + (t0 + o_j)[:, None] * R + o_r[None, :],
                      mask=m_j[:, None] & m_r[None, :], other=0.).to(tl.float32)  # (BT, BRS)
        # columns j < s_I: g^(i-j) = g^(i-s_I) * g^(s_I-j), both exponents >= 0
        b_qg = b_q * tl.exp2(o_c.to(tl.float32)[:, None] * b_lg[None, :])
        b_kg = tl.where(m_off[:, None], b_k * tl.exp2(n_k[:, None] * b_lg[None, :]), 0.)
        b_A += dot(b_qg, tl.trans(b_kg), DOT_MODE)             # (BC, BT), 0 for j >= s_I
        # diagonal sub-block: exact masked decay
        b_Ad += diag_scores(b_q, b_kI, b_lg, BC, DIAG_LOOP)
    return b_A, b_Ad


@triton.jit
def score_cols(q, k, lg, t0, s_J, L, R, BT: tl.constexpr, BC: tl.constexpr, BR: tl.constexpr,
               BRS: tl.constexpr, DIAG_LOOP: tl.constexpr, DOT_MODE: tl.constexpr):
    """Columns j of sub-chunk J (first chunk-local index s_J), transposed: At[j, i] = A[i, j]
    -> (b_At (BC, BT): the rows i > e_J = s_J + BC - 1, 0 elsewhere;  b_Atd (BC, BC): the
    diagonal block, transposed (0 below its diagonal)).  For i > e_J >= j the decay splits as
    g^(i-j) = g^(i-e_J) * g^(e_J-j), both exponents >= 0."""
    o_c = tl.arange(0, BC)
    o_j = s_J + o_c
    o_i = tl.arange(0, BT)
    e_J = s_J + BC - 1
    m_j = o_j < L
    m_i = o_i < L
    m_aft = (o_i > e_J) & m_i
    n_q = tl.where(m_aft, o_i - e_J, 0).to(tl.float32)
    n_k = (e_J - o_j).to(tl.float32)
    b_At = tl.zeros([BC, BT], dtype=tl.float32)
    b_Ad = tl.zeros([BC, BC], dtype=tl.float32)
    for r0 in range(0, BR, BRS):
        o_r = r0 + tl.arange(0, BRS)
        m_r = o_r < R
        b_lg = tl.load(lg + o_r, mask=m_r, other=0.)
        m_Jr = m_j[:, None] & m_r[None, :]
        b_kJ = tl.load(k + (t0 + o_j)[:, None] * R + o_r[None, :], mask=m_Jr, other=0.).to(tl.float32)
        b_qJ = tl.load(q + (t0 + o_j)[:, None] * R + o_r[None, :], mask=m_Jr, other=0.).to(tl.float32)
        b_q = tl.load(q + (t0 + o_i)[:, None] * R + o_r[None, :],
                      mask=m_aft[:, None] & m_r[None, :], other=0.).to(tl.float32)  # (BT, BRS)
        b_kg = b_kJ * tl.exp2(n_k[:, None] * b_lg[None, :])
        b_qg = b_q * tl.exp2(n_q[:, None] * b_lg[None, :])
        b_At += dot(b_kg, tl.trans(b_qg), DOT_MODE)
        b_Ad += diag_scores(b_qJ, b_kJ, b_lg, BC, DIAG_LOOP)
    return b_At, tl.trans(b_Ad)


@triton.jit
def _intra_A_kernel(q, k, lg, A, cu_seqlens, chunk_indices, T, R, NT,
                    BT: tl.constexpr, BC: tl.constexpr, BR: tl.constexpr, BRS: tl.constexpr,
                    DIAG_LOOP: tl.constexpr, IS_VARLEN: tl.constexpr, DOT_MODE: tl.constexpr,
                    FLAT: tl.constexpr):
    """A[t, j] = sum_r q_tr k_jr g_r^(i-j) for j <= i (i, j chunk-local), 0 for j > i.

    One program writes the (BC, BT) rows of sub-chunk I of one chunk (every column, zeros
    included).  q, k: (B*T, R); A: (B*T, BT) float32.
    """
    if FLAT:
        i_i, i_t, i_b = chunk_tile(BT // BC, NT, IS_VARLEN)
    else:
        i_t, i_i, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    _, _, _, i_s, L, t0 = chunk_bounds(cu_seqlens, chunk_indices, i_t, i_b, T, NT, BT, IS_VARLEN)
    s_I = i_i * BC
    o_i = s_I + tl.arange(0, BC)
    o_j = tl.arange(0, BT)
    m_i = o_i < L
    b_A, b_Ad = score_rows(q, k, lg, t0, s_I, L, R, BT, BC, BR, BRS, DIAG_LOOP, DOT_MODE)
    # two disjoint stores: every column outside the diagonal block, then the block itself
    m_out = (o_j < s_I) | (o_j >= s_I + BC)
    tl.store(A + (t0 + o_i)[:, None] * BT + o_j[None, :], b_A, mask=m_i[:, None] & m_out[None, :])
    tl.store(A + (t0 + o_i)[:, None] * BT + o_i[None, :], b_Ad, mask=m_i[:, None])


@triton.jit
def _chunk_state_kernel(x, y, lg, s, cu_seqlens, chunk_indices, T, R, D, NT,
                        BT: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr,
                        REVERSE: tl.constexpr, IS_VARLEN: tl.constexpr, DOT_MODE: tl.constexpr,
                        FLAT: tl.constexpr):
    """Chunk-local state s[c] = (x * g^n)^T @ y, a (BR, BD) block of the (R, D) state.

    forward  (REVERSE=False): x = k, y = v,  n = L-1-j   -> dS[c], the chunk's own contribution
    backward (REVERSE=True):  x = q, y = do, n = i+1     -> dH[c], the gradient it sends back
    x: (B*T, R), y: (B*T, D), s: (NC, R, D) float32.  The contraction over the chunk's tokens
    runs in BK-token slices (see ``kernels/settings.py``: one (BT, BD) operand of an fp32 dot on CUDA
    cores does not fit in registers).
    """
    if FLAT:
        i_d, i_t, i_b = chunk_tile(tl.cdiv(D, BD), NT, IS_VARLEN)
    else:
        i_d, i_t, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    _, _, _, i_s, L, t0 = chunk_bounds(cu_seqlens, chunk_indices, i_t, i_b, T, NT, BT, IS_VARLEN)
    o_r, m_r = block(0, BR, R)
    o_d, m_d = block(i_d, BD, D)
    b_lg = tl.load(lg + o_r, mask=m_r, other=0.)
    b_s = tl.zeros([BR, BD], dtype=tl.float32)
    for k0 in range(0, BT, BK):
        o_t = k0 + tl.arange(0, BK)
        m_t = o_t < L
        b_x = load_rows(x, t0 + o_t, m_t, o_r, m_r, R).to(tl.float32)               # (BK, BR)
        b_y = load_rows(y, t0 + o_t, m_t, o_d, m_d, D)                              # (BK, BD)
        if REVERSE:
            n = o_t + 1
        else:
            n = tl.where(m_t, L - 1 - o_t, 0)
        b_x = b_x * tl.exp2(n.to(tl.float32)[:, None] * b_lg[None, :])
        b_s += dot(tl.trans(b_x), b_y, DOT_MODE)                                 # (BR, BD)
    p_s = s + i_s * R * D + o_r[:, None] * D + o_d[None, :]
    tl.store(p_s, b_s, mask=m_r[:, None] & m_d[None, :])


@triton.jit
def _compose(a1, b1, a2, b2):
    """(h -> a2 (a1 h + b1) + b2) as one affine map: the combine of the state pass's scan."""
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _walk(s, b_h, b_lg, o_e, m_e, c0, first, cnt, T_n, R, D, BT: tl.constexpr, CB: tl.constexpr,
          REVERSE: tl.constexpr):
    """Walk chunks first .. first + cnt - 1 of one sequence (rows c0 + chunk of s; T_n tokens),
    in place: each receives the running value h entering it (walk order: reversed for REVERSE),
    and h <- g^L h + s[c] after it.  CB chunks per step: the affine maps of the step are composed
    by ``tl.associative_scan`` (products of decays, exponents >= 0: nothing divides), so the
    dependent steps are ceil(cnt / CB), and every step's loads are independent of h.  -> h after
    the last chunk."""
    o_b = tl.arange(0, CB)
    for i0 in range(0, cnt, CB):
        # row j of the step: the chunk at walk position i0 + j
        i_w = i0 + o_b
        m_w = i_w < cnt
        if REVERSE:
            i_c = first + cnt - 1 - i_w
        else:
            i_c = first + i_w
        # the map of the chunk before row j in walk order (identity for row 0: h enters there)
        m_p = m_w & (o_b > 0)
        if REVERSE:
            i_p = i_c + 1
        else:
            i_p = i_c - 1
        L_p = tl.maximum(tl.minimum(T_n - i_p * BT, BT), 0)               # 0 on the masked rows
        m_pe = m_p[:, None] & m_e[None, :]
        b_b = tl.load(s + (c0 + i_p)[:, None] * R * D + o_e[None, :], mask=m_pe, other=0.)
        b_a = tl.where(m_pe, tl.exp2(L_p.to(tl.float32)[:, None] * b_lg[None, :]), 1.)
        # the step's last chunk, for the value after it (loaded before the stores below overwrite it)
        n_w = tl.minimum(cnt - i0, CB)
        i_l = i0 + n_w - 1
        if REVERSE:
            i_lc = first + cnt - 1 - i_l
        else:
            i_lc = first + i_l
        L_l = tl.minimum(T_n - i_lc * BT, BT)
        b_sl = tl.load(s + (c0 + i_lc) * R * D + o_e, mask=m_e, other=0.)
        b_A, b_B = tl.associative_scan((b_a, b_b), 0, _compose)
        b_in = b_A * b_h[None, :] + b_B                                 # the value entering each chunk
        tl.store(s + (c0 + i_c)[:, None] * R * D + o_e[None, :], b_in, mask=m_w[:, None] & m_e[None, :])
        b_last = tl.sum(tl.where((o_b == n_w - 1)[:, None], b_in, 0.), axis=0)
        b_h = tl.exp2(L_l.to(tl.float32) * b_lg) * b_last + b_sl
    return b_h


@triton.jit
def _state_pass_kernel(s, lg, h0, ht, cu_seqlens, chunk_offsets, T, R, D, NT,
                       BT: tl.constexpr, BLOCK: tl.constexpr, CB: tl.constexpr, USE_INITIAL_STATE: tl.constexpr,
                       STORE_FINAL_STATE: tl.constexpr, REVERSE: tl.constexpr,
                       IS_VARLEN: tl.constexpr, FLAT: tl.constexpr):
    """The pass over the chunks of sequence i_n, elementwise on BLOCK flat (r, d) entries.

    In place on s (NC, R, D): chunk c holds its chunk-local term s[c] and receives the running
    value h entering it, where h <- g^L(c) * h + s[c] chunk after chunk.  Forward, h starts at
    the initial state and s[c] becomes S_prev[c]; REVERSE walks from the last chunk, h starts at
    dfinal and s[c] becomes G[c].  The value after the walk (final state / dh0) goes to ht.
    h0, ht: (N, R, D) float32.  CB chunks per dependent step (``_walk``).

    Also level B of the grouped pass (``ChunkPlan.state_pass``): the same walk over the groups'
    totals, a group of G chunks being one "chunk" of BT = G * CHUNK tokens.
    """
    if FLAT:
        i_e, _, i_n = tile_ids(tl.cdiv(R * D, BLOCK), 1)
    else:
        i_n, i_e = tl.program_id(0), tl.program_id(1)
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
        T_n = eos - bos
        c0 = tl.load(chunk_offsets + i_n).to(tl.int64)
        NT_n = tl.cdiv(T_n, BT)
    else:
        T_n = T
        c0 = i_n.to(tl.int64) * NT
        NT_n = NT
    o_e = i_e * BLOCK + tl.arange(0, BLOCK)
    m_e = o_e < R * D
    b_lg = tl.load(lg + o_e // D, mask=m_e, other=0.)
    b_h = tl.zeros([BLOCK], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_h = tl.load(h0 + i_n.to(tl.int64) * R * D + o_e, mask=m_e, other=0.).to(tl.float32)
    b_h = _walk(s, b_h, b_lg, o_e, m_e, c0, 0, NT_n, T_n, R, D, BT, CB, REVERSE)
    if STORE_FINAL_STATE:
        tl.store(ht + i_n.to(tl.int64) * R * D + o_e, b_h, mask=m_e)


@triton.jit
def _group_of(i_g, cu_seqlens, chunk_offsets, group_indices, T, NT, NGR, G, BT: tl.constexpr,
              IS_VARLEN: tl.constexpr):
    """-> (c0, T_n, first, cnt) of group i_g of the grouped state pass: the first chunk_states row
    of its sequence, the sequence's length, its first chunk within the sequence and its number of
    chunks (G, fewer in a sequence's last group).  Groups never cross a sequence: with packed
    sequences group_indices (NG, 2) holds (sequence, group within it); else NGR groups per row."""
    if IS_VARLEN:
        n = tl.load(group_indices + i_g * 2).to(tl.int64)
        j = tl.load(group_indices + i_g * 2 + 1)
        bos = tl.load(cu_seqlens + n).to(tl.int64)
        T_n = tl.load(cu_seqlens + n + 1).to(tl.int64) - bos
        c0 = tl.load(chunk_offsets + n).to(tl.int64)
    else:
        n = i_g // NGR
        j = i_g - n * NGR
        T_n = T
        c0 = n.to(tl.int64) * NT
    first = j * G
    cnt = tl.minimum(tl.cdiv(T_n, BT) - first, G).to(tl.int32)
    return c0, T_n, first, cnt


@triton.jit
def _group_block(lg, cu_seqlens, chunk_offsets, group_indices, T, R, D, NT, NGR, G, BT: tl.constexpr,
                 BLOCK: tl.constexpr, IS_VARLEN: tl.constexpr, FLAT: tl.constexpr):
    """The group and element block of a level-A / level-C program: (i_g, its first chunk's row c0,
    its sequence's length T_n, its first chunk and chunk count within the sequence, the BLOCK flat
    (r, d) offsets and mask, log2 gamma of each)."""
    if FLAT:
        i_e, _, i_g = tile_ids(tl.cdiv(R * D, BLOCK), 1)
    else:
        i_e, i_g = tl.program_id(0), tl.program_id(1)
    c0, T_n, first, cnt = _group_of(i_g, cu_seqlens, chunk_offsets, group_indices, T, NT, NGR, G, BT,
                                    IS_VARLEN)
    o_e = i_e * BLOCK + tl.arange(0, BLOCK)
    m_e = o_e < R * D
    b_lg = tl.load(lg + o_e // D, mask=m_e, other=0.)
    return i_g, c0, T_n, first, cnt, o_e, m_e, b_lg


@triton.jit
def _group_sum_kernel(s, hg, lg, cu_seqlens, chunk_offsets, group_indices, T, R, D, NT, NGR, G,
                      BT: tl.constexpr, BLOCK: tl.constexpr, CB: tl.constexpr, REVERSE: tl.constexpr,
                      IS_VARLEN: tl.constexpr, FLAT: tl.constexpr):
    """Level A of the grouped state pass: the total of group i_g, the value its chunks' maps
    h -> g^L h + s[c] give from h = 0 (walk order: reversed for REVERSE), as one weighted sum
    hg[i_g] = sum_c g^(n_c) s[c], n_c the tokens of the group after chunk c in walk order (the
    group's own decay g^(its tokens) is recomputed where needed, not stored).  Reads s only;
    hg: (NG, R, D) float32.  No dependent steps: the group's chunks in tiles of CB, one fixed-order
    sum."""
    i_g, c0, T_n, first, cnt, o_e, m_e, b_lg = _group_block(lg, cu_seqlens, chunk_offsets, group_indices, T, R,
                                                            D, NT, NGR, G, BT, BLOCK, IS_VARLEN, FLAT)
    o_b = tl.arange(0, CB)
    if REVERSE:
        e_g = first * BT                                    # walk order ends at the group's first token
    else:
        e_g = tl.minimum((first + cnt) * BT, T_n)           # ... at its last
    b_acc = tl.zeros([CB, BLOCK], dtype=tl.float32)
    for i0 in range(0, cnt, CB):
        i_c = first + i0 + o_b
        m_w = (i0 + o_b) < cnt
        if REVERSE:
            n_c = i_c * BT - e_g                            # the group's chunks before c
        else:
            n_c = e_g - tl.minimum((i_c + 1) * BT, T_n)     # ... after c
        n_c = tl.where(m_w, n_c, 0)
        m_we = m_w[:, None] & m_e[None, :]
        b_s = tl.load(s + (c0 + i_c)[:, None] * R * D + o_e[None, :], mask=m_we, other=0.)
        b_acc += tl.exp2(n_c.to(tl.float32)[:, None] * b_lg[None, :]) * b_s
    tl.store(hg + i_g.to(tl.int64) * R * D + o_e, tl.sum(b_acc, axis=0), mask=m_e)


@triton.jit
def _group_apply_kernel(s, hg, lg, cu_seqlens, chunk_offsets, group_indices, T, R, D, NT, NGR, G,
                        BT: tl.constexpr, BLOCK: tl.constexpr, CB: tl.constexpr, REVERSE: tl.constexpr,
                        IS_VARLEN: tl.constexpr, FLAT: tl.constexpr):
    """Level C of the grouped state pass: from the value entering group i_g (hg[i_g], level B's),
    the walk over the group's own chunks, in place on s (``_walk``: S_prev[c] forward, G[c]
    reversed); ceil(G / CB) dependent steps per program."""
    i_g, c0, T_n, first, cnt, o_e, m_e, b_lg = _group_block(lg, cu_seqlens, chunk_offsets, group_indices, T, R,
                                                            D, NT, NGR, G, BT, BLOCK, IS_VARLEN, FLAT)
    b_h = tl.load(hg + i_g.to(tl.int64) * R * D + o_e, mask=m_e, other=0.)
    _walk(s, b_h, b_lg, o_e, m_e, c0, first, cnt, T_n, R, D, BT, CB, REVERSE)


@triton.jit
def _chunk_out_kernel(x, y, lg, A, s, out, cu_seqlens, chunk_indices, T, R, D, NT,
                      BT: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr,
                      REVERSE: tl.constexpr, IS_VARLEN: tl.constexpr,
                      DOT_MODE: tl.constexpr, STATE_DOT_MODE: tl.constexpr, FLAT: tl.constexpr):
    """Per chunk and D-block (BT, BD):

    forward  (REVERSE=False): o  = A @ v    + (q * g^(i+1))   @ S_prev[c]   x = q, y = v
    backward (REVERSE=True):  dv = A^T @ do + (k * g^(L-1-j)) @ G[c]        x = k, y = do
    A: (B*T, BT) float32 from _intra_A_kernel; s: (NC, R, D) float32; out like y.
    Both contractions (over the chunk's tokens, over R) run in BK-wide slices.
    """
    if FLAT:
        i_d, i_t, i_b = chunk_tile(tl.cdiv(D, BD), NT, IS_VARLEN)
    else:
        i_d, i_t, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    _, _, _, i_s, L, t0 = chunk_bounds(cu_seqlens, chunk_indices, i_t, i_b, T, NT, BT, IS_VARLEN)
    o_t, m_t = block(0, BT, L)
    o_d, m_d = block(i_d, BD, D)
    b_o = tl.zeros([BT, BD], dtype=tl.float32)
    for k0 in range(0, BT, BK):
        o_k = k0 + tl.arange(0, BK)
        m_k = o_k < L
        if REVERSE:
            # b_A[j, i] = A[i, j]: row i of A lives at token t0 + i
            b_A = tl.load(A + (t0 + o_k)[None, :] * BT + o_t[:, None], mask=m_k[None, :], other=0.)
        else:
            b_A = tl.load(A + (t0 + o_t)[:, None] * BT + o_k[None, :], mask=m_t[:, None], other=0.)
        b_o += dot(b_A, load_rows(y, t0 + o_k, m_k, o_d, m_d, D), DOT_MODE)         # (BT, BD)
    if REVERSE:
        n = tl.where(m_t, L - 1 - o_t, 0)
    else:
        n = o_t + 1
    for r0 in range(0, BR, BK):
        o_r = r0 + tl.arange(0, BK)
        m_r = o_r < R
        b_lg = tl.load(lg + o_r, mask=m_r, other=0.)
        b_x = load_rows(x, t0 + o_t, m_t, o_r, m_r, R).to(tl.float32)               # (BT, BK)
        b_x = b_x * tl.exp2(n.to(tl.float32)[:, None] * b_lg[None, :])
        b_s = load_rows(s + i_s * R * D, o_r, m_r, o_d, m_d, D)                     # (BK, BD)
        b_o += dot(b_x, b_s, STATE_DOT_MODE)
    p_o = out + (t0 + o_t)[:, None] * D + o_d[None, :]
    tl.store(p_o, b_o.to(out.dtype.element_ty), mask=m_t[:, None] & m_d[None, :])


@triton.jit
def _state_terms(b_P, b_Qv, b_dd, b_doI, b_vI, p_h, p_g, o_r, m_r, o_d, m_d, D, STATE_DOT_MODE: tl.constexpr):
    """One D block's share of P = do_I @ S_prev^T, Qv = v_I @ G^T (BC, BRS) and
    dd = sum_d S_prev * G (BRS,), key channels o_r: added to (b_P, b_Qv, b_dd)."""
    b_h = load_rows(p_h, o_r, m_r, o_d, m_d, D)
    b_g = load_rows(p_g, o_r, m_r, o_d, m_d, D)
    return (b_P + dot(b_doI, tl.trans(b_h), STATE_DOT_MODE), b_Qv + dot(b_vI, tl.trans(b_g), STATE_DOT_MODE),
            b_dd + tl.sum(b_h * b_g, axis=1))


@triton.jit
def _bwd_dqk_kernel(q, k, v, do, lg, s, ds, dq, dk, dg, cu_seqlens, chunk_indices,
                    T, R, D, NT, BT: tl.constexpr, BC: tl.constexpr, BR: tl.constexpr,
                    BRS: tl.constexpr, BD: tl.constexpr, DIAG_LOOP: tl.constexpr, IS_VARLEN: tl.constexpr,
                    DOT_MODE: tl.constexpr,
                    STATE_DOT_MODE: tl.constexpr, FLAT: tl.constexpr):
    """dq, dk of the rows of sub-chunk I (BC, BR) and I's partial dgamma (BR,), terms (a)-(d).

    s: S_prev (NC, R, D), ds: G (NC, R, D); dg: (NC * BT/BC, R) float32 partials.
    Loops over D in BD blocks for dA (rows I: (BC, BT); columns I: (BT, BC)), then per slice
    of BRS key channels for P = do_I @ S_prev^T and Qv = v_I @ G^T (BC, BRS) and the rest.
    Grid (BT / BC, chunks, B): the sub-chunk programs of one chunk, which all load its whole
    do and v tiles and its two states, run back to back (and share them in cache).
    """
    if FLAT:
        i_i, i_t, i_b = chunk_tile(BT // BC, NT, IS_VARLEN)
    else:
        i_i, i_t, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    _, _, _, i_s, L, t0 = chunk_bounds(cu_seqlens, chunk_indices, i_t, i_b, T, NT, BT, IS_VARLEN)
    s_I = i_i * BC
    e_I = s_I + BC - 1
    o_c = tl.arange(0, BC)
    o_i = s_I + o_c                           # chunk-local rows of sub-chunk I
    o_j = tl.arange(0, BT)                    # chunk-local positions of the whole chunk
    m_i = o_i < L
    m_j = o_j < L

    # pass 1 over D: the blocks of dA = do @ v^T this sub-chunk needs, and, when all key channels
    # are one slice (BR == BRS), their products with the states too (one read of do_I, v_I)
    p_s0 = s + i_s * R * D
    p_ds0 = ds + i_s * R * D
    o_r1 = tl.arange(0, BRS)
    m_r1 = o_r1 < R
    b_dAr = tl.zeros([BC, BT], dtype=tl.float32)    # dA[i, j], i in I
    b_dAc = tl.zeros([BT, BC], dtype=tl.float32)    # dA[i, j], j in I
    b_dAd = tl.zeros([BC, BC], dtype=tl.float32)    # dA[i, j], i and j in I
    b_P1 = tl.zeros([BC, BRS], dtype=tl.float32)    # do_I . S_prev_r
    b_Qv1 = tl.zeros([BC, BRS], dtype=tl.float32)   # v_I . G_r
    b_dd1 = tl.zeros([BRS], dtype=tl.float32)       # sum_d S_prev * G
    for i_d in range(0, tl.cdiv(D, BD)):
        o_d, m_d = block(i_d, BD, D)
        b_doI = load_rows(do, t0 + o_i, m_i, o_d, m_d, D)
        b_vI = load_rows(v, t0 + o_i, m_i, o_d, m_d, D)
        b_doC = load_rows(do, t0 + o_j, m_j, o_d, m_d, D)
        b_vC = load_rows(v, t0 + o_j, m_j, o_d, m_d, D)
        b_dAr += dot(b_doI, tl.trans(b_vC), DOT_MODE)
        b_dAc += dot(b_doC, tl.trans(b_vI), DOT_MODE)
        b_dAd += dot(b_doI, tl.trans(b_vI), DOT_MODE)
        if BR == BRS:
            b_P1, b_Qv1, b_dd1 = _state_terms(b_P1, b_Qv1, b_dd1, b_doI, b_vI, p_s0, p_ds0, o_r1, m_r1,
                                              o_d, m_d, D, STATE_DOT_MODE)

    # pass 2, per slice of BRS key channels (everything below is elementwise in r): at BR = 128
    # the (BT, BR) fp32 tiles of one pass spilled ~800 B per thread (sm_90)
    for r0 in range(0, BR, BRS):
        o_r = r0 + tl.arange(0, BRS)
        m_r = o_r < R
        b_lg = tl.load(lg + o_r, mask=m_r, other=0.)
        if BR == BRS:                                   # formed in pass 1
            b_P, b_Qv, b_dd = b_P1, b_Qv1, b_dd1
        else:                                           # a pass over D per slice (a runtime choice
            # of reusing pass 1's first slice spilled 8-24 B at R >= 64, sm_90 / sm_100)
            b_P = tl.zeros([BC, BRS], dtype=tl.float32)
            b_Qv = tl.zeros([BC, BRS], dtype=tl.float32)
            b_dd = tl.zeros([BRS], dtype=tl.float32)
            for i_d in range(0, tl.cdiv(D, BD)):
                o_d, m_d = block(i_d, BD, D)
                b_P, b_Qv, b_dd = _state_terms(b_P, b_Qv, b_dd, load_rows(do, t0 + o_i, m_i, o_d, m_d, D),
                                               load_rows(v, t0 + o_i, m_i, o_d, m_d, D), p_s0, p_ds0, o_r, m_r,
                                               o_d, m_d, D, STATE_DOT_MODE)

        m_Ir = m_i[:, None] & m_r[None, :]
        m_Cr = m_j[:, None] & m_r[None, :]
        b_q = tl.load(q + (t0 + o_i)[:, None] * R + o_r[None, :], mask=m_Ir, other=0.).to(tl.float32)
        b_k = tl.load(k + (t0 + o_i)[:, None] * R + o_r[None, :], mask=m_Ir, other=0.).to(tl.float32)
        b_qC = tl.load(q + (t0 + o_j)[:, None] * R + o_r[None, :], mask=m_Cr, other=0.).to(tl.float32)
        b_kC = tl.load(k + (t0 + o_j)[:, None] * R + o_r[None, :], mask=m_Cr, other=0.).to(tl.float32)

        # dq, columns j < s_I: X = dA @ (k g^b), Y = dA @ (k b g^(b-1)), b = s_I - j >= 1;
        # dq = g^a X and W = a g^(a-1) X + g^a Y with a = i - s_I (W: the n g^(n-1) kernel of (a))
        m_off = o_j < s_I
        n_b = tl.where(m_off, s_I - o_j, 1).to(tl.float32)
        b_gb = tl.exp2(n_b[:, None] * b_lg[None, :])
        b_gb1 = tl.exp2((n_b - 1.)[:, None] * b_lg[None, :])
        b_kg = tl.where(m_off[:, None], b_kC * b_gb, 0.)
        b_kn = tl.where(m_off[:, None], b_kC * n_b[:, None] * b_gb1, 0.)
        b_X = dot(b_dAr, b_kg, DOT_MODE)                                           # (BC, BR)
        b_Y = dot(b_dAr, b_kn, DOT_MODE)
        n_a = (o_i - s_I).to(tl.float32)
        b_ga = tl.exp2(n_a[:, None] * b_lg[None, :])
        b_na = tl.where((n_a > 0)[:, None],
                        n_a[:, None] * tl.exp2(tl.maximum(n_a - 1., 0.)[:, None] * b_lg[None, :]), 0.)
        b_dq = b_ga * b_X
        b_W = b_na * b_X + b_ga * b_Y

        # dk, rows i > e_I: g^(i-j) = g^(i-e_I) * g^(e_I-j)
        m_aft = o_j > e_I
        n_c = tl.where(m_aft, o_j - e_I, 0).to(tl.float32)
        b_qg = tl.where(m_aft[:, None], b_qC * tl.exp2(n_c[:, None] * b_lg[None, :]), 0.)
        b_Z = dot(tl.trans(b_dAc), b_qg, DOT_MODE)                                # (BC, BR)
        b_dk = tl.exp2((e_I - o_i).to(tl.float32)[:, None] * b_lg[None, :]) * b_Z

        # diagonal sub-block (i, j both in I): exact masked decays, as (BC, BC, BRS) broadcasts, or
        # with DIAG_LOOP one position c of I at a time ((BC, BRS) registers per step)
        if not DIAG_LOOP:
            b_dAd3 = b_dAd[:, :, None]
            b_G3 = _diag_decay(o_c, b_lg, False)                                      # g^(i-j)
            b_dq += tl.sum(b_dAd3 * b_k[None, :, :] * b_G3, axis=1)
            b_dk += tl.sum(b_dAd3 * b_q[:, None, :] * b_G3, axis=0)
            b_W += tl.sum(b_dAd3 * b_k[None, :, :] * _diag_decay(o_c, b_lg, True), axis=1)  # (i-j) g^(i-j-1)
        for c in range(0, BC if DIAG_LOOP else 0):
            sel = o_c == c
            a_col = tl.sum(tl.where(sel[None, :], b_dAd, 0.), axis=1)                   # dA[i, c]   (BC,)
            a_row = tl.sum(tl.where(sel[:, None], b_dAd, 0.), axis=0)                   # dA[c, j]   (BC,)
            k_c = tl.sum(tl.where(sel[:, None], b_k, 0.), axis=0)                       # k[c, :]    (BR,)
            q_c = tl.sum(tl.where(sel[:, None], b_q, 0.), axis=0)                       # q[c, :]    (BR,)
            n_1 = (o_c - c)[:, None]                                                    # i - c
            b_dkc = a_col[:, None] * k_c[None, :]
            b_dq += tl.where(n_1 >= 0, b_dkc * tl.exp2(tl.maximum(n_1, 0).to(tl.float32) * b_lg[None, :]), 0.)
            b_W += tl.where(n_1 > 0, b_dkc * n_1.to(tl.float32) *
                            tl.exp2(tl.maximum(n_1 - 1, 0).to(tl.float32) * b_lg[None, :]), 0.)  # (i-c) g^(i-c-1)
            n_2 = (c - o_c)[:, None]                                                    # c - j
            b_dk += tl.where(n_2 >= 0, a_row[:, None] * q_c[None, :] *
                             tl.exp2(tl.maximum(n_2, 0).to(tl.float32) * b_lg[None, :]), 0.)

        # inter-chunk terms
        n_q = tl.where(m_i, o_i, 0).to(tl.float32)
        b_gq = tl.exp2(n_q[:, None] * b_lg[None, :])                                 # g^i
        b_dq += b_gq * tl.exp2(b_lg)[None, :] * b_P                                   # g^(i+1) P
        n_k = tl.where(m_i, L - 1 - o_i, 0).to(tl.float32)
        b_dk += tl.exp2(n_k[:, None] * b_lg[None, :]) * b_Qv                          # g^(L-1-j) Qv

        # dgamma partial: (a) + (b) + (c) [+ (d) once per chunk]
        b_dg = tl.sum(b_q * b_W, axis=0)
        b_dg += tl.sum(b_q * (n_q + 1.)[:, None] * b_gq * b_P, axis=0)
        m_c = m_i & (o_i < L - 1)
        n_c1 = tl.where(m_c, L - 2 - o_i, 0).to(tl.float32)
        b_nk = tl.where(m_c[:, None], (n_c1 + 1.)[:, None] * tl.exp2(n_c1[:, None] * b_lg[None, :]), 0.)
        b_dg += tl.sum(b_k * b_nk * b_Qv, axis=0)
        n_L = (L - 1).to(tl.float32)
        b_dg += tl.where(i_i == 0, (n_L + 1.) * tl.exp2(n_L * b_lg) * b_dd, 0.)

        tl.store(dq + (t0 + o_i)[:, None] * R + o_r[None, :], b_dq.to(dq.dtype.element_ty), mask=m_Ir)
        tl.store(dk + (t0 + o_i)[:, None] * R + o_r[None, :], b_dk.to(dk.dtype.element_ty), mask=m_Ir)
        tl.store(dg + (i_s * (BT // BC) + i_i) * R + o_r, b_dg, mask=m_r)


# --------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------


def _dot_modes(dtype: torch.dtype) -> Tuple[int, int]:
    """(intra-chunk dot mode, state dot mode) for the input dtype: products with the state stay
    fp32 for fp16 inputs, whose range a long-run state can exceed."""
    mode = dot_mode(dtype)
    return mode, (mode if dtype == torch.bfloat16 else 0)


def _check_chunk_size(chunk_size: int) -> int:
    bt = int(chunk_size)
    if bt < SUB_CHUNK or bt > 128 or bt & (bt - 1):
        raise ValueError(f"chunk_size must be a power of two in [{SUB_CHUNK}, 128], got {chunk_size!r}")
    return bt


class ChunkPlan:
    """What every chunked launcher of one call shares: chunk tables, tile settings, operand modes
    and the (chunks, batch rows) part of the grids -- NC and 1 with packed sequences, NT and B
    for a plain batch; the grids put the blocks that share a chunk's rows first, so they run
    back to back.

    ``seqs``: the packed sequences (``kop_triton.kernels.seqs.Varlen``; a cu_seqlens tensor is read
    into one) or None; the kernels get its offsets as given, or as int64 (``int64_offsets``: the
    fused K2 launchers').  ``settings``: the state pass's ``ScanSettings``."""

    def __init__(self, B: int, T: int, R: int, D: int, dtype: torch.dtype,
                 seqs, BT: int = CHUNK, device: Optional[torch.device] = None,
                 settings: ScanSettings = SCAN, int64_offsets: bool = False):
        check_rank(R)
        seqs = as_varlen(seqs)
        self.B, self.T, self.R, self.D, self.BT = B, T, R, D, BT
        self.dtype = dtype
        self.pass_settings = settings
        self.BR = max(16, triton.next_power_of_2(R))          # R as one block, >= the smallest tl.dot tile
        self.arch = target_arch(device) if device is not None else None
        self.seqs = seqs
        self.varlen = seqs is not None
        self.cu = None if seqs is None else seqs.offsets(dtype=torch.int64 if int64_offsets else None)
        self.N = seqs.N if self.varlen else B
        self.NT = triton.cdiv(T, BT)
        self.NC, self.chunk_indices, self.chunk_offsets = self._tables(BT)
        self._groups = None
        self.dot_mode, self.state_dot_mode = _dot_modes(dtype)
        self.grid_t = (self.NC, 1) if self.varlen else (self.NT, B)

    def _tables(self, BT: int):
        """(NC, chunk_indices, chunk_offsets) for chunks of BT tokens (both None for a plain batch)."""
        if not self.varlen:
            return self.B * triton.cdiv(self.T, BT), None, None
        return self.seqs.chunk_tables(BT)

    def settings(self, kernel: str, K: int = 1, **flags):
        """Launch settings of ``kernel`` for this plan's dtype, R, D and target (kernels/settings.py)."""
        return kernel_settings(kernel, self.dtype, R=self.R, D=self.D, K=K, arch=self.arch, **flags)

    def chunk_args(self):
        return dict(cu_seqlens=self.cu, chunk_indices=self.chunk_indices, T=self.T, NT=self.NT)

    def pass_args(self):
        return dict(cu_seqlens=self.cu, chunk_offsets=self.chunk_offsets, T=self.T, R=self.R, D=self.D,
                    NT=self.NT, BT=self.BT, BLOCK=self.pass_settings.pass_block, CB=self.pass_settings.pass_chunks,
                    IS_VARLEN=self.varlen)

    def chunk_states(self, x, y, lg, reverse: bool):
        """(NC, R, D) float32 chunk-local states (forward: x = k, y = v; reverse: x = q, y = do)."""
        st = self.settings("_chunk_state_kernel")
        s = torch.empty(self.NC, self.R, self.D, dtype=torch.float32, device=y.device)
        grid, fl = grid_of((triton.cdiv(self.D, st["BD"]), *self.grid_t))
        launch(_chunk_state_kernel, grid, FLAT=fl, **self.chunk_args(),
               x=x, y=y, lg=lg, s=s, R=self.R, D=self.D, BT=self.BT, BR=self.BR,
               REVERSE=reverse, IS_VARLEN=self.varlen, DOT_MODE=self.dot_mode, **st)
        return s

    def nt_max(self) -> int:
        """Chunks of the longest sequence (packed sequences: from the lengths read on the host)."""
        return self.seqs.max_chunks(self.BT) if self.varlen else self.NT

    def pass_groups(self):
        """(G, NG, group_indices, group_offsets, groups per batch row) of the grouped state pass,
        G = 0 for the single-level walk; groups are chunks of G * BT tokens (``Varlen.chunk_tables``)."""
        if self._groups is None:
            st = self.pass_settings
            G = pass_group(self.nt_max(), self.N * triton.cdiv(self.R * self.D, st.pass_block), st)
            if G == 0:
                self._groups = (0, 0, None, None, 0)
            else:
                NG, gi, go = self._tables(G * self.BT)
                self._groups = (G, NG, gi, go, triton.cdiv(self.NT, G))
        return self._groups

    def state_pass(self, s, lg, h0, store_final: bool, reverse: bool):
        """In place on s: the states entering every chunk (reverse: the gradients leaving it),
        from the chunk-local ones and h0 (None: zero); -> the final (N, R, D) state or None.
        Long sequences: three launches over groups of chunks (``pass_group``)."""
        ht = torch.empty(self.N, self.R, self.D, dtype=torch.float32, device=s.device) if store_final else None
        ne = triton.cdiv(self.R * self.D, self.pass_settings.pass_block)
        st = self.settings("_state_pass_kernel")
        flags = dict(USE_INITIAL_STATE=h0 is not None, STORE_FINAL_STATE=store_final, REVERSE=reverse)
        G, NG, gi, go, NGR = self.pass_groups()
        grid_b, fl_b = grid_of((self.N, ne), (ne, self.N))
        if G == 0:
            launch(_state_pass_kernel, grid_b, FLAT=fl_b, **self.pass_args(), s=s, lg=lg, h0=h0, ht=ht,
                   **flags, **st)
            return ht
        # A: every group's total -> hg; B: the walk over the totals (groups as chunks of G * BT
        # tokens), in place on hg -> the value entering each group; C: each group's walk from it
        hg = torch.empty(NG, self.R, self.D, dtype=torch.float32, device=s.device)
        grid, fl = grid_of((ne, NG))
        group_args = dict(s=s, hg=hg, lg=lg, cu_seqlens=self.cu, chunk_offsets=self.chunk_offsets,
                          group_indices=gi, T=self.T, R=self.R, D=self.D, NT=self.NT, NGR=NGR, G=G,
                          BT=self.BT, BLOCK=self.pass_settings.pass_block, CB=self.pass_settings.pass_chunks,
                          REVERSE=reverse, IS_VARLEN=self.varlen)
        launch(_group_sum_kernel, grid, FLAT=fl, **group_args, **self.settings("_group_sum_kernel"))
        pa = dict(self.pass_args(), chunk_offsets=go, NT=NGR, BT=G * self.BT)
        launch(_state_pass_kernel, grid_b, FLAT=fl_b, **pa, s=hg, lg=lg, h0=h0, ht=ht, **flags, **st)
        launch(_group_apply_kernel, grid, FLAT=fl, **group_args, **self.settings("_group_apply_kernel"))
        return ht

    def intra_A(self, q, k, lg):
        """(B*T, BT) float32 intra-chunk scores A[i, j] of every chunk."""
        A = torch.empty(self.B * self.T, self.BT, dtype=torch.float32, device=q.device)
        grid, fl = grid_of((self.grid_t[0], self.BT // SUB_CHUNK, self.grid_t[1]), (self.BT // SUB_CHUNK, *self.grid_t))
        launch(_intra_A_kernel, grid, FLAT=fl, **self.chunk_args(),
               q=q, k=k, lg=lg, A=A, R=self.R, BT=self.BT, BC=SUB_CHUNK, BR=self.BR,
               IS_VARLEN=self.varlen, DOT_MODE=self.dot_mode, **self.settings("_intra_A_kernel"))
        return A

    def chunk_out(self, x, y, lg, A, s, reverse: bool):
        """forward: o = A @ v + (q g^(i+1)) @ S_prev; reverse: dv = A^T @ do + (k g^(L-1-j)) @ G."""
        st = self.settings("_chunk_out_kernel")
        out = torch.empty_like(y)
        grid, fl = grid_of((triton.cdiv(self.D, st["BD"]), *self.grid_t))
        launch(_chunk_out_kernel, grid, FLAT=fl, **self.chunk_args(),
               x=x, y=y, lg=lg, A=A, s=s, out=out, R=self.R, D=self.D, BT=self.BT, BR=self.BR,
               REVERSE=reverse, IS_VARLEN=self.varlen, DOT_MODE=self.dot_mode,
               STATE_DOT_MODE=self.state_dot_mode, **st)
        return out

    def dqk(self, q, k, v, do, lg, states, dstates):
        """dq, dk (like q, k) and the (NC * BT/BC, R) float32 partials of dgamma."""
        n_sub = self.BT // SUB_CHUNK
        dq, dk = torch.empty_like(q), torch.empty_like(k)
        dg = torch.empty(self.NC * n_sub, self.R, dtype=torch.float32, device=q.device)
        grid, fl = grid_of((n_sub, *self.grid_t))
        launch(_bwd_dqk_kernel, grid, FLAT=fl, **self.chunk_args(),
               q=q, k=k, v=v, do=do, lg=lg, s=states, ds=dstates, dq=dq, dk=dk, dg=dg, R=self.R, D=self.D,
               BT=self.BT, BC=SUB_CHUNK, BR=self.BR, IS_VARLEN=self.varlen, DOT_MODE=self.dot_mode,
               STATE_DOT_MODE=self.state_dot_mode, **self.settings("_bwd_dqk_kernel"))
        return dq, dk, dg


def scan_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gamma: torch.Tensor,
             initial_state: Optional[torch.Tensor], output_final_state: bool,
             cu_seqlens, chunk_size: int = CHUNK, settings: ScanSettings = SCAN):
    """Forward launcher (no autograd). -> (o, final_state or None, chunk_states).

    q, k: (B, T, R) and v: (B, T, D) of one dtype (float32/bfloat16/float16); gamma (R,);
    initial_state (N, R, D) or None; cu_seqlens (N+1,) int32/int64, or the ``Varlen`` read from
    it (``kop_triton.kernels.seqs``), or None (then B == 1); settings: the state pass's.
    o: (B, T, D) in v's dtype; final_state (N, R, D) float32; chunk_states (NC, R, D) float32
    in the layout described in the module docstring.  T = 0 launches nothing: the state
    passes through unchanged.
    """
    BT = _check_chunk_size(chunk_size)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    B, T, R = q.shape
    D = v.shape[-1]
    check_rank(R)
    seqs = as_varlen(cu_seqlens)
    if T == 0:
        N = seqs.N if seqs is not None else B
        final = passthrough(initial_state, (N, R, D), q.device) if output_final_state else None
        return torch.empty_like(v), final, torch.zeros(0, R, D, dtype=torch.float32, device=q.device)
    P = ChunkPlan(B, T, R, D, v.dtype, seqs, BT, q.device, settings)
    lg = log2_gamma(gamma)
    h0 = None if initial_state is None else initial_state.to(torch.float32).contiguous()
    A = P.intra_A(q, k, lg)
    states = P.chunk_states(k, v, lg, reverse=False)
    final = P.state_pass(states, lg, h0, output_final_state, reverse=False)
    return P.chunk_out(q, v, lg, A, states, reverse=False), final, states


def scan_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gamma: torch.Tensor,
             initial_state: Optional[torch.Tensor], chunk_states: torch.Tensor, do: torch.Tensor,
             dfinal_state: Optional[torch.Tensor], cu_seqlens,
             chunk_size: int = CHUNK, settings: ScanSettings = SCAN):
    """Backward launcher (no autograd). -> (dq, dk, dv, dgamma, dinitial_state or None).

    chunk_states: from scan_fwd (same chunk_size, cu_seqlens and settings); it is only read.
    do: (B, T, D); dfinal_state: (N, R, D) or None (zero).  dq, dk, dv in the inputs' dtype,
    dgamma (R,) float32 (per-block partials summed in a fixed order), dinitial_state (N, R, D)
    float32 when initial_state is given.
    """
    BT = _check_chunk_size(chunk_size)
    q, k, v, do = q.contiguous(), k.contiguous(), v.contiguous(), do.to(v.dtype).contiguous()
    B, T, R = q.shape
    D = v.shape[-1]
    check_rank(R)
    seqs = as_varlen(cu_seqlens)
    if T == 0:
        N = seqs.N if seqs is not None else B
        dh0 = None if initial_state is None else passthrough(dfinal_state, (N, R, D), q.device)
        return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
                torch.zeros(R, dtype=torch.float32, device=q.device), dh0)
    P = ChunkPlan(B, T, R, D, v.dtype, seqs, BT, q.device, settings)
    if tuple(chunk_states.shape) != (P.NC, R, D):
        raise ValueError(f"chunk_states must have shape (NC, R, D) = {(P.NC, R, D)} for chunk_size "
                         f"{BT}, got {tuple(chunk_states.shape)}")
    lg = log2_gamma(gamma)
    states = chunk_states.to(torch.float32).contiguous()
    dht = None if dfinal_state is None else dfinal_state.to(torch.float32).contiguous()
    # G[c]: gradient w.r.t. the state after chunk c (reverse pass, in place on dstates)
    dstates = P.chunk_states(q, do, lg, reverse=True)
    dh0 = P.state_pass(dstates, lg, dht, initial_state is not None, reverse=True)
    dv = P.chunk_out(k, do, lg, P.intra_A(q, k, lg), dstates, reverse=True)
    dq, dk, dg = P.dqk(q, k, v, do, lg, states, dstates)
    # fixed-order reduction of the per-(chunk, sub-chunk) partials, in float64
    dgamma = dg.sum(dim=0, dtype=torch.float64).to(torch.float32)
    return dq, dk, dv, dgamma, dh0
