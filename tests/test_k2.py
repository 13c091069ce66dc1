"""The K2 mixing term, per path: the PyTorch references (gradcheck, agreement); the fused chunked
Function (ops/k2_chunked.py, what ``k2_mixer(backend="chunked")`` runs on CPU) and its fallback cases;
the fused Triton kernel; the torch.library ops (ops/library.py, what compiled graphs call: eager
agreement, opcheck, the backward's reuse of the forward's chunk states); bad inputs.  Each is compared
with the float64 unfused reference, forward and every gradient (x, u, v, alpha, gamma, kernel,
gate_logit, scan_state, conv_state) with random cotangents on y and on both final states."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from helpers import (CONV_ARG_ERRORS, CUDA_ONLY_INT64, CUDA_ONLY_LONG, DEVICE, INT32_EDGE, NEEDS_TRITON, TOL, TRITON_OK,
                     ErrorTally, assert_close, assert_triton_on_cpu_is_a_clear_error, check_blockwise,
                     conv_arg_error_cases, cotangent_grads, make_gamma, with_bad_conv_arg)
from kop_triton import k2_mixer
from kop_triton.ops.scan_chunked import CPU_CHUNK
from kop_triton.ops.k2 import reference_k2_mixer
from kop_triton.ops.k2_chunked import ChunkedK2Fn, fused_supported

needs_triton = pytest.mark.skipif(not TRITON_OK, reason=NEEDS_TRITON)
# ``race``: the curated set `make test` reruns with every Triton grid reversed and shuffled
# (tests/grid_order.py; KOP_GRID_ORDER); together the marked tests of test_scan, test_conv, test_k2
# and test_flat_grids launch every kernel with every flag value the compile gate's CI workload
# launches (checked by --race-coverage)
RACE = pytest.mark.race

NAMES = ("y", "scan_final", "conv_final", "dx", "du", "dv", "dalpha", "dgamma", "dkernel",
         "dgate_logit", "dscan_state", "dconv_state")


def k2_inputs(B, T, D, R, K, per_channel=False, dtype=torch.float64, N=None, seed=0, init=True,
              gamma_lo=0.01, device="cpu"):
    """x (B,T,D) unit-scale; u, v scaled so x@u is O(1); gamma spread over [gamma_lo, 1]."""
    g = torch.Generator().manual_seed(seed)
    N = B if N is None else N
    f = torch.float64
    x = torch.randn(B, T, D, generator=g, dtype=f)
    u = torch.randn(D, R, generator=g, dtype=f) / D ** 0.5
    v = torch.randn(D, R, generator=g, dtype=f) / D ** 0.5
    alpha = torch.rand(R, generator=g, dtype=f) * 0.8 + 0.2
    gamma = torch.linspace(gamma_lo, 1.0, R, dtype=f) if R > 1 else torch.tensor([0.9], dtype=f)
    w = torch.randn(*((D, K) if per_channel else (K,)), generator=g, dtype=f) / K ** 0.5
    gl = torch.tensor(0.4, dtype=f)
    s0 = torch.randn(N, R, D, generator=g, dtype=f) if init else None
    c0 = torch.randn(N, K - 1, D, generator=g, dtype=f) if init else None
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    out = [x.to(dtype)] + [t.to(pdt) for t in (u, v, alpha, gamma, w, gl)] + \
        [None if t is None else t.to(pdt) for t in (s0, c0)]
    return [None if t is None else t.to(device).requires_grad_() for t in out]


def run(backend, args, seed=1, cu_seqlens=None, **kw):
    """Forward + every gradient of (y.dy + scan_final.ds + conv_final.dc), random cotangents."""
    x, u, v, alpha, gamma, w, gl, s0, c0 = args
    init = None if s0 is None and c0 is None else (s0, c0)
    if backend in ("naive", "chunked", "recurrent"):
        y, (s1, c1) = reference_k2_mixer(x, u, v, alpha, gamma, w, gl, initial_state=init,
                                         output_final_state=True, cu_seqlens=cu_seqlens, scan_backend=backend)
    else:
        y, (s1, c1) = k2_mixer(x, u, v, alpha, gamma, w, gl, initial_state=init, output_final_state=True,
                               cu_seqlens=cu_seqlens, backend=backend, **kw)
    return [y, s1, c1] + list(cotangent_grads([y, s1, c1], args, seed))


def f64(args):
    return [None if t is None else t.detach().cpu().double().requires_grad_() for t in args]


def check_all(got, ref, tol, names=NAMES):
    assert len(got) == len(ref)
    for n, a, b in zip(names, got, ref):
        assert_close(n, a, b, tol)


# --------------------------------------------------------------------------------------
# references
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_channel,scan", [(False, "naive"), (True, "chunked")],
                         ids=["shared-naive", "per-channel-chunked"])
def test_reference_gradcheck_float64(per_channel, scan):
    args = k2_inputs(1, 5, 3, 2, 3, per_channel)

    def f(*a):
        y, (s1, c1) = reference_k2_mixer(*a[:7], initial_state=(a[7], a[8]), output_final_state=True,
                                         scan_backend=scan)
        return y, s1, c1

    assert torch.autograd.gradcheck(f, tuple(args), eps=1e-6, atol=1e-7)


@settings(max_examples=15, deadline=None)
@given(T=st.integers(1, 40), D=st.integers(1, 6), R=st.integers(1, 4), K=st.integers(1, 12),
       per_channel=st.booleans(), seed=st.integers(0, 10_000))
def test_reference_backends_agree(T, D, R, K, per_channel, seed):
    args = [None if t is None else t.detach() for t in k2_inputs(1, T, D, R, K, per_channel, seed=seed)]
    ref = reference_k2_mixer(*args[:7], initial_state=tuple(args[7:]), output_final_state=True, scan_backend="naive")
    for scan in ("recurrent", "chunked"):
        got = reference_k2_mixer(*args[:7], initial_state=tuple(args[7:]), output_final_state=True, scan_backend=scan)
        assert_close(f"y[{scan}]", got[0], ref[0], 1e-9)
        assert_close(f"scan_final[{scan}]", got[1][0], ref[1][0], 1e-9)
        assert_close(f"conv_final[{scan}]", got[1][1], ref[1][1], 0.0)


@pytest.mark.parametrize("R", [1, 3, 4])
def test_qk_analytic_backward_matches_autograd(R):
    """k2_qk_backward (the chain the Triton backward uses) == autograd through k2_qk in float64,
    including rows whose projection norm is below eps (x @ u = 0 exactly, x @ u tiny but
    nonzero, only one of the two projections zero) where eps, not the norm, divides."""
    from kop_triton.ops.k2 import NORM_EPS, k2_qk, k2_qk_backward
    g = torch.Generator().manual_seed(R)
    B, T, D = 2, 9, 6
    f = torch.float64
    x = torch.randn(B, T, D, generator=g, dtype=f)
    u, v = torch.randn(D, R, generator=g, dtype=f), torch.randn(D, R, generator=g, dtype=f)
    alpha = torch.rand(R, generator=g, dtype=f) + 0.2
    u[0] = 0.0                                                       # so that e_0 @ u == 0 exactly
    x[0, 1] = 0.0                                                    # both projections exactly 0
    x[1, 4] *= 1e-10                                                 # both tiny, nonzero
    # x @ u == 0 exactly, x @ v O(1) (exactly: a rounding-level x @ u would be amplified by 1 / eps,
    # and x @ u and x @ [u | v] round differently on some BLAS kernels)
    x[1, 7] = 0.0
    x[1, 7, 0] = 1.3
    # ||x @ u|| just above eps (not at it: x @ u and x @ [u | v] may round the norm to either side
    # of eps on another BLAS kernel, and the two sides have different gradients)
    x[0, 5] *= 1.000001e-8 / float((x[0, 5] @ u).norm())
    nu, nv = (x @ u).norm(dim=-1), (x @ v).norm(dim=-1)
    assert float(nu[0, 1]) == 0.0 and 0 < float(nu[1, 4]) < NORM_EPS and float(nv[1, 4]) < NORM_EPS
    assert float(nu[1, 7]) < NORM_EPS < float(nv[1, 7])
    leaves = [t.clone().requires_grad_() for t in (x, u, v, alpha)]
    q, k = k2_qk(*leaves)
    dq, dk = torch.randn(B, T, R, generator=g, dtype=f), torch.randn(B, T, R, generator=g, dtype=f)
    ref = torch.autograd.grad((q, k), leaves, (dq, dk))
    got = k2_qk_backward(x, u, v, alpha, dq, dk)
    for n, a, b in zip(("dx", "du", "dv", "dalpha"), got, ref):
        assert a.dtype == f
        assert_close(n, a, b, 1e-12)
    assert_close("dx of the below-eps rows", got[0][[0, 1, 1], [1, 4, 7]], ref[0][[0, 1, 1], [1, 4, 7]], 1e-12)


@needs_triton
def test_triton_normalisation_backward_matches_autograd():
    """The Triton path's chain through the normalisation (kernels.k2.k2_dp, from the forward's
    q_hat, k and norms) == autograd through F.normalize in float64, including norms below eps
    (0 exactly, tiny, only one projection zero) where eps, not the norm, divides."""
    import torch.nn.functional as F
    from kop_triton.kernels.k2 import k2_dp
    from kop_triton.ops.k2 import NORM_EPS
    g = torch.Generator().manual_seed(3)
    M, R = 40, 5
    f = torch.float64
    pu, pv = torch.randn(M, R, generator=g, dtype=f), torch.randn(M, R, generator=g, dtype=f)
    pu[3], pv[3] = 0.0, 0.0
    pu[7] *= 1e-10
    pv[7] *= 1e-10
    pu[11] = 0.0
    pu[13] *= 1.5e-8 / float(pu[13].norm())                               # just above eps
    alpha = torch.rand(R, generator=g, dtype=f) + 0.2
    leaves = [t.clone().requires_grad_() for t in (pu, pv, alpha)]
    q = F.normalize(leaves[0], dim=-1, eps=NORM_EPS) * leaves[2]
    k = F.normalize(leaves[1], dim=-1, eps=NORM_EPS)
    dq, dk = torch.randn(M, R, generator=g, dtype=f), torch.randn(M, R, generator=g, dtype=f)
    ref = torch.autograd.grad((q, k), leaves, (dq, dk))
    nu, nv = pu.norm(dim=-1, keepdim=True), pv.norm(dim=-1, keepdim=True)
    qhn = torch.cat([pu / nu.clamp_min(NORM_EPS), nu, nv], 1).float()      # the forward's [q_hat | norms]
    k_hat = (pv / nv.clamp_min(NORM_EPS)).float()
    dp, dalpha = k2_dp(qhn.to(DEVICE), k_hat.to(DEVICE), alpha.float().to(DEVICE), dq.float().to(DEVICE),
                       dk.float().to(DEVICE))
    assert_close("dp_u", dp[:, :R], ref[0], 1e-6)
    assert_close("dp_v", dp[:, R:], ref[1], 1e-6)
    assert_close("dalpha", dalpha, ref[2], 1e-6)
    assert_close("dp of the below-eps rows", dp[[3, 7, 11], :R], ref[0][[3, 7, 11]], 1e-6)


# --------------------------------------------------------------------------------------
# the fused chunked Function (backend "chunked") vs the float64 naive composition: awkward sizes
# (T not a multiple of the chunk, T = K - 1, K - 1 equal to the chunk, K = 1, decays at both ends
# of the range) and the fallback cases
# --------------------------------------------------------------------------------------


def run_chunked(args, seed=1):
    """As run, through the public op with backend "chunked" (the fused Function)."""
    x, u, v, alpha, gamma, w, gl, s0, c0 = args
    init = None if s0 is None and c0 is None else (s0, c0)
    y, (s1, c1) = k2_mixer(x, u, v, alpha, gamma, w, gl, initial_state=init, output_final_state=True,
                           backend="chunked")
    return [y, s1, c1] + list(cotangent_grads([y, s1, c1], args, seed)), y


CHUNKED_CASES = [  # B, T, D, R, K, init
    (2, 37, 5, 3, 8, True),        # T not a multiple of the chunk, states in and out
    (2, 37, 5, 3, 8, False),
    (1, 7, 4, 2, 8, True),         # T = K - 1 = the whole (single, short) chunk
    (3, 64, 6, 4, 17, True),       # K - 1 = chunk: the conv reaches across a whole chunk
    (2, 50, 3, 2, 1, False),       # K = 1 (no conv)
    (2, 50, 3, 2, 2, True),        # K = 2
    (1, 130, 16, 5, 4, True),      # many chunks, D and R not powers of two
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("B,T,D,R,K,init", CHUNKED_CASES, ids=[f"B{c[0]}-T{c[1]}-D{c[2]}-R{c[3]}-K{c[4]}-init{int(c[5])}"
                                                       for c in CHUNKED_CASES])
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


# --------------------------------------------------------------------------------------
# fused Triton kernel vs the float64 reference
# --------------------------------------------------------------------------------------

CASES = {
    # name: (B, T, D, R, K, per_channel)
    "small-shared": (2, 70, 19, 3, 5, False),
    "T1": (3, 1, 6, 4, 8, False),
    "chunk-edges-T63": (1, 63, 10, 2, 3, False),           # chunk - 1
    "chunk-edges-T64": (2, 64, 10, 3, 3, True),            # chunk (R = 2 here made dgamma[1] a 1e-2 remainder of cancelling terms)
    "chunk-edges-T65-K1": (1, 65, 10, 2, 1, False),        # chunk + 1
    "T128-R2": (1, 128, 7, 2, 3, True),
    "2Dblocks-longK-dot": (2, 33, 70, 5, 40, False),
    "T<K-shared-dot": (2, 12, 9, 4, 65, False),
    "T<K-per-channel": (1, 20, 5, 3, 30, True),
    "R17-per-channel": (1, 100, 8, 17, 7, True),
    "R40-diag-loop-BD16": (1, 70, 20, 40, 5, False),      # R > 32: the launcher's other tile choices
    "T200-four-chunks": (1, 200, 12, 4, 8, False),
    "T1100-two-state-pass-steps": (1, 1100, 4, 2, 3, False),   # 18 chunks: the pass composes 16 per step
    "T0": (2, 0, 6, 3, 4, False),
}


@needs_triton
@pytest.mark.parametrize("case", [pytest.param(c, marks=RACE) if c == "chunk-edges-T64" else c for c in CASES])
def test_fused_matches_reference(case, nan_empty):
    B, T, D, R, K, pc = CASES[case]
    args = k2_inputs(B, T, D, R, K, pc, dtype=torch.float32, device=DEVICE)
    got = run("triton", args)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    check_all(got, run("naive", f64(args)), TOL[("triton", torch.float32)])


@needs_triton
def test_fused_rank_one():
    """R = 1: q = alpha * sign(x @ u), so du and dv vanish (up to rounding: checked absolutely)."""
    args = k2_inputs(1, 70, 7, 1, 3, True, dtype=torch.float32, device=DEVICE)
    got, ref = run("triton", args), run("naive", f64(args))
    for n, a, b in zip(NAMES, got, ref):
        if n in ("du", "dv"):
            assert float(b.abs().max()) < 1e-12 and float(a.abs().max()) < 1e-3, n
        elif n == "dgamma":
            # one scalar, here 3.44, summed from terms of size ~500: float32 summation leaves
            # ~1e-7 of the terms, 1.0e-5 of the result (the scan kernels alone measure the same)
            assert_close(n, a, b, 5e-5)
        else:
            assert_close(n, a, b, TOL[("triton", torch.float32)])


@needs_triton
@RACE
def test_fused_narrow_channel_blocks(monkeypatch, nan_empty):
    """BD = 16: D = 40 in three channel blocks (the last one partial), by every kernel of the
    fused forward and backward, and the q, k projection over D in three slices."""
    from kop_triton.kernels import settings
    monkeypatch.setattr(settings, "FORCE", {"BD": 16})           # every kernel's channel block
    args = k2_inputs(1, 40, 40, 3, 5, True, dtype=torch.float32, device=DEVICE)
    check_all(run("triton", args), run("naive", f64(args)), TOL[("triton", torch.float32)])


TARGET_TILES = {
    # name: (Triton version, target, dtype, the settings that differ from the interpreter's own)
    "3.9-sm_90-bf16": ((3, 9), 90, torch.bfloat16, ("_bwd_dqk_kernel", "DIAG_LOOP", True)),
    "3.9-sm_80-fp16": ((3, 9), 80, torch.float16, ("_bwd_dqk_kernel", "DIAG_LOOP", True)),
    "3.6-sm_80-fp32": ((3, 6), 80, torch.float32, ("_k2_dx_kernel", "BD", 32)),
    "3.9-sm_80-fp32": ((3, 9), 80, torch.float32, ("_k2_dx_kernel", "BD", 16)),
}


@needs_triton
@pytest.mark.parametrize("case", list(TARGET_TILES))
def test_fused_with_the_tiles_of_other_targets(monkeypatch, case, nan_empty):
    """The tiles and code paths kernels/settings.py picks for another Triton version and GPU
    target (the interpreter runs the pinned Triton, as sm_90), run here: the diagonal sub-blocks
    one position at a time at R <= 32 (Triton 3.9, 16-bit), the dx kernel's 32 / 16 channels
    (sm_80, fp32)."""
    from kop_triton.kernels import settings
    version, arch, dtype, (kernel, name, value) = TARGET_TILES[case]
    monkeypatch.setattr(settings, "AS_FOR", {"triton": version, "arch": arch})
    assert settings.kernel_settings(kernel, dtype, R=4, D=40)[name] == value
    args = k2_inputs(2, 80, 40, 4, 5, True, dtype=dtype, device=DEVICE)
    got = run("triton", args)
    check_all(got, run("naive", f64(args)), TOL[("triton", dtype)])


@needs_triton
@pytest.mark.parametrize("levels", [False, True], ids=["one-level", "groups"])
@pytest.mark.parametrize("varlen", [False, True], ids=["batch", "varlen"])
def test_fused_state_pass_steps(varlen, levels, nan_empty):
    """The state pass composing 2 chunks per step (16 by default): several steps per sequence,
    a partial last step, forward and reversed (backward), packed sequences of 1 to 5 chunks; and
    the grouped pass (groups of 3 chunks, forced: long sequences get it), groups crossing no
    sequence, a sequence's last group short."""
    import dataclasses
    from kop_triton.kernels.settings import K2, SCAN
    st = dataclasses.replace(K2, scan=dataclasses.replace(SCAN, pass_chunks=2, pass_group=3 if levels else 0))
    if varlen:
        lens = [200, 1, 130, 64]
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
        args = k2_inputs(1, sum(lens), 5, 3, 4, False, dtype=torch.float32, N=len(lens), device=DEVICE)
        got, ref = run("triton", args, cu_seqlens=cu, settings=st), run("naive", f64(args), cu_seqlens=cu.cpu())
    else:
        args = k2_inputs(2, 320, 5, 3, 4, False, dtype=torch.float32, device=DEVICE)
        got, ref = run("triton", args, settings=st), run("naive", f64(args))
    check_all(got, ref, TOL[("triton", torch.float32)])


