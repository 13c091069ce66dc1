"""The fused chunked K2 Function (ops/k2_chunked.py, what ``k2_mixer(backend="chunked")`` runs on
CPU) against the float64 naive composition: forward, both final states and every gradient with
random cotangents, at awkward sizes (T not a multiple of the chunk, T = K - 1, K - 1 equal to the
chunk, K = 1, decays at both ends of the range); the fallback cases; the hand-written RMSNorm and
the CPU dropout of modules.py."""
import pytest
import torch

from helpers import TOL, assert_close
from kop_triton import k2_mixer
from kop_triton.modules import Dropout, RMSNorm, _RMSNormFn
from kop_triton.ops.scan_chunked import CPU_CHUNK
from kop_triton.ops.k2_chunked import ChunkedK2Fn, fused_supported
from test_k2 import NAMES, check_all, f64, k2_inputs, run


def run_chunked(args, seed=1):
    """As test_k2.run, through the public op with backend "chunked" (the fused Function)."""
    x, u, v, alpha, gamma, w, gl, s0, c0 = args
    init = None if s0 is None and c0 is None else (s0, c0)
    y, (s1, c1) = k2_mixer(x, u, v, alpha, gamma, w, gl, initial_state=init, output_final_state=True,
                           backend="chunked")
    gen = torch.Generator().manual_seed(seed)
    cot = [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t) for t in (y, s1, c1)]
    loss = sum((t * c).sum() for t, c in zip((y, s1, c1), cot))
    return [y, s1, c1] + list(torch.autograd.grad(loss, [t for t in args if t is not None])), y


