"""Causal Kbase convolution: the reference (gradcheck, direct-loop property) and the Triton
kernels vs the float64 reference, forward and every gradient (x, weight, initial_state), with
random cotangents on y and on the final state."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from helpers import (CONV_ARG_ERRORS, CUDA_ONLY_INT64, DEVICE, INT32_EDGE, NEEDS_TRITON, TOL, TRITON_OK, ErrorTally,
                     assert_close, assert_triton_on_cpu_is_a_clear_error, check_blockwise, conv_arg_error_cases,
                     cotangent_grads, with_bad_conv_arg)
from kop_triton import causal_conv
from kop_triton.ops.conv import naive_causal_conv

needs_triton = pytest.mark.skipif(not TRITON_OK, reason=NEEDS_TRITON)
# ``race``: the curated set `make test` reruns with every Triton grid reversed and shuffled
# (tests/grid_order.py; KOP_GRID_ORDER); together the marked tests of test_scan, test_conv, test_k2
# and test_flat_grids launch every kernel with every flag value the compile gate's CI workload
# launches (checked by --race-coverage)
RACE = pytest.mark.race


@pytest.fixture
def conv_method(request):
    """The ConvSettings of a method: 'auto' keeps the size rule; 'taps' / 'dot' force one method for
    shared kernels (``dot_min_taps`` at its extremes)."""
    import dataclasses
    from kop_triton.kernels.settings import CONV
    return {"auto": CONV, "taps": dataclasses.replace(CONV, dot_min_taps=10 ** 9),
            "dot": dataclasses.replace(CONV, dot_min_taps=0)}[request.param]


def conv_inputs(B, T, D, K, per_channel, dtype=torch.float64, seed=0, init=True, N=None, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    w = torch.randn(*((D, K) if per_channel else (K,)), generator=g, dtype=torch.float64) / K ** 0.5
    h0 = torch.randn(B if N is None else N, K - 1, D, generator=g, dtype=torch.float64) if init else None
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    out = [x.to(dtype), w.to(sdt), None if h0 is None else h0.to(sdt)]
    return [None if t is None else t.to(device).requires_grad_() for t in out]


def loss_grads(backend, x, w, h0, seed=1, **kw):
    y, f = causal_conv(x, w, initial_state=h0, output_final_state=True, backend=backend, **kw)
    inputs = [t for t in (x, w, h0) if t is not None and t.requires_grad]
    return [y, f] + list(cotangent_grads([y, f], inputs, seed))


def f64(*ts):
    return [None if t is None else t.detach().cpu().double().requires_grad_() for t in ts]


def check_all(got, ref, tol, names=("y", "final_state", "dx", "dweight", "dinitial_state")):
    assert len(got) == len(ref)
    for n, a, b in zip(names, got, ref):
        assert_close(n, a, b, tol)


# --------------------------------------------------------------------------------------
# reference
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_channel", [False, True], ids=["shared", "per-channel"])
@pytest.mark.parametrize("K", [1, 3, 9])
def test_reference_gradcheck_float64(per_channel, K):
    x, w, h0 = conv_inputs(2, 7, 3, K, per_channel)

    def f(x, w, h0):
        return naive_causal_conv(x, w, initial_state=h0, output_final_state=True)

    assert torch.autograd.gradcheck(f, (x, w, h0), eps=1e-6, atol=1e-7)


def direct_loop(x, w, h0):
    B, T, D = x.shape
    K = w.shape[-1]
    y = torch.zeros(B, T, D, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            for l in range(K):
                s = t - l
                if s >= 0:
                    xv = x[b, s]
                elif h0 is not None:
                    xv = h0[b, K - 1 + s]
                else:
                    continue
                y[b, t] += (w[l] if w.dim() == 1 else w[:, l]) * xv
    return y


@settings(max_examples=30, deadline=None)
@given(B=st.integers(1, 2), T=st.integers(1, 12), D=st.integers(1, 4), K=st.integers(1, 15),
       per_channel=st.booleans(), init=st.booleans(), seed=st.integers(0, 10_000))
def test_reference_equals_direct_loop(B, T, D, K, per_channel, init, seed):
    x, w, h0 = (None if t is None else t.detach() for t in conv_inputs(B, T, D, K, per_channel, seed=seed, init=init))
    y, f = naive_causal_conv(x, w, initial_state=h0, output_final_state=True)
    assert_close("y", y, direct_loop(x, w, h0), 1e-12)
    full = torch.cat([torch.zeros(B, K - 1, D, dtype=x.dtype) if h0 is None else h0, x], 1)
    assert_close("final_state", f, full[:, full.shape[1] - (K - 1):], 0.0)


# --------------------------------------------------------------------------------------
# Triton kernels vs the float64 reference
# --------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("per_channel", [False, True], ids=["shared", "per-channel"])
@pytest.mark.parametrize("K", [1, 2, 8, 63, 64, 65, 300])
def test_triton_matches_reference(K, per_channel, nan_empty):
    # K = 300 > T: the whole output reads the initial state; D = 37 is not a power of two
    B, T, D = (1, 60, 3) if K == 300 else (1, 77, 37) if K >= 63 else (2, 77, 37)
    x, w, h0 = conv_inputs(B, T, D, K, per_channel, dtype=torch.float32, device=DEVICE)
    got = loss_grads("triton", x, w, h0)
    ref = loss_grads("naive", *f64(x, w, h0))
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    check_all(got, ref, TOL[("triton", torch.float32)])


@needs_triton
def test_triton_max_kernel_size(nan_empty):
    # K = 4096 (the limit) over T = 20: output, dx and dinitial_state through the Toeplitz
    # products; dweight's lag-block kernel is the one checked above at K = 300 (4096 lags one
    # by one are too slow for the interpreter)
    x, w, h0 = conv_inputs(1, 20, 3, 4096, False, dtype=torch.float32, device=DEVICE)
    w = w.detach()
    xr, wr, hr = f64(x, w, h0)
    check_all(loss_grads("triton", x, w, h0), loss_grads("naive", xr, wr.detach(), hr),
              TOL[("triton", torch.float32)], names=("y", "final_state", "dx", "dinitial_state"))


@needs_triton
@pytest.mark.parametrize("conv_method", ["taps", "dot"], indirect=True)
@pytest.mark.parametrize("K,T,D", [pytest.param(2, 33, 70, marks=RACE), (8, 5, 16), (65, 130, 9)],
                         ids=["K2-2Dblocks", "K8-T<K", "K65"])
def test_triton_both_methods_shared_kernel(conv_method, K, T, D, nan_empty):
    x, w, h0 = conv_inputs(2, T, D, K, False, dtype=torch.float32, device=DEVICE)
    check_all(loss_grads("triton", x, w, h0, settings=conv_method), loss_grads("naive", *f64(x, w, h0)),
              TOL[("triton", torch.float32)])


@needs_triton
@pytest.mark.parametrize("per_channel", [pytest.param(False, marks=RACE), True], ids=["shared", "per-channel"])
def test_triton_zero_initial_state_and_T1(per_channel):
    for T in (1, 3):
        x, w, _ = conv_inputs(3, T, 6, 5, per_channel, dtype=torch.float32, init=False, device=DEVICE)
        got = loss_grads("triton", x, w, None)
        check_all(got, loss_grads("naive", *f64(x, w), None), TOL[("triton", torch.float32)],
                  names=("y", "final_state", "dx", "dweight"))


@needs_triton
@RACE
@pytest.mark.parametrize("K", [5, 40], ids=["taps", "dot"])
def test_triton_y_only(K, nan_empty):
    """No final state asked for: the backward gets no state cotangent; two batch rows, several time
    and channel blocks (D = 70), the taps and the Toeplitz product."""
    x, w, h0 = conv_inputs(2, 50, 70, K, False, dtype=torch.float32, device=DEVICE)
    xr, wr, hr = f64(x, w, h0)
    dy = torch.randn(2, 50, 70, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y, f = causal_conv(x, w, initial_state=h0, backend="triton")
    y_ref, _ = naive_causal_conv(xr, wr, initial_state=hr)
    assert f is None
    assert_close("y", y, y_ref, TOL[("triton", torch.float32)])
    got = torch.autograd.grad((y * dy.float().to(DEVICE)).sum(), [x, w, h0])
    ref = torch.autograd.grad((y_ref * dy).sum(), [xr, wr, hr])
    for n, a, b in zip(["dx", "dweight", "dinitial_state"], got, ref):
        assert_close(n, a, b, TOL[("triton", torch.float32)])


@needs_triton
@pytest.mark.parametrize("per_channel", [False, True], ids=["shared", "per-channel"])
def test_triton_empty_sequence_passes_state_through(per_channel):
    x, w, h0 = conv_inputs(2, 0, 5, 4, per_channel, dtype=torch.float32, device=DEVICE)
    got = loss_grads("triton", x, w, h0)
    assert got[0].shape == (2, 0, 5)
    check_all(got, loss_grads("naive", *f64(x, w, h0)), TOL[("triton", torch.float32)])


@needs_triton
@pytest.mark.parametrize("per_channel", [False, True], ids=["shared", "per-channel"])
@pytest.mark.parametrize("K", [1, pytest.param(4, marks=RACE), 20])
def test_triton_varlen(K, per_channel, nan_empty):
    lens = [5, 1, 70, 12]                                          # some shorter than K
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    x, w, h0 = conv_inputs(1, sum(lens), 7, K, per_channel, dtype=torch.float32, N=len(lens), device=DEVICE)
    got = loss_grads("triton", x, w, h0, cu_seqlens=cu)
    ref = loss_grads("naive", *f64(x, w, h0), cu_seqlens=cu.cpu())
    check_all(got, ref, TOL[("triton", torch.float32)])
    # and each sequence alone gives the same answer as its slice of the packed run
    y, f = causal_conv(x, w, initial_state=h0, output_final_state=True, cu_seqlens=cu, backend="triton")
    for i in (1, 2):
        a, b = int(cu[i]), int(cu[i + 1])
        yi, fi = causal_conv(x[:, a:b], w, initial_state=h0[i:i + 1], output_final_state=True, backend="triton")
        assert_close(f"y[seq {i}]", y[:, a:b], yi, 1e-6)
        assert_close(f"final[seq {i}]", f[i:i + 1], fi, 0.0)


@needs_triton
@pytest.mark.parametrize("K", [3, 50])
def test_triton_state_chaining(K):
    x, w, h0 = (t.detach() for t in conv_inputs(2, 60, 8, K, False, dtype=torch.float32, device=DEVICE))
    y, f = causal_conv(x, w, initial_state=h0, output_final_state=True, backend="triton")
    pieces, s = [], h0
    for a, b in [(0, 2), (2, 41), (41, 60)]:                       # first piece shorter than K
        yi, s = causal_conv(x[:, a:b], w, initial_state=s, output_final_state=True, backend="triton")
        pieces.append(yi)
    assert_close("y", torch.cat(pieces, 1), y, 1e-6)
    assert_close("final_state", s, f, 0.0)


@needs_triton
@pytest.mark.parametrize("per_channel", [False, True], ids=["shared", "per-channel"])
def test_triton_deterministic_gradients(per_channel):
    x, w, h0 = conv_inputs(2, 70, 12, 36, per_channel, dtype=torch.float32, device=DEVICE)
    a = loss_grads("triton", x, w, h0)
    b = loss_grads("triton", x, w, h0)
    for n, u, v in zip(["y", "final", "dx", "dweight", "dh0"], a, b):
        assert torch.equal(u, v), f"{n} differs between two identical runs"


@needs_triton
def test_triton_non_contiguous_inputs():
    x, w, h0 = conv_inputs(2, 40, 12, 9, True, dtype=torch.float32, device=DEVICE)
    xs, ws, hs = x[:, :, ::2], w[::2, :], h0[:, :, ::2]
    assert not (xs.is_contiguous() or ws.is_contiguous() or hs.is_contiguous())
    check_all(loss_grads("triton", xs, ws, hs), loss_grads("naive", *f64(xs, ws, hs)),
              TOL[("triton", torch.float32)])


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("K", [4, 70])
def test_triton_other_dtypes(dtype, K):
    x, w, h0 = conv_inputs(1, 90, 12, K, False, dtype=dtype, device=DEVICE)
    got = loss_grads("triton", x, w, h0)
    assert got[0].dtype == dtype and got[2].dtype == dtype
    # the reference sees the same (rounded) inputs in float64
    check_all(got, loss_grads("naive", *f64(x, w, h0)), TOL[("triton", dtype)])


# --------------------------------------------------------------------------------------
# int64 offsets: B*T*D past 2^31 (CUDA), and the same check at an interpreter size
# --------------------------------------------------------------------------------------

INT64_CASES = {"taps-per-channel": (4, True), "dot-shared": (40, False)}     # name: (K, per_channel)


def _int64_case(T, D, K, per_channel, block, edge_row, device):
    """A (1, T, D) bf16 convolution with an initial state, forward and every gradient (random
    cotangents on y and the final state), against float64 ``naive_causal_conv`` computed ``block``
    rows at a time over all rows and channels (helpers.check_blockwise); the rows past ``edge_row``
    are also judged alone."""
    gen = torch.Generator(device=device).manual_seed(0)
    bf = torch.bfloat16
    x = torch.randn(1, T, D, generator=gen, device=device, dtype=bf)
    w = torch.randn(*((D, K) if per_channel else (K,)), generator=gen, device=device) / K ** 0.5
    h0 = torch.randn(1, K - 1, D, generator=gen, device=device)
    leaves = [t.requires_grad_() for t in (x, w, h0)]
    y, fin = causal_conv(x, w, initial_state=h0, output_final_state=True, backend="triton")
    dy = torch.randn(y.shape, generator=gen, device=device, dtype=bf)
    dfin = torch.randn(fin.shape, generator=gen, device=device)
    dx, dw, dh0 = torch.autograd.grad([y, fin], leaves, [dy, dfin])
    got = {"out": y, "final state": fin, "dx": dx, "dweight": dw, "dstate": dh0}

    def step(xs, ps, st):
        y_b, c_b = naive_causal_conv(xs[0], ps[0], initial_state=st[0], output_final_state=True)
        return y_b, [c_b]

    tally = ErrorTally(edge_row)
    check_blockwise(step, [("x", x)], [("weight", w)], [("state", h0)], got, dy, [dfin], block, tally)
    tally.check(TOL[("triton", bf)])
    for name in ("out", "dx"):
        assert "past the int32 edge" in tally.regions(name), name


@needs_triton
@RACE
@pytest.mark.parametrize("case", list(INT64_CASES))
def test_triton_int64_case_small(case, nan_empty):
    """The CUDA-only int64 test below, at a size the interpreter runs (its reference and checks
    are the same code): 4 blocks of 45 rows, the last 37 rows judged alone."""
    K, per_channel = INT64_CASES[case]
    _int64_case(T=170, D=20, K=K, per_channel=per_channel, block=45, edge_row=133, device=DEVICE)


@needs_triton
@pytest.mark.skipif(DEVICE != "cuda", reason=CUDA_ONLY_INT64)
@pytest.mark.parametrize("case", list(INT64_CASES))
def test_triton_int64_offsets_cuda(case, nan_empty):
    """B*T*D past 2^31 with small grids (B = 1, D = 8192, T = 270,000: 2.2e9 elements): y, the final
    state and every gradient vs float64 over all rows and channels, the 7,856 rows whose element
    offsets pass 2^31 also judged alone; K = 4 per-channel taps and a K = 40 shared kernel (the
    Toeplitz product).  Device memory: x, y, dy, dx in bf16 (4.4 GB each), the weight partials, the
    reference's 4,096-row float64 blocks (0.3 GB per D-wide tensor): about 20 GB; the peak is printed."""
    K, per_channel = INT64_CASES[case]
    D, T = 8192, 270_000
    assert T * D > INT32_EDGE
    torch.cuda.reset_peak_memory_stats()
    _int64_case(T=T, D=D, K=K, per_channel=per_channel, block=4096, edge_row=-(-INT32_EDGE // D), device="cuda")
    print(f"peak CUDA memory {torch.cuda.max_memory_allocated() / 2 ** 30:.1f} GiB")


# --------------------------------------------------------------------------------------
# bad inputs
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("case,exc,match", conv_arg_error_cases() + [
    ("weight_int", ValueError, r"weight must be a floating tensor"),
    ("weight_list", TypeError, "weight must be a tensor"),
    ("K_big", ValueError, r"weight must have 1 <= K <= 4096"),
    ("state_int", TypeError, "initial_state must be a float tensor"),
    ("x_2d", ValueError, r"x must have shape \(B, T, D\)"),
    ("backend", ValueError, "backend must be one of"),
    ("cu_batch", ValueError, "batch of size 1"),
])
@pytest.mark.parametrize("backend", ["naive", "triton"])
def test_bad_input_errors(case, exc, match, backend, monkeypatch):
    """CPU tensors; for "triton" as where Triton cannot run them (no TRITON_INTERPRET): the argument
    checks come before the device check, so a bad call gets the same error on every machine."""
    if backend == "triton":
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, w, h0 = (torch.randn(2, 8, 6), torch.randn(4), None)
    kw = {"backend": backend}
    if case in CONV_ARG_ERRORS:
        w, h0 = with_bad_conv_arg(case, w, h0)
    elif case == "weight_int":
        w = torch.ones(4, dtype=torch.int64)
    elif case == "weight_list":
        w = [1.0, 2.0]
    elif case == "K_big":
        w = torch.randn(4097)
    elif case == "state_int":
        h0 = torch.zeros(2, 3, 6, dtype=torch.int32)
    elif case == "x_2d":
        x = x[0]
    elif case == "backend":
        kw["backend"] = "cuda"
    elif case == "cu_batch":
        kw["cu_seqlens"] = torch.tensor([0, 8])
    with pytest.raises(exc, match=match):
        causal_conv(x, w, initial_state=h0, **kw)


def test_triton_backend_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    x = torch.randn(1, 8, 4)
    assert_triton_on_cpu_is_a_clear_error(monkeypatch, lambda: causal_conv(x, torch.rand(3), backend="triton"))