@needs_triton
@pytest.mark.parametrize("varlen,K", [(False, 6), pytest.param(True, 6, marks=RACE), (False, 40)],
                         ids=["batch", "varlen", "K40-toeplitz"])
def test_fused_backward_chunk_groups(varlen, K, nan_empty):
    """The dx kernel walks groups of 3 chunks (what long inputs get), crossing batch rows and
    packed sequences inside a group, with [du | dv] and the conv's weight gradient summed per
    group in the kernel (what 16-bit inputs get; forced here to check them at fp32 precision)."""
    import dataclasses
    from kop_triton.kernels.settings import K2
    st = dataclasses.replace(K2, dx_group=3, fuse_weight_grads=True)
    if varlen:
        lens = [70, 1, 130, 64]
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
        args = k2_inputs(1, sum(lens), 9, 3, K, True, dtype=torch.float32, N=len(lens), device=DEVICE)
        got, ref = run("triton", args, cu_seqlens=cu, settings=st), run("naive", f64(args), cu_seqlens=cu.cpu())
    else:
        args = k2_inputs(2, 150, 9, 3, K, False, dtype=torch.float32, device=DEVICE)
        got, ref = run("triton", args, settings=st), run("naive", f64(args))
    check_all(got, ref, TOL[("triton", torch.float32)])


