"""Small Triton kernels with known compile-gate verdicts, for tests/test_gpu_compile.py (they
show the gate can fail: a compile error, spills, tensor cores, no TF32)."""
import triton
import triton.language as tl

EPS = 1e-8      # a plain Python float: the compiler rejects it inside @triton.jit


@triton.jit
def uses_python_float(x, N: tl.constexpr):
    o = tl.arange(0, N)
    tl.store(x + o, tl.load(x + o) + EPS)


@triton.jit
def big_fp32_dot(a, b, c, M: tl.constexpr, K: tl.constexpr, N: tl.constexpr, BF16: tl.constexpr):
    """c = a @ b in one tl.dot: fp32 IEEE on CUDA cores (64 x 128 x 64 spills), or bf16 operands."""
    om, ok, on = tl.arange(0, M), tl.arange(0, K), tl.arange(0, N)
    x = tl.load(a + om[:, None] * K + ok[None, :])
    y = tl.load(b + ok[:, None] * N + on[None, :])
    if BF16:
        z = tl.dot(x.to(tl.bfloat16), y.to(tl.bfloat16))
    else:
        z = tl.dot(x, y, input_precision="ieee")
    tl.store(c + om[:, None] * N + on[None, :], z)


@triton.jit
def tf32_dot(a, b, c, M: tl.constexpr, K: tl.constexpr, N: tl.constexpr):
    om, ok, on = tl.arange(0, M), tl.arange(0, K), tl.arange(0, N)
    x = tl.load(a + om[:, None] * K + ok[None, :])
    y = tl.load(b + ok[:, None] * N + on[None, :])
    tl.store(c + om[:, None] * N + on[None, :], tl.dot(x, y, input_precision="tf32"))