CASES = [  # B, T, D, R, K, init
    (2, 37, 5, 3, 8, True),        # T not a multiple of the chunk, states in and out
    (2, 37, 5, 3, 8, False),
    (1, 7, 4, 2, 8, True),         # T = K - 1 = the whole (single, short) chunk
    (3, 64, 6, 4, 17, True),       # K - 1 = chunk: the conv reaches across a whole chunk
    (2, 50, 3, 2, 1, False),       # K = 1 (no conv)
    (2, 50, 3, 2, 2, True),        # K = 2
    (1, 130, 16, 5, 4, True),      # many chunks, D and R not powers of two
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("B,T,D,R,K,init", CASES, ids=[f"B{c[0]}-T{c[1]}-D{c[2]}-R{c[3]}-K{c[4]}-init{int(c[5])}"
                                                       for c in CASES])
def test_fused_chunked_matches_naive(B, T, D, R, K, init, dtype):
    args = k2_inputs(B, T, D, R, K, dtype=dtype, init=init)
    assert fused_supported(args[0], args[5], CPU_CHUNK, None)
    got, y = run_chunked(args)
    assert type(y.grad_fn).__name__ == ChunkedK2Fn.__name__ + "Backward"    # the fused Function ran
    ref = run("naive", f64(args))
    names = NAMES if init else NAMES[:10]
    tol = TOL[("torch", dtype)]
    i_gate = NAMES.index("dgate_logit")
    if dtype == torch.float32:
        # dgate = g (1 - g) <W, kernel> is one sum with cancellation: bound its error by the size of
        # its terms, g (1 - g) |W| |kernel| = (1 - g) |dkernel| |kernel|, not by its own value
        g = torch.sigmoid(args[6].detach().double())
        scale = (1 - g) * ref[NAMES.index("dkernel")].norm() * args[5].detach().double().norm()
        err = float((got[i_gate].double() - ref[i_gate]).abs())
        assert err <= tol * float(scale), f"dgate_logit: abs error {err:.3e} > {tol:.0e} * {float(scale):.3e}"
        names = names[:i_gate] + ("skip",) + names[i_gate + 1:]
    for n, a, b in zip(names, got, ref):
        if n != "skip":
            assert_close(n, a, b, tol)
    for a, b in zip(got[3:], [t for t in args if t is not None]):
        assert a.dtype == b.dtype and a.shape == b.shape


def test_fused_chunked_extreme_decays_and_noncontiguous_x():
    x, u, v, alpha, gamma, w, gl, s0, c0 = k2_inputs(2, 45, 6, 4, 8, init=True)
    big = torch.randn(2, 45, 9, dtype=torch.float64)
    x = big[:, :, 1:7].detach().copy_(x.detach()).requires_grad_()     # a strided view
    gamma = torch.tensor([0.01, 0.2, 0.999999, 1.0], dtype=torch.float64, requires_grad=True)
    args = [x, u, v, alpha, gamma, w, gl, s0, c0]
    assert not x.is_contiguous()
    got, _ = run_chunked(args)
    check_all(got, run("naive", f64(args)), TOL[("torch", torch.float64)])


@pytest.mark.parametrize("case", ["short-T", "per-channel", "long-kernel", "bf16"])
def test_fallback_cases_use_the_composition_and_stay_exact(case):
    T, K, per_channel, dtype = 37, 8, False, torch.float64
    if case == "short-T":
        T = 5                      # K - 1 > T: the conv would reach past the previous chunk
    elif case == "per-channel":
        per_channel = True
    elif case == "long-kernel":
        K = CPU_CHUNK + 2
    else:
        dtype = torch.bfloat16
    args = k2_inputs(2, T, 4, 3, K, per_channel=per_channel, dtype=dtype, init=True)
    assert not fused_supported(args[0], args[5], CPU_CHUNK, None)
    got, y = run_chunked(args)
    assert type(y.grad_fn).__name__ != ChunkedK2Fn.__name__ + "Backward"
    tol = 0.05 if dtype == torch.bfloat16 else TOL[("torch", dtype)]
    check_all(got[:3], run("naive", f64(args))[:3], tol)


def test_fused_chunked_backward_is_deterministic():
    args = k2_inputs(2, 70, 8, 4, 8, dtype=torch.float32, init=True)
    a, _ = run_chunked(args)
    b, _ = run_chunked(args)
    for n, s, t in zip(NAMES, a, b):
        assert torch.equal(s, t), n


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_rmsnorm_function_matches_the_formula(dtype):
    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(7).to(dtype)
    with torch.no_grad():
        norm.scale.copy_(torch.randn(7, generator=g, dtype=torch.float64))
    x = (torch.randn(3, 5, 7, generator=g, dtype=torch.float64) * 3).to(dtype).requires_grad_()
    x.data[0, 0] = 0.0                                                    # a zero row: r = 1/sqrt(eps)
    y = norm(x)
    assert type(y.grad_fn).__name__ == "_RMSNormFnBackward"
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(dtype)
    dx, ds = torch.autograd.grad(y, (x, norm.scale), dy)
    x64, s64 = x.detach().double().requires_grad_(), norm.scale.detach().double().requires_grad_()
    y64 = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + norm.eps) * s64
    dx64, ds64 = torch.autograd.grad(y64, (x64, s64), dy.double())
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    for n, a, b in (("y", y, y64), ("dx", dx, dx64), ("dscale", ds, ds64)):
        assert_close(n, a, b, tol)


def test_rmsnorm_gradcheck():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    scale = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: _RMSNormFn.apply(a, b, 1e-8), (x, scale))


def test_cpu_dropout_rate_scale_gradient_and_eval():
    torch.manual_seed(0)
    d = Dropout(0.1)
    x = torch.ones(400, 1000, requires_grad=True)
    y = d(x)
    p = 6554 / 65536                                                      # 0.1 on the 2^-16 grid
    dropped = (y == 0).double().mean().item()
    assert abs(dropped - p) < 5 * (p * (1 - p) / x.numel()) ** 0.5        # five standard errors
    kept = y[y != 0]
    assert torch.allclose(kept, torch.full_like(kept, 1 / (1 - p)))
    (gx,) = torch.autograd.grad(y, x, torch.full_like(y, 2.0))
    assert torch.equal(gx, 2 * y.detach())                                 # gradient = the same mask
    torch.manual_seed(0)
    assert torch.equal(d(x), y)                                            # seeded: bit for bit
    d.eval()
    assert d(x) is x or torch.equal(d(x), x)
    assert torch.equal(Dropout(0.0).train()(x), x)