@needs_triton
@pytest.mark.parametrize("case", ["batch-fp32", pytest.param("varlen-fp32", marks=RACE), "batch-bf16", "varlen-fp16"])
def test_fused_folded_projection(case, nan_empty):
    """The forward with the q/k projection folded into the chunk-state pass (what >= 132 chunks
    at R <= 32 get; forced here on small inputs): y, the final states and all 9 gradients against
    the float64 reference; partial last chunks, packed sequences of 1 to 4 chunks whose chunks
    start mid-row-block, initial states."""
    import dataclasses
    from kop_triton.kernels.settings import K2
    st = dataclasses.replace(K2, fold_qk=True)
    varlen, dtype = case.startswith("varlen"), {"fp32": torch.float32, "bf16": torch.bfloat16,
                                                 "fp16": torch.float16}[case.split("-")[1]]
    R = 32 if dtype == torch.float32 and varlen else 5
    if varlen:
        lens = [200, 1, 130, 64]
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
        args = k2_inputs(1, sum(lens), 40, R, 6, True, dtype=dtype, N=len(lens), device=DEVICE)
        got, ref = run("triton", args, cu_seqlens=cu, settings=st), run("naive", f64(args), cu_seqlens=cu.cpu())
    else:
        args = k2_inputs(2, 150, 40, R, 6, False, dtype=dtype, device=DEVICE)
        got, ref = run("triton", args, settings=st), run("naive", f64(args))
    check_all(got, ref, TOL[("triton", dtype)])


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_fused_r32_settings(dtype, nan_empty):
    """R = 32 (BR = 32), with the settings that stopped its spills (kernels/settings.py, the R = 32
    rules: 16-wide key-channel slices in dq/dk for fp32, 16 channels and the diagonal loop in the
    output and dx kernels, 16 channels in the projection), both projections (two passes: T < 132
    chunks), against float64."""
    args = k2_inputs(2, 100, 24, 32, 5, False, dtype=dtype, device=DEVICE)
    check_all(run("triton", args), run("naive", f64(args)), TOL[("triton", dtype)])


