"""Pieces shared by the Triton kernels: the matrix-product helper and its operand mode."""
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
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")


def dot_mode(dtype: torch.dtype) -> int:
    """Operand mode of ``dot`` for inputs of ``dtype``: the input's half type, else fp32 IEEE."""
    if dtype == torch.bfloat16:
        return 3 if os.environ.get("TRITON_INTERPRET") == "1" else 1
    if dtype == torch.float16:
        return 2
    return 0
