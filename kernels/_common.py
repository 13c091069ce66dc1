"""Pieces shared by the Triton kernels: the matrix-product helper, its operand mode, log2(gamma),
the float32 operands the launchers pass."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def dot(a, b, DOT_MODE: tl.constexpr):
    """a @ b with float32 accumulation.  DOT_MODE 0: fp32 operands, IEEE (never TF32);
    1: bf16 operands (tensor cores); 2: fp16 operands (tensor cores); 3: bf16-rounded operands
    in an fp32 IEEE product -- the same result as 1, for the Triton 3.6 interpreter, whose
    tl.dot multiplies the raw bits of bf16 operands."""
    if DOT_MODE == 1:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    elif DOT_MODE == 2:
        return tl.dot(a.to(tl.float16), b.to(tl.float16))
    elif DOT_MODE == 3:
        return tl.dot(a.to(tl.bfloat16).to(tl.float32), b.to(tl.bfloat16).to(tl.float32),
                      input_precision="ieee")
    else:
        M: tl.constexpr = a.shape[0]
        K: tl.constexpr = a.shape[1]
        N: tl.constexpr = b.shape[1]
        return _dot_ieee(a.to(tl.float32), b.to(tl.float32), K > 16 and M * N * K >= SPLIT_MIN_VOLUME)


@triton.jit
def tile_ids(N0, N1):
    """(i0, i1, i2) of this program in a (N0, N1, N2) grid that the launcher flattened onto axis 0
    (``launch.flat``; axis 0 fastest): only axis x may grow past CUDA's 65,535 programs."""
    pid = tl.program_id(0).to(tl.uint32)
    n0 = tl.cast(N0, tl.uint32)
    n1 = tl.cast(N1, tl.uint32)
    r = pid // n0
    i2 = r // n1
    return (pid - r * n0).to(tl.int32), (r - i2 * n1).to(tl.int32), i2.to(tl.int32)


@triton.jit
def block(i, BLOCK: tl.constexpr, N):
    """(offsets, mask) of block i of BLOCK indices over 0..N-1."""
    o = i * BLOCK + tl.arange(0, BLOCK)
    return o, o < N


@triton.jit
def load_rows(p, rows, m_rows, cols, m_cols, W):
    """p[rows, cols] of a row-major matrix of row length W, zero outside the masks."""
    return tl.load(p + rows[:, None] * W + cols[None, :], mask=m_rows[:, None] & m_cols[None, :], other=0.)


# fp32 IEEE products run on CUDA cores, where every thread holds its rows of a and its columns
# of b over the whole contraction.  Measured with the offline compile gate (sm_90, 4 warps): a
# 64 x 64 x 64 product alone spills 424 B per thread, 64 x 128 x 64 9.7 KB; cut into
# contraction slices of 16 neither spills (155 / 226 registers).  Small products are cheaper
# whole (16 x 128 x 16: 32 registers whole, 91 sliced), hence the volume threshold; it includes the
# 16 x 64 x 128 products of _bwd_dqk and _intra_A, which spilled inside those kernels at R = 128.
SPLIT_MIN_VOLUME = tl.constexpr(64 * 64 * 32)


@triton.jit
def _dot_ieee(a, b, SPLIT: tl.constexpr):
    """fp32 IEEE a @ b; with SPLIT, as a sum of products over contraction slices of 16 (the
    register halves of a's columns and b's rows, recursively)."""
    K: tl.constexpr = a.shape[1]
    if SPLIT and K > 16:
        M: tl.constexpr = a.shape[0]
        N: tl.constexpr = b.shape[1]
        a0, a1 = tl.split(tl.permute(tl.reshape(a, (M, 2, K // 2)), (0, 2, 1)))
        b0, b1 = tl.split(tl.permute(tl.reshape(b, (2, K // 2, N)), (1, 2, 0)))
        return _dot_ieee(a0, b0, SPLIT) + _dot_ieee(a1, b1, SPLIT)
    else:
        return tl.dot(a, b, input_precision="ieee")


def dot_mode(dtype: torch.dtype) -> int:
    """Operand mode of ``dot`` for inputs of ``dtype``: the input's half type, else fp32 IEEE."""
    if dtype == torch.bfloat16:
        return 3 if os.environ.get("TRITON_INTERPRET") == "1" else 1
    if dtype == torch.float16:
        return 2
    return 0


def log2_gamma(gamma: torch.Tensor) -> torch.Tensor:
    """log2(gamma) as the kernels take it, (R,) float32: every decay power is
    g^n = exp2(n * log2 g) with n >= 0.  Computed in float64 on the host side, so the
    exponents n * log2(g) lose no accuracy to it."""
    return torch.log2(gamma.detach().to(torch.float64)).to(torch.float32).contiguous()


def f32(t):
    """t as a kernel reads a float32 operand (detached, contiguous); None stays None."""
    return None if t is None else t.detach().to(torch.float32).contiguous()


def state_arg(state, K: int, placeholder: torch.Tensor):
    """(used, tensor) for a conv state (N, K-1, D): float32 when there is one and K > 1, else
    ``placeholder``, a pointer the kernel is told (used = False) never to read."""
    used = state is not None and K > 1
    return used, (f32(state) if used else placeholder)


def passthrough(state, shape, device) -> torch.Tensor:
    """No tokens (T = 0): nothing launches and a state passes through unchanged -> a float32 copy
    of ``state``, or float32 zeros of ``shape`` when it is None.  The one T = 0 rule of every
    launcher: a forward's final state is its initial one, a backward's initial-state gradient is
    the final state's cotangent."""
    if state is None:
        return torch.zeros(shape, dtype=torch.float32, device=device)
    return f32(state).clone()