@needs_triton
def test_fold_rule_picks_by_shape():
    """The fold (one launch, _k2_qk_state_kernel) from K2Settings.fold_min_chunks chunks on at R <= 32;
    the two passes (_k2_qk_kernel, _chunk_state_kernel) below it and at R > 32 -- recorded launches,
    no run."""
    from kop_triton.kernels import k2 as k2k
    from kop_triton.kernels.launch import recording
    from kop_triton.kernels.settings import K2
    assert K2.fold_qk is None and K2.fold_min_chunks == 132
    for T, R, folded in [(132 * 64, 16, True), (131 * 64, 16, False), (1 << 16, 32, True), (1 << 16, 33, False)]:
        x = torch.empty(1, T, 64, device="meta", dtype=torch.bfloat16)
        f = lambda *s: torch.empty(*s, device="meta")
        with recording() as rec:
            k2k.k2_fwd(x, f(64, R), f(64, R), f(R), f(R), f(8), f(1), None, None, False, None)
        names = [ln.name for ln in rec.launches]
        assert ("_k2_qk_state_kernel" in names) == folded, (T, R, names)
        assert ("_k2_qk_kernel" in names) == (not folded) and ("_chunk_state_kernel" in names) == (not folded)
        assert k2k.fold_qk(triton_cdiv(T, 64), max(16, 1 << (R - 1).bit_length())) == folded


def triton_cdiv(a, b):
    return -(-a // b)


@needs_triton
@pytest.mark.parametrize("per_channel", [False, True], ids=["shared", "per-channel"])
def test_fused_varlen(per_channel, nan_empty):
    lens = [5, 1, 70, 12]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    args = k2_inputs(1, sum(lens), 9, 3, 6, per_channel, dtype=torch.float32, N=len(lens), device=DEVICE)
    got = run("triton", args, cu_seqlens=cu)
    check_all(got, run("naive", f64(args), cu_seqlens=cu.cpu()), TOL[("triton", torch.float32)])


@needs_triton
def test_fused_zero_state_and_partial_outputs():
    args = k2_inputs(2, 40, 6, 3, 4, dtype=torch.float32, init=False, device=DEVICE)
    ref_args = f64(args)
    # no initial state, output_final_state=False: only y
    y, fin = k2_mixer(*args[:7], backend="triton")
    assert fin is None
    y_ref, _ = reference_k2_mixer(*ref_args[:7], scan_backend="naive")
    assert_close("y", y, y_ref, TOL[("triton", torch.float32)])
    gen = torch.Generator().manual_seed(3)
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    g = torch.autograd.grad((y * dy.float()).sum(), args[:7])
    g_ref = torch.autograd.grad((y_ref * dy).sum(), ref_args[:7])
    for n, a, b in zip(NAMES[3:10], g, g_ref):
        assert_close(n, a, b, TOL[("triton", torch.float32)])
    # a loss on the final states only (no cotangent reaches y)
    _, (s1, c1) = k2_mixer(*args[:7], output_final_state=True, backend="triton")
    _, (s1r, c1r) = reference_k2_mixer(*ref_args[:7], output_final_state=True, scan_backend="naive")
    g = torch.autograd.grad(s1.sum() + c1.pow(2).sum(), args[:7])
    g_ref = torch.autograd.grad(s1r.sum() + c1r.pow(2).sum(), ref_args[:7], allow_unused=True)
    for n, a, b in zip(NAMES[3:10], g, g_ref):
        if b is None:               # u, alpha, the kernel and the gate do not reach the final states
            assert n in ("du", "dalpha", "dkernel", "dgate_logit") and float(a.abs().max()) == 0.0, n
            continue
        assert_close(n, a, b, TOL[("triton", torch.float32)])


@needs_triton
@RACE
def test_fused_diag_loop_y_only(nan_empty):
    """R = 33 (> 32: the diagonal score blocks one position at a time), no initial state and no
    final state asked for (the backward gets no state cotangents), one chunk of 20 tokens."""
    args = k2_inputs(1, 20, 6, 33, 3, dtype=torch.float32, init=False, device=DEVICE)[:7]
    ref_args = f64(args)
    y, fin = k2_mixer(*args, backend="triton")
    y_ref, _ = reference_k2_mixer(*ref_args, scan_backend="naive")
    assert fin is None
    tol = TOL[("triton", torch.float32)]
    assert_close("y", y, y_ref, tol)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = torch.autograd.grad((y * dy.float().to(DEVICE)).sum(), args)
    ref = torch.autograd.grad((y_ref * dy).sum(), ref_args)
    for n, a, b in zip(NAMES[3:10], got, ref):
        assert_close(n, a, b, tol)


@needs_triton
def test_fused_state_chaining():
    args = [None if t is None else t.detach() for t in k2_inputs(2, 90, 8, 3, 10, dtype=torch.float32, device=DEVICE)]
    x, p, st = args[0], args[1:7], tuple(args[7:])
    y, fin = k2_mixer(x, *p, initial_state=st, output_final_state=True, backend="triton")
    pieces = []
    for a, b in [(0, 3), (3, 70), (70, 90)]:                      # first piece shorter than K
        yi, st = k2_mixer(x[:, a:b], *p, initial_state=st, output_final_state=True, backend="triton")
        pieces.append(yi)
    assert_close("y", torch.cat(pieces, 1), y, 1e-5)
    assert_close("scan_final", st[0], fin[0], 1e-5)
    assert_close("conv_final", st[1], fin[1], 0.0)


@needs_triton
def test_fused_deterministic_gradients():
    args = k2_inputs(1, 100, 12, 4, 40, dtype=torch.float32, device=DEVICE)
    a, b = run("triton", args), run("triton", args)
    for n, s, t in zip(NAMES, a, b):
        assert torch.equal(s, t), f"{n} differs between two identical runs"


@needs_triton
def test_fused_non_contiguous_inputs():
    args = k2_inputs(2, 40, 12, 6, 5, True, dtype=torch.float32, device=DEVICE)
    x, u, v, alpha, gamma, w, gl, s0, c0 = args
    sl = [x[:, :, ::2], u[::2, ::2], v[1::2, ::2], alpha[::2], gamma[::2], w[::2], gl, s0[:, ::2, ::2], c0[:, :, ::2]]
    assert not any(t.is_contiguous() for t in (sl[0], sl[1], sl[2], sl[5], sl[7], sl[8]))
    check_all(run("triton", sl), run("naive", f64(sl)), TOL[("triton", torch.float32)])


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_fused_other_dtypes(dtype):
    args = k2_inputs(1, 80, 16, 4, 40, dtype=dtype, device=DEVICE)
    got = run("triton", args)
    assert got[0].dtype == dtype and got[3].dtype == dtype
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    assert got[1].dtype == sdt and got[2].dtype == sdt
    # the reference sees the same (rounded) inputs in float64
    check_all(got, run("naive", f64(args)), TOL[("triton", dtype)])


@needs_triton
def test_triton_unfused_backend_matches_reference():
    args = k2_inputs(2, 50, 10, 3, 6, True, dtype=torch.float32, device=DEVICE)
    check_all(run("triton_unfused", args), run("naive", f64(args)), TOL[("triton", torch.float32)])


@needs_triton
@pytest.mark.parametrize("final", [True, False], ids=["final-state", "y-only"])
def test_fused_compiles_fullgraph(final):
    """torch.compile(fullgraph=True) of k2_mixer(backend="triton") (the torch.library op while
    tracing) == the eager autograd Function, forward and every gradient; packed sequences."""
    lens = [5, 70, 3]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), device=DEVICE)
    args = k2_inputs(1, sum(lens), 6, 3, 4, dtype=torch.float32, N=len(lens), device=DEVICE)

    def f(*a):
        y, fin = k2_mixer(*a[:7], initial_state=(a[7], a[8]), output_final_state=final, cu_seqlens=cu,
                          backend="triton")
        return (y, *fin) if final else (y,)

    torch._dynamo.reset()
    got, exp = torch.compile(f, fullgraph=True, backend="aot_eager")(*args), f(*args)
    names = NAMES[:len(exp)] + NAMES[3:]
    got = list(got) + list(cotangent_grads(got, args, seed=4))
    exp = list(exp) + list(cotangent_grads(exp, args, seed=4))
    for n, a, b in zip(names, got, exp):
        assert_close(f"compiled {n}", a, b, 1e-6)


@needs_triton
@pytest.mark.parametrize("fold", [False, True], ids=["two-passes", "folded"])
@pytest.mark.parametrize("varlen", [False, True], ids=["batch", "varlen"])
def test_chunk_states_match_the_scan_kernels_layout(varlen, fold):
    """The fused forward stores chunk states exactly where scan_fwd (H1) puts them, and the q, k,
    [q_hat, norms] planes its backward reads are those of the PyTorch projection; with the
    projection folded into the chunk-state pass (``_k2_qk_state_kernel``) and without."""
    import dataclasses
    from kop_triton.kernels.k2 import CHUNK, k2_fwd, qk_planes
    from kop_triton.kernels.settings import K2
    from kop_triton.kernels.scan import scan_fwd
    from kop_triton.ops.k2 import k2_qk
    B, lens = (1, [70, 3, 130]) if varlen else (2, [150])
    args = [None if t is None else t.detach() for t in
            k2_inputs(B, sum(lens), 9, 3, 4, dtype=torch.float32, N=len(lens) if varlen else None, device=DEVICE)]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), device=DEVICE) if varlen else None
    x, u, v, alpha, gamma, w, gl, s0, c0 = args
    _, sT, _, states, qkn = k2_fwd(x, u, v, alpha, gamma, w, gl, s0, c0, True, cu,
                                   settings=dataclasses.replace(K2, fold_qk=fold))
    q, k = k2_qk(x, u, v, alpha)
    _, sT_ref, states_ref = scan_fwd(q, k, x, gamma, s0, True, cu, CHUNK)
    assert_close("chunk_states", states, states_ref, 1e-5)
    assert_close("scan_final", sT, sT_ref, 1e-5)
    kq, kk, qhn = qk_planes(qkn, u.shape[1])
    pu, pv = (x @ u).reshape(kq.shape), (x @ v).reshape(kk.shape)
    assert_close("q plane", kq, q.reshape(kq.shape), 1e-5)
    assert_close("k plane", kk, k.reshape(kk.shape), 1e-5)
    assert_close("q_hat", qhn[:, :-2], torch.nn.functional.normalize(pu, dim=-1, eps=1e-8), 1e-5)
    assert_close("norms", qhn[:, -2:], torch.stack([pu.norm(dim=-1), pv.norm(dim=-1)], 1), 1e-5)


@pytest.mark.skipif(DEVICE != "cuda", reason=CUDA_ONLY_LONG)
def test_fused_long_sequence_cuda():
    """T = 1,000,003, decays from 0.01 to 1: y, final states and all 9 gradients vs the float64
    chunked reference (itself checked against naive above)."""
    args = k2_inputs(1, 1_000_003, 24, 4, 8, False, dtype=torch.float32, gamma_lo=0.01, device="cuda")
    ref_args = [t.detach().double().requires_grad_() for t in args]
    check_all(run("triton", args), run("chunked", ref_args), TOL[("triton", torch.float32)])


def _int64_case(T, D, block, edge_row, device, R=4, K=8):
    """A (1, T, D) bf16 fused K2 mixer with both initial states, forward and all 9 gradients
    (random cotangents on y and both final states), against the float64 unfused reference
    (``reference_k2_mixer``, chunked scan) computed ``block`` rows at a time over all rows and
    channels (helpers.check_blockwise); the rows past ``edge_row`` are also judged alone."""
    gen = torch.Generator(device=device).manual_seed(0)
    bf = torch.bfloat16
    x = torch.randn(1, T, D, generator=gen, device=device, dtype=bf)
    u = torch.randn(D, R, generator=gen, device=device) / D ** 0.5
    v = torch.randn(D, R, generator=gen, device=device) / D ** 0.5
    alpha = torch.rand(R, generator=gen, device=device) * 0.8 + 0.2
    gamma = torch.tensor([0.3, 0.9, 0.999, 1.0], device=device)[:R]
    w = torch.randn(K, generator=gen, device=device) / K ** 0.5
    gl = torch.tensor(0.4, device=device)
    s0 = torch.randn(1, R, D, generator=gen, device=device)
    c0 = torch.randn(1, K - 1, D, generator=gen, device=device)
    leaves = [t.requires_grad_() for t in (x, u, v, alpha, gamma, w, gl, s0, c0)]
    y, (s1, c1) = k2_mixer(*leaves[:7], initial_state=(s0, c0), output_final_state=True, backend="triton")
    dy = torch.randn(y.shape, generator=gen, device=device, dtype=bf)
    ds, dc = torch.randn(s1.shape, generator=gen, device=device), torch.randn(c1.shape, generator=gen, device=device)
    grads = torch.autograd.grad([y, s1, c1], leaves, [dy, ds, dc])
    names = ["x", "u", "v", "alpha", "gamma", "kernel", "gate_logit", "scan_state", "conv_state"]
    got = {"out": y, "final scan_state": s1, "final conv_state": c1, **{f"d{n}": g for n, g in zip(names, grads)}}

    def step(xs, ps, st):
        y_b, (s_b, c_b) = reference_k2_mixer(xs[0], *ps, initial_state=tuple(st), output_final_state=True,
                                             scan_backend="chunked")
        return y_b, [s_b, c_b]

    tally = ErrorTally(edge_row)
    check_blockwise(step, [("x", x)], list(zip(names[1:7], leaves[1:7])), list(zip(names[7:], leaves[7:])),
                    got, dy, [ds, dc], block, tally)
    tally.check(TOL[("triton", bf)])
    for name in ("out", "dx"):
        assert "past the int32 edge" in tally.regions(name), name


@needs_triton
@RACE
def test_fused_int64_case_small(nan_empty):
    """The CUDA-only int64 test below, at a size the interpreter runs (its reference and checks
    are the same code): 4 blocks of 40 rows, the last 37 rows judged alone."""
    _int64_case(T=150, D=20, block=40, edge_row=113, device=DEVICE)


@needs_triton
@pytest.mark.skipif(DEVICE != "cuda", reason=CUDA_ONLY_INT64)
def test_fused_int64_offsets_cuda(nan_empty):
    """B*T*D past 2^31 with small grids (B = 1, D = 8192, T = 270,000: 2.2e9 elements, 4,219 chunks):
    y, both final states and all 9 gradients vs float64 over all rows and channels, the 7,856 rows
    whose element offsets pass 2^31 also judged alone.  Device memory: x, y, dy, dx in bf16 (4.4 GB
    each), the chunk states (NC x R x D fp32, 0.6 GB) and q/k planes, the reference's 4,096-row
    float64 blocks (0.3 GB per D-wide tensor, a few alive at once): about 20 GB; the peak is printed."""
    D, T = 8192, 270_000
    assert T * D > INT32_EDGE
    torch.cuda.reset_peak_memory_stats()
    _int64_case(T=T, D=D, block=4096, edge_row=-(-INT32_EDGE // D), device="cuda")
    print(f"peak CUDA memory {torch.cuda.max_memory_allocated() / 2 ** 30:.1f} GiB")


# --------------------------------------------------------------------------------------
# the torch.library ops (kop_triton::k2_mixer_fwd / _bwd, ops/library.py) that compiled graphs call
# --------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("with_state", [True, False], ids=["init-state", "zero-state"])
def test_triton_custom_op_matches_reference_every_gradient(with_state):
    """The torch.library op (what compiled graphs call) vs the float64 reference, eagerly."""
    from kop_triton.ops.library import k2_mixer_triton_op
    g = torch.Generator().manual_seed(0)
    B, T, D, R, K = 2, 37, 10, 3, 4
    vals = [torch.randn(B, T, D, generator=g), torch.randn(D, R, generator=g), torch.randn(D, R, generator=g),
            torch.rand(R, generator=g) + 0.5, torch.tensor([0.05, 0.7, 0.999]), torch.randn(K, generator=g),
            torch.tensor(0.4), torch.randn(B, R, D, generator=g), torch.randn(B, K - 1, D, generator=g)]
    if not with_state:
        vals = vals[:7]
    ours = [v.to(DEVICE).requires_grad_() for v in vals]
    ref = [v.double().requires_grad_() for v in vals]
    st = (ours[7], ours[8]) if with_state else None
    y, s1, c1 = k2_mixer_triton_op(*ours[:7], initial_state=st)
    yr, (s1r, c1r) = reference_k2_mixer(*ref[:7], initial_state=(ref[7], ref[8]) if with_state else None,
                                        output_final_state=True)
    tol = TOL[("triton", torch.float32)]
    for n, a, b in zip(["y", "scan", "conv"], (y, s1, c1), (yr, s1r, c1r)):
        assert_close(n, a, b, tol)
    names = ["x", "u", "v", "alpha", "gamma", "kernel", "gate_logit", "scan_state", "conv_state"]
    for n, a, b in zip(names, cotangent_grads([y, s1, c1], ours), cotangent_grads([yr, s1r, c1r], ref)):
        assert_close(f"d{n}", a, b, tol)


def _op_args(B=1, T=5, D=6, R=2, K=3, lens=None, state=True, seed=0):
    """Tiny inputs of kop_triton::k2_mixer_fwd (lens: packed sequence lengths, B = 1)."""
    g = torch.Generator().manual_seed(seed)
    N = B if lens is None else len(lens)

    def t(*s):
        return torch.randn(*s, generator=g).to(DEVICE).requires_grad_()

    cu = None if lens is None else torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), device=DEVICE)
    return [t(B, T, D), t(D, R), t(D, R), torch.rand(R, generator=g).to(DEVICE).requires_grad_(),
            (0.5 + 0.4 * torch.rand(R, generator=g)).to(DEVICE).requires_grad_(), t(K), t(()),
            t(N, R, D) if state else None, t(N, K - 1, D) if state else None, cu]


@needs_triton
@pytest.mark.parametrize("case", ["state", "no-state", "varlen", "no-chunk-states"])
def test_triton_custom_op_opcheck(case):
    """torch.library.opcheck on both ops, every check (schema, fake (meta) implementation,
    autograd registration, AOT dispatch with static and dynamic shapes)."""
    from kop_triton.ops.library import k2_mixer_bwd, k2_mixer_fwd
    if case == "varlen":
        args = _op_args(T=70, lens=[3, 66, 1])            # 1 + 2 + 1 chunks, padded to 2 + 3 - 1 rows
    else:
        args = _op_args(T=70 if case == "state" else 5, state=case != "no-state")
    store = case != "no-chunk-states"
    if not store:       # what k2_mixer_triton_op passes when no input needs a gradient
        args = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    torch.library.opcheck(k2_mixer_fwd, (*args, store))
    with torch.no_grad():
        y, s1, c1, chunk_states, qkn = k2_mixer_fwd(*args, store)
    rows = {"state": 2, "no-state": 1, "varlen": 4, "no-chunk-states": 0}[case]
    assert chunk_states.shape == (rows, 2, 6)
    assert qkn.shape == ((y.shape[0] * y.shape[1] * (3 * 2 + 2) if store else 0),)
    if not store:
        return
    g = torch.Generator().manual_seed(1)
    cot = [torch.randn(o.shape, generator=g).to(o) for o in (y, s1, c1)]
    plain = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    torch.library.opcheck(k2_mixer_bwd, (*plain, chunk_states, qkn, *cot))


@needs_triton
def test_triton_custom_op_backward_reuses_chunk_states(monkeypatch):
    """The backward op launches no forward kernel: it runs on the chunk states the forward op
    saved; without a gradient to compute the forward stores none."""
    from kop_triton.kernels import k2 as k2k
    from kop_triton.ops.library import k2_mixer_triton_op
    args = _op_args(T=70)
    stored, fwd = [], k2k.k2_fwd

    def counting_fwd(*a, **kw):
        stored.append(kw["store_chunk_states"])
        return fwd(*a, **kw)

    monkeypatch.setattr(k2k, "k2_fwd", counting_fwd)
    y, s1, c1 = k2_mixer_triton_op(*args[:7], initial_state=(args[7], args[8]))
    (y.sum() + s1.sum() + c1.sum()).backward()
    assert stored == [True] and all(a.grad is not None for a in args[:9])
    with torch.no_grad():
        k2_mixer_triton_op(*args[:7], initial_state=(args[7], args[8]))
    assert stored == [True, False]


# --------------------------------------------------------------------------------------
# bad inputs
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("case,exc,match", conv_arg_error_cases() + [
    ("u_D", ValueError, r"u and v must both have shape \(D, R\) with D = 6"),
    ("v_R", ValueError, r"u and v must both have shape"),
    ("alpha_R", ValueError, r"alpha must have shape \(R,\) = \(3,\)"),
    ("gamma_R", ValueError, r"gamma must have shape \(R,\) = \(3,\)"),
    ("gamma_range", ValueError, r"gamma must lie in \(0, 1\]"),
    ("gate_vector", TypeError, "gate_logit must be a one-element tensor"),
    ("scan_state_shape", ValueError, r"initial_state must have shape \(N, R, D\) = \(2, 3, 6\)"),
    ("state_not_pair", TypeError, r"initial_state must be a \(scan_state, conv_state\) tuple"),
    ("x_int", TypeError, "x must be a floating tensor"),
    ("backend", ValueError, "backend must be one of"),
])
@pytest.mark.parametrize("backend", ["chunked", "triton"])
def test_bad_input_errors(case, exc, match, backend, monkeypatch):
    """CPU tensors for every backend (on CUDA a bad gamma is an asynchronous device-side assert, not
    a ValueError); for "triton" as where Triton cannot run them (no TRITON_INTERPRET): the argument
    checks come before the device check, so a bad call gets the same error on every machine."""
    if backend == "triton":
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(2, 8, 6)
    u, v = torch.randn(6, 3), torch.randn(6, 3)
    alpha, gamma, w, gl = torch.ones(3), torch.tensor([0.5, 0.9, 1.0]), torch.randn(4), torch.tensor(0.0)
    kw = {"backend": backend}
    if case in CONV_ARG_ERRORS:
        w, c0 = with_bad_conv_arg(case, w, None)
        if c0 is not None:
            kw["initial_state"] = (None, c0)
    elif case == "u_D":
        u = torch.randn(5, 3)
    elif case == "v_R":
        v = torch.randn(6, 4)
    elif case == "alpha_R":
        alpha = torch.ones(4)
    elif case == "gamma_R":
        gamma = torch.tensor([0.5, 0.9])
    elif case == "gamma_range":
        gamma = torch.tensor([0.5, 0.9, 1.5])
    elif case == "gate_vector":
        gl = torch.zeros(2)
    elif case == "scan_state_shape":
        kw["initial_state"] = (torch.zeros(2, 6, 3), None)
    elif case == "state_not_pair":
        kw["initial_state"] = torch.zeros(2, 3, 6)
    elif case == "x_int":
        x = torch.ones(2, 8, 6, dtype=torch.int64)
    elif case == "backend":
        kw["backend"] = "fused"
    with pytest.raises(exc, match=match):
        k2_mixer(x, u, v, alpha, gamma, w, gl, **kw)


def test_triton_backend_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    x, g = torch.randn(1, 8, 4), make_gamma(3, dtype=torch.float32)
    assert_triton_on_cpu_is_a_clear_error(monkeypatch, lambda: k2_mixer(
        x, torch.randn(4, 3), torch.randn(4, 3), torch.ones(3), g, torch.rand(3), torch.zeros(()), backend="triton"))
