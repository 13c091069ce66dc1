"""The decayed scan, per backend: the PyTorch references (gradcheck, agreement with the naive
reference, varlen, chaining, bad inputs) and the Triton kernels vs the float64 naive reference
(forward, every gradient, varlen, states, the launchers called directly).

The Triton tests run on CUDA when a GPU is present, otherwise on CPU tensors through the Triton
interpreter (TRITON_INTERPRET=1, set by conftest.py).  Every buffer their launchers allocate is
filled with NaN first (conftest.nan_empty), so an element a kernel never writes cannot go unnoticed.
"""
import dataclasses

import pytest
import torch
from hypothesis import given, settings, strategies as st

from helpers import (CUDA_ONLY_INT64, CUDA_ONLY_LONG, DEVICE, INT32_EDGE, NEEDS_TRITON, TOL, TRITON_OK, ErrorTally,
                     assert_close, assert_triton_on_cpu_is_a_clear_error, check_blockwise, cotangent_grads, make_gamma,
                     scan_inputs)
from kop_triton import decayed_scan
from kop_triton.kernels.settings import SCAN
from kop_triton.ops.scan import chunked_decayed_scan, naive_decayed_scan, recurrent_decayed_scan

if TRITON_OK:
    import kop_triton.kernels.scan as ks

F32 = torch.float32
F64 = torch.float64
# ``race``: the curated set `make test` reruns with every Triton grid reversed and shuffled
# (tests/grid_order.py; KOP_GRID_ORDER); together the marked tests of test_scan, test_conv, test_k2
# and test_flat_grids launch every kernel with every flag value the compile gate's CI workload
# launches (checked by --race-coverage)
RACE = pytest.mark.race


def triton_test(fn):
    """A Triton-path test: skipped where the kernels cannot run; every buffer the launchers allocate starts as NaN."""
    fn = pytest.mark.usefixtures("nan_empty")(fn)
    return pytest.mark.skipif(not TRITON_OK, reason=NEEDS_TRITON)(fn)


# --------------------------------------------------------------------------------------
# PyTorch reference paths (naive, recurrent, chunked)
# --------------------------------------------------------------------------------------


REFS = {"naive": naive_decayed_scan, "recurrent": recurrent_decayed_scan, "chunked": chunked_decayed_scan}


@pytest.mark.parametrize("name", list(REFS))
@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "init-state"])
def test_gradcheck_float64(name, with_state):
    fn = REFS[name]
    q, k, v, g, h0 = scan_inputs(2, 6, 3, 4, init=with_state, gamma=torch.tensor([0.3, 0.8, 1.0]))
    kw = {"chunk_size": 4} if name == "chunked" else {}

    def f(q, k, v, g, *h):
        o, s = fn(q, k, v, g, initial_state=h[0] if h else None, output_final_state=True, **kw)
        return o, s

    args = (q, k, v, g) + ((h0,) if with_state else ())
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-7)


def _loss_grads(fn, q, k, v, g, h0, seed=1, **kw):
    o, s = fn(q, k, v, g, initial_state=h0, output_final_state=True, **kw)
    return o, s, cotangent_grads([o, s], [q, k, v, g, h0], seed)


@pytest.mark.parametrize("name", ["recurrent", "chunked"])
@pytest.mark.parametrize("T", [1, 7, 63, 64, 65, 200])
def test_matches_naive_every_gradient(name, T):
    R, D = 5, 7
    q, k, v, g, h0 = scan_inputs(2, T, R, D)
    ref = _loss_grads(naive_decayed_scan, q, k, v, g, h0)
    got = _loss_grads(REFS[name], q, k, v, g, h0)
    tol = TOL[("torch", torch.float64)]
    assert_close("o", got[0], ref[0], tol)
    assert_close("final_state", got[1], ref[1], tol)
    for n, a, b in zip(["dq", "dk", "dv", "dgamma", "dh0"], got[2], ref[2]):
        assert_close(n, a, b, tol)


@settings(max_examples=25, deadline=None)
@given(T=st.integers(1, 90), R=st.integers(1, 6), D=st.integers(1, 9), C=st.integers(1, 70),
       lo=st.floats(0.01, 1.0), seed=st.integers(0, 10_000))
def test_chunked_equals_naive_any_chunk(T, R, D, C, lo, seed):
    gamma = torch.linspace(lo, 1.0, R, dtype=torch.float64)
    q, k, v, g, h0 = scan_inputs(1, T, R, D, seed=seed, gamma=gamma, requires_grad=False)
    o_ref, s_ref = naive_decayed_scan(q, k, v, g, initial_state=h0, output_final_state=True)
    o, s = chunked_decayed_scan(q, k, v, g, initial_state=h0, output_final_state=True, chunk_size=C)
    assert_close("o", o, o_ref, 1e-9)
    assert_close("final_state", s, s_ref, 1e-9)


@pytest.mark.parametrize("backend", ["naive", "recurrent", "chunked"])
def test_state_chaining(backend):
    q, k, v, g, h0 = scan_inputs(2, 50, 4, 6, requires_grad=False)
    o, s = decayed_scan(q, k, v, g, initial_state=h0, output_final_state=True, backend=backend)
    o1, s1 = decayed_scan(q[:, :23], k[:, :23], v[:, :23], g, initial_state=h0, output_final_state=True, backend=backend)
    o2, s2 = decayed_scan(q[:, 23:], k[:, 23:], v[:, 23:], g, initial_state=s1, output_final_state=True, backend=backend)
    assert_close("o", torch.cat([o1, o2], 1), o, 1e-12)
    assert_close("final_state", s2, s, 1e-12)


@pytest.mark.parametrize("backend", ["naive", "recurrent", "chunked"])
def test_varlen_equals_separate_runs(backend):
    lens = [5, 1, 70, 12]
    q, k, v, g, h0 = scan_inputs(1, sum(lens), 3, 5, requires_grad=False)
    h0 = torch.randn(len(lens), 3, 5, dtype=torch.float64)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    o, s = decayed_scan(q, k, v, g, initial_state=h0, output_final_state=True, cu_seqlens=cu, backend=backend)
    for i in range(len(lens)):
        a, b = int(cu[i]), int(cu[i + 1])
        oi, si = naive_decayed_scan(q[:, a:b], k[:, a:b], v[:, a:b], g, initial_state=h0[i:i + 1], output_final_state=True)
        assert_close(f"o[seq {i}]", o[:, a:b], oi, 1e-12)
        assert_close(f"final_state[seq {i}]", s[i:i + 1], si, 1e-12)


def test_extreme_decays_are_finite_and_exact():
    # gamma = 0.01 over long chunks: gamma^n underflows to 0, never overflows
    R, D, T = 4, 3, 300
    g = torch.tensor([0.01, 0.011, 0.999999, 1.0], dtype=torch.float64)
    q, k, v, _, h0 = scan_inputs(1, T, R, D, gamma=g, requires_grad=False)
    o_ref, s_ref = naive_decayed_scan(q, k, v, g, initial_state=h0, output_final_state=True)
    for C in (16, 64, 128):
        o, s = chunked_decayed_scan(q.float(), k.float(), v.float(), g.float(), initial_state=h0.float(),
                                    output_final_state=True, chunk_size=C)
        assert_close("o fp32", o, o_ref, TOL[("torch", torch.float32)])
        assert_close("final fp32", s, s_ref, TOL[("torch", torch.float32)])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_accumulate_in_fp32(dtype):
    q, k, v, g, h0 = scan_inputs(2, 100, 4, 8, requires_grad=False)
    o_ref, s_ref = naive_decayed_scan(q.to(dtype).double(), k.to(dtype).double(), v.to(dtype).double(), g,
                                      initial_state=h0, output_final_state=True)
    o, s = chunked_decayed_scan(q.to(dtype), k.to(dtype), v.to(dtype), g.float(), initial_state=h0.float(),
                                output_final_state=True)
    assert o.dtype == dtype and s.dtype == torch.float32
    assert_close("o", o, o_ref, TOL[("torch", dtype)])
    assert_close("final_state", s, s_ref, 1e-5)


def test_non_contiguous_inputs():
    q, k, v, g, h0 = scan_inputs(2, 40, 6, 10, requires_grad=False)
    qs, ks, vs = q[..., ::2], k[..., 1::2], v[:, :, 1:8]
    assert not qs.is_contiguous()
    o, s = decayed_scan(qs, ks, vs, g[:3], initial_state=h0[:, :3, 1:8], output_final_state=True, backend="chunked")
    o_ref, s_ref = naive_decayed_scan(qs.contiguous(), ks.contiguous(), vs.contiguous(), g[:3],
                                      initial_state=h0[:, :3, 1:8].contiguous(), output_final_state=True)
    assert_close("o", o, o_ref, 1e-12)
    assert_close("final_state", s, s_ref, 1e-12)


def _good(B=1, T=8, R=3, D=4):
    return (torch.randn(B, T, R), torch.randn(B, T, R), torch.randn(B, T, D), make_gamma(R, dtype=torch.float32))


@pytest.mark.parametrize("case,exc,match", [
    ("q_rank", ValueError, "q must have shape"),
    ("k_shape", ValueError, "k must have the shape of q"),
    ("v_len", ValueError, "v must have shape"),
    ("gamma_len", ValueError, "gamma must have shape"),
    ("gamma_zero", ValueError, r"gamma must lie in \(0, 1\]"),
    ("gamma_big", ValueError, r"gamma must lie in \(0, 1\]"),
    ("int_q", TypeError, "q must be a floating tensor"),
    ("dtype_mismatch", TypeError, "k has dtype"),
    ("state_shape", ValueError, "initial_state must have shape"),
    ("state_dtype", TypeError, "initial_state must be float32"),
    ("cu_start", ValueError, "cu_seqlens must start at 0"),
    ("cu_end", ValueError, "cu_seqlens must end"),
    ("cu_order", ValueError, "strictly increasing"),
    ("cu_batch", ValueError, "batch of size 1"),
    ("cu_dtype", TypeError, "cu_seqlens must be int32 or int64"),
    ("backend", ValueError, "backend must be one of"),
    ("not_tensor", TypeError, "q must be a torch.Tensor"),
])
@pytest.mark.parametrize("backend", ["chunked", "triton"])
def test_bad_input_errors(case, exc, match, backend, monkeypatch):
    """CPU tensors for every backend (on CUDA a bad gamma is an asynchronous device-side assert, not
    a ValueError); for "triton" as where Triton cannot run them (no TRITON_INTERPRET): the argument
    checks come before the device check, so a bad call gets the same error on every machine."""
    if backend == "triton":
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v, g = _good()
    kw = {}
    if case == "q_rank":
        q = q[0]
    elif case == "k_shape":
        k = k[:, :5]
    elif case == "v_len":
        v = v[:, :5]
    elif case == "gamma_len":
        g = g[:2]
    elif case == "gamma_zero":
        g = torch.tensor([0.0, 0.5, 0.9])
    elif case == "gamma_big":
        g = torch.tensor([0.5, 0.9, 1.01])
    elif case == "int_q":
        q = torch.ones(1, 8, 3, dtype=torch.int64)
    elif case == "dtype_mismatch":
        k = k.double()
    elif case == "state_shape":
        kw["initial_state"] = torch.zeros(1, 4, 3)
    elif case == "state_dtype":
        kw["initial_state"] = torch.zeros(1, 3, 4, dtype=torch.float16)
    elif case == "cu_start":
        kw["cu_seqlens"] = torch.tensor([1, 8])
    elif case == "cu_end":
        kw["cu_seqlens"] = torch.tensor([0, 3, 7])
    elif case == "cu_order":
        kw["cu_seqlens"] = torch.tensor([0, 5, 5, 8])
    elif case == "cu_batch":
        q, k, v = (t.expand(2, -1, -1) for t in (q, k, v))
        kw["cu_seqlens"] = torch.tensor([0, 8])
    elif case == "cu_dtype":
        kw["cu_seqlens"] = torch.tensor([0.0, 8.0])
    elif case == "backend":
        kw["backend"] = "fast"
    elif case == "not_tensor":
        q = [[1.0]]
    with pytest.raises(exc, match=match):
        decayed_scan(q, k, v, g, **{"backend": backend, **kw})


@pytest.mark.parametrize("backend", ["naive", "recurrent", "chunked"])
def test_grads_without_states(backend):
    """No initial state and no final state requested: o-only loss, every gradient."""
    q, k, v, g, _ = scan_inputs(2, 45, 3, 5, init=False)
    do = torch.randn(2, 45, 5, dtype=torch.float64)
    o_ref, _ = naive_decayed_scan(q, k, v, g)
    ref = torch.autograd.grad((o_ref * do).sum(), [q, k, v, g])
    o, s = decayed_scan(q, k, v, g, backend=backend)
    assert s is None
    got = torch.autograd.grad((o * do).sum(), [q, k, v, g])
    assert_close("o", o, o_ref, 1e-10)
    for n, a, b in zip(["dq", "dk", "dv", "dgamma"], got, ref):
        assert_close(n, a, b, 1e-10)


@pytest.mark.parametrize("backend", ["naive", "recurrent", "chunked"])
def test_empty_sequence_passes_state_through(backend):
    q, k, v, g, h0 = scan_inputs(2, 0, 3, 4, requires_grad=False)
    o, s = decayed_scan(q, k, v, g, initial_state=h0, output_final_state=True, backend=backend)
    assert o.shape == (2, 0, 4)
    assert torch.equal(s, h0)


def test_triton_backend_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    q, k, v, g = _good()
    assert_triton_on_cpu_is_a_clear_error(monkeypatch, lambda: decayed_scan(q, k, v, g, backend="triton"))


# --------------------------------------------------------------------------------------
# Triton path vs the float64 naive reference
# --------------------------------------------------------------------------------------


def _inputs(B, T, R, D, dtype=F32, seed=0, gamma=None, init=True):
    """float64 leaves for the reference and detached copies in `dtype` on DEVICE for triton."""
    ref = scan_inputs(B, T, R, D, dtype=F64, seed=seed, gamma=gamma, init=init)
    got = []
    for i, t in enumerate(ref):
        if t is None:
            got.append(None)
            continue
        dt = dtype if i < 3 else F32          # q, k, v in `dtype`; gamma and states float32
        got.append(t.detach().to(dt).to(DEVICE).requires_grad_())
    # the reference sees exactly the (rounded) values the kernel sees
    ref = [None if t is None else g.detach().to(F64).cpu().requires_grad_() for t, g in zip(ref, got)]
    return ref, got


def _run(q, k, v, g, h0, backend, seed=1, cu=None, final=True, **kw):
    o, s = decayed_scan(q, k, v, g, initial_state=h0, output_final_state=final, cu_seqlens=cu,
                        backend=backend, **kw)
    return o, s, cotangent_grads([o, s], [q, k, v, g, h0], seed)


def _compare(B, T, R, D, dtype=F32, gamma=None, init=True, final=True, cu=None, seed=0, tol=None, settings=None):
    ref_in, got_in = _inputs(B, T, R, D, dtype=dtype, seed=seed, gamma=gamma, init=init)
    if cu is not None and init:
        n = cu.numel() - 1
        h0 = torch.randn(n, R, D, generator=torch.Generator().manual_seed(seed + 7), dtype=F64)
        ref_in[4] = h0.clone().requires_grad_()
        got_in[4] = h0.to(F32).to(DEVICE).requires_grad_()
    ref = _run(*ref_in, "naive", cu=cu, final=final)
    got = _run(*got_in, "triton", cu=None if cu is None else cu.to(DEVICE), final=final, settings=settings)
    tol = TOL[("triton", dtype)] if tol is None else tol
    assert got[0].dtype == dtype
    assert_close("o", got[0], ref[0], tol)
    if final:
        assert got[1].dtype == F32
        assert_close("final_state", got[1], ref[1], tol)
    names = ["dq", "dk", "dv", "dgamma", "dh0"]
    for name, a, b in zip(names, got[2], ref[2]):
        assert_close(name, a, b, tol)
    return max(float((a.double().cpu() - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt())
               for a, b in zip(got[2], ref[2]))


@triton_test
@pytest.mark.parametrize("T", [1, 7, 63, 64, pytest.param(65, marks=RACE), 200])
def test_triton_matches_naive_every_gradient(T):
    _compare(2, T, 5, 7)


@triton_test
@pytest.mark.parametrize("gamma", [
    torch.full((6,), 0.01), torch.full((6,), 1.0), make_gamma(6, 0.01, 1.0),
    torch.tensor([0.999999, 0.01, 0.5, 1.0, 0.02, 0.97])], ids=["all-0.01", "all-1", "mixed", "shuffled"])
def test_triton_decay_sweep(gamma):
    _compare(1, 130, 6, 9, gamma=gamma)


@triton_test
@pytest.mark.parametrize("R,D,T", [(1, 1, 20), (3, 33, 50), (17, 70, 90), (128, 20, 40), (31, 130, 70)],
                         ids=lambda x: str(x))
def test_triton_odd_sizes(R, D, T):
    _compare(1, T, R, D)


@triton_test
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_triton_half_precision(dtype):
    _compare(2, 100, 8, 24, dtype=dtype)


@triton_test
def test_triton_float64_inputs_run_in_float32():
    ref_in = scan_inputs(1, 70, 4, 6)
    got_in = [t.detach().to(DEVICE).requires_grad_() for t in ref_in]
    ref = _run(*ref_in, "naive")
    got = _run(*got_in, "triton")
    assert got[0].dtype == F64 and got[1].dtype == F64
    tol = TOL[("triton", F64)]
    assert_close("o", got[0], ref[0], tol)
    assert_close("final_state", got[1], ref[1], tol)
    for name, a, b in zip(["dq", "dk", "dv", "dgamma", "dh0"], got[2], ref[2]):
        assert a.dtype == F64, name
        assert_close(name, a, b, tol)


@triton_test
@pytest.mark.parametrize("init,final", [(False, False), (False, True), (True, False)],
                         ids=["no-states", "final-only", "init-only"])
def test_triton_optional_states(init, final):
    _compare(2, 70, 3, 5, init=init, final=final)


@triton_test
@RACE
def test_triton_diag_loop_no_states():
    """R = 33 (> 32: the kernels walk the diagonal score blocks one position at a time), no states
    in or out, one chunk of 20 tokens (two sub-chunks): the smallest case of that path."""
    _compare(1, 20, 33, 4, init=False, final=False)


@triton_test
def test_triton_gradient_through_one_output_only():
    """Loss on o alone and on the final state alone (the other cotangent is absent)."""
    ref_in, got_in = _inputs(1, 80, 3, 4)
    for use_o in (True, False):
        grads = []
        for (q, k, v, g, h0), backend in ((ref_in, "naive"), (got_in, "triton")):
            o, s = decayed_scan(q, k, v, g, initial_state=h0, output_final_state=True, backend=backend)
            loss = (o * o.detach()).sum() if use_o else (s * s.detach()).sum()
            leaves = [q, k, v, g, h0]
            gs = torch.autograd.grad(loss, leaves, allow_unused=True)
            # q does not reach the final state: its gradient is zero (None from the reference)
            grads.append([torch.zeros_like(x) if d is None else d for d, x in zip(gs, leaves)])
        for name, a, b in zip(["dq", "dk", "dv", "dgamma", "dh0"], grads[1], grads[0]):
            if not use_o and name == "dq":
                assert torch.equal(a, torch.zeros_like(a)) and torch.equal(b, torch.zeros_like(b))
                continue
            assert_close(f"{name} (use_o={use_o})", a, b, TOL[("triton", F32)])


@triton_test
@RACE
def test_triton_varlen_matches_naive():
    lens = [5, 1, 70, 64, 12, 17]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    _compare(1, sum(lens), 4, 6, cu=cu)


@triton_test
def test_triton_varlen_equals_separate_runs():
    lens = [65, 3, 40]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int64, device=DEVICE)
    _, (q, k, v, g, _) = _inputs(1, sum(lens), 3, 5, init=False)
    h0 = torch.randn(len(lens), 3, 5, device=DEVICE)
    o, s = decayed_scan(q, k, v, g, initial_state=h0, output_final_state=True, cu_seqlens=cu,
                        backend="triton")
    for i in range(len(lens)):
        a, b = int(cu[i]), int(cu[i + 1])
        o_i, s_i = decayed_scan(q[:, a:b], k[:, a:b], v[:, a:b], g, initial_state=h0[i:i + 1],
                                output_final_state=True, backend="triton")
        assert_close(f"o[seq {i}]", o[:, a:b], o_i, 1e-6)
        assert_close(f"final[seq {i}]", s[i:i + 1], s_i, 1e-6)


@triton_test
def test_triton_state_chaining():
    """Two halves with the state passed along == one run over the whole sequence."""
    _, (q, k, v, g, h0) = _inputs(2, 150, 4, 6)
    o, s = decayed_scan(q, k, v, g, initial_state=h0, output_final_state=True, backend="triton")
    o1, s1 = decayed_scan(q[:, :71], k[:, :71], v[:, :71], g, initial_state=h0, output_final_state=True,
                          backend="triton")
    o2, s2 = decayed_scan(q[:, 71:], k[:, 71:], v[:, 71:], g, initial_state=s1, output_final_state=True,
                          backend="triton")
    assert_close("o", torch.cat([o1, o2], 1), o, 1e-6)
    assert_close("final_state", s2, s, 1e-6)
    # and the gradient flows through the passed state into the first half
    gen = torch.Generator().manual_seed(3)
    do = torch.randn(o.shape, generator=gen).to(DEVICE)
    ds = torch.randn(s.shape, generator=gen).to(DEVICE)
    whole = torch.autograd.grad((o * do).sum() + (s * ds).sum(), [q, k, v, g, h0])
    halves = torch.autograd.grad((torch.cat([o1, o2], 1) * do).sum() + (s2 * ds).sum(), [q, k, v, g, h0])
    for name, a, b in zip(["dq", "dk", "dv", "dgamma", "dh0"], halves, whole):
        assert_close(name, a, b, 1e-5)


@triton_test
def test_triton_backward_is_deterministic():
    _, (q, k, v, g, h0) = _inputs(2, 200, 7, 20, seed=5)
    runs = [_run(q, k, v, g, h0, "triton") for _ in range(2)]
    for name, a, b in zip(["o", "final_state"], runs[0][:2], runs[1][:2]):
        assert torch.equal(a, b), name
    for name, a, b in zip(["dq", "dk", "dv", "dgamma", "dh0"], runs[0][2], runs[1][2]):
        assert torch.equal(a, b), f"{name} differs between two identical backward runs"


# ---- the state pass: one level, or three over groups of chunks (kernels/scan.py, pass_group) ----


def _walk_reference(s, lg, h0, bounds, BT, reverse):
    """float64 chunk-by-chunk walk: the value entering every chunk (walk order reversed for
    `reverse`), and the value after each sequence's last one."""
    s, g = s.double(), torch.exp2(lg.double())[:, None]
    out, fin, c0 = s.clone(), [], 0
    for n, (a, e) in enumerate(bounds):
        nt = -(-(e - a) // BT)
        h = torch.zeros_like(s[0]) if h0 is None else h0[n].double()
        for c in (range(nt - 1, -1, -1) if reverse else range(nt)):
            out[c0 + c] = h
            h = g ** min(e - a - c * BT, BT) * h + s[c0 + c]
        fin.append(h)
        c0 += nt
    return out, torch.stack(fin)


# (label, B, lens (None: B rows of T) or T, G, chunks per step): with G = 3 and 2 chunks per step
# a group's own walk takes two steps, the second partial
PASS_CASES = [
    ("one-chunk", 1, 40, 3, 2),
    ("one-group", 1, 3 * 64, 3, 2),
    ("one-group-short", 1, 3 * 64 - 5, 3, 2),
    ("group+1chunk", 1, 3 * 64 + 1, 3, 2),
    ("many-groups", 2, 11 * 64 + 7, 3, 2),
    ("groups-of-1", 1, 5 * 64, 1, 2),
    ("more-steps", 1, 40 * 64 - 9, 4, 16),
    ("packed", 1, [200, 1, 64 * 3, 64 * 3 + 1, 70, 64 * 7 - 3], 3, 2),
    ("packed-groups-of-2", 1, [1, 64 * 6, 129, 64], 2, 4),
]


@triton_test
@pytest.mark.parametrize("case", [pytest.param(c, marks=RACE) if c[0] in ("many-groups", "packed") else c
                                  for c in PASS_CASES], ids=[c[0] for c in PASS_CASES])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reversed"])
@pytest.mark.parametrize("h0", [True, False], ids=["h0", "zero"])
def test_triton_state_pass_levels(case, reverse, h0):
    """ChunkPlan.state_pass with groups forced (levels A, B, C) against a float64 walk: the value
    entering every chunk and the final one, at group boundaries (one group, one group and a chunk,
    a group of one chunk, many), packed sequences of 1 to 7 chunks crossing group boundaries, the
    last chunk short; bitwise the same on a second run."""
    _, B, lens, G, CB = case
    settings = dataclasses.replace(SCAN, pass_group=G, pass_chunks=CB)
    R, D = 3, 5
    if isinstance(lens, list):
        cuts = [0] + torch.tensor(lens).cumsum(0).tolist()
        cu, T = torch.tensor(cuts, dtype=torch.int32, device=DEVICE), cuts[-1]
        bounds = list(zip(cuts[:-1], cuts[1:]))
    else:
        cu, T = None, lens
        bounds = [(b * T, (b + 1) * T) for b in range(B)]
    P = ks.ChunkPlan(B, T, R, D, F32, cu, 64, torch.device(DEVICE), settings)
    assert P.pass_groups()[0] == G and P.pass_args()["CB"] == CB
    gen = torch.Generator().manual_seed(len(bounds) + T)
    s = torch.randn(P.NC, R, D, generator=gen)
    init = torch.randn(len(bounds), R, D, generator=gen) if h0 else None
    lg = ks.log2_gamma(torch.rand(R, generator=gen) * 0.3 + 0.7)
    want, want_fin = _walk_reference(s, lg, init, bounds, 64, reverse)
    runs = []
    for _ in range(2):
        got = s.to(DEVICE).clone()
        fin = P.state_pass(got, lg.to(DEVICE), None if init is None else init.to(DEVICE), True, reverse)
        runs.append((got.cpu(), fin.cpu()))
    assert_close("states", runs[0][0], want, 1e-6)
    assert_close("final", runs[0][1], want_fin, 1e-6)
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@triton_test
def test_triton_state_pass_group_rule():
    """One level while the walk takes <= PASS_MAX_STEPS steps or already has PASS_LEVEL_PROGRAMS
    programs; else groups of ~sqrt(chunks), a power of two >= PASS_CHUNKS: 8 + 8 dependent steps
    at T = 1M instead of 1,024.  Packed sequences: the longest one decides."""
    assert (SCAN.pass_chunks, SCAN.pass_max_steps, SCAN.pass_level_programs, SCAN.pass_block) == (16, 8, 256, 128)
    steps = lambda nt, G: (-(-(-(-nt // G)) // 16), -(-G // 16))            # noqa: E731  (B, C)
    for T, G in ((64, 0), (8192, 0), (8193, 16), (16384, 16), (65536, 32), (1 << 20, 128), (1 << 22, 256)):
        nt = -(-T // 64)
        assert ks.pass_group(nt, 8) == ks.pass_group(nt, 255) == G, T
        assert ks.pass_group(nt, 256) == 0, T
        if G:
            assert max(steps(nt, G)) <= 16, (T, steps(nt, G))
    cu = torch.tensor([0, 100, 100 + 64 * 200, 100 + 64 * 200 + 5], dtype=torch.int32)
    P = ks.ChunkPlan(1, int(cu[-1]), 4, 8, F32, cu, 64, torch.device("cpu"))
    assert P.nt_max() == 200 and P.pass_groups()[:2] == (16, 1 + 13 + 1)
    P = ks.ChunkPlan(3, 64 * 128, 4, 8, F32, None, 64, torch.device("cpu"))
    assert P.pass_groups()[0] == 0
    # B = 1, R = 16, T = 1M: levels up to D = 1024 (128 programs), one level from D = 2048 (256)
    for D, G in ((64, 128), (1024, 128), (2048, 0)):
        assert ks.ChunkPlan(1, 1 << 20, 16, D, F32, None, 64, torch.device("meta")).pass_groups()[0] == G, D
    assert ks.ChunkPlan(2, 1 << 20, 16, 1024, F32, None, 64, torch.device("meta")).pass_groups()[0] == 0


@triton_test
@pytest.mark.parametrize("varlen", [pytest.param(True, marks=RACE), False], ids=["varlen", "batch"])
def test_triton_state_pass_levels_end_to_end(varlen):
    """The scan forward and every gradient with the grouped pass forced (groups of 2 chunks, one
    chunk per step): packed sequences crossing group boundaries, initial and final states."""
    settings = dataclasses.replace(SCAN, pass_group=2, pass_chunks=1)
    if varlen:
        lens = [150, 1, 64, 200]
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
        _compare(1, sum(lens), 3, 5, cu=cu, settings=settings)
    else:
        _compare(2, 5 * 64 + 3, 3, 5, settings=settings)


@triton_test
def test_triton_non_contiguous_inputs():
    ref_in, _ = _inputs(2, 90, 5, 6)
    gen = torch.Generator().manual_seed(11)
    # q, k: every other channel of a wider tensor; v: a transposed (B, D, T) buffer
    qk = torch.randn(2, 90, 10, 2, generator=gen, dtype=F64)
    qk[..., ::2, 0] = ref_in[0].detach()
    qk[..., ::2, 1] = ref_in[1].detach()
    v_t = ref_in[2].detach().transpose(1, 2).contiguous()
    qk_dev = qk.to(F32).to(DEVICE).requires_grad_()
    v_dev = v_t.to(F32).to(DEVICE).requires_grad_()
    q, k, v = qk_dev[..., ::2, 0], qk_dev[..., ::2, 1], v_dev.transpose(1, 2)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    g = ref_in[3].detach().to(F32).to(DEVICE).requires_grad_()
    h0 = ref_in[4].detach().to(F32).to(DEVICE).requires_grad_()
    ref = _run(*ref_in, "naive")
    got = _run(q, k, v, g, h0, "triton")
    tol = TOL[("triton", F32)]
    assert_close("o", got[0], ref[0], tol)
    assert_close("final_state", got[1], ref[1], tol)
    for name, a, b in zip(["dq", "dk", "dv", "dgamma", "dh0"], got[2], ref[2]):
        assert_close(name, a, b, tol)


@triton_test
@pytest.mark.parametrize("chunk_size", [16, 32, 128])
def test_triton_launchers_other_chunk_sizes(chunk_size):
    """scan_fwd/scan_bwd called directly (as the fused K2 backward does) at other chunk sizes."""
    lens = [40, 1, 33]
    cu = torch.tensor([0, 40, 41, 74], dtype=torch.int32)
    ref_in, got_in = _inputs(1, 74, 3, 5, init=False)
    h0 = torch.randn(3, 3, 5, generator=torch.Generator().manual_seed(2), dtype=F64)
    ref_in[4] = h0.clone().requires_grad_()
    o_ref, s_ref = naive_decayed_scan(*ref_in[:4], initial_state=ref_in[4], output_final_state=True,
                                      cu_seqlens=cu)
    gen = torch.Generator().manual_seed(4)
    do = torch.randn(o_ref.shape, generator=gen, dtype=F64)
    ds = torch.randn(s_ref.shape, generator=gen, dtype=F64)
    ref_grads = torch.autograd.grad((o_ref * do).sum() + (s_ref * ds).sum(), ref_in)

    q, k, v, g = [t.detach() for t in got_in[:4]]
    h0_dev = h0.to(F32).to(DEVICE)
    cu_dev = cu.to(DEVICE)
    o, s, chunk_states = ks.scan_fwd(q, k, v, g, h0_dev, True, cu_dev, chunk_size)
    assert_close("o", o, o_ref, 1e-5)
    assert_close("final_state", s, s_ref, 1e-5)
    # chunk_states layout: entry chunk_offsets[n] + c is the state entering chunk c of sequence n
    n_chunks = [-(-n // chunk_size) for n in lens]
    assert chunk_states.shape == (sum(n_chunks), 3, 5)
    row = 0
    for n, (a, length) in enumerate(zip(cu[:-1].tolist(), lens)):
        for c in range(n_chunks[n]):
            if c == 0:
                want = h0[n]
            else:
                sl = slice(a, a + c * chunk_size)
                _, want = naive_decayed_scan(*[t.detach()[:, sl] for t in ref_in[:3]], ref_in[3].detach(),
                                             initial_state=h0[n:n + 1], output_final_state=True)
                want = want[0]
            assert_close(f"chunk_states[{row}] (seq {n}, chunk {c})", chunk_states[row], want, 1e-5)
            row += 1
    grads = ks.scan_bwd(q, k, v, g, h0_dev, chunk_states, do.to(F32).to(DEVICE), ds.to(F32).to(DEVICE),
                        cu_dev, chunk_size)
    for name, a, b in zip(["dq", "dk", "dv", "dgamma", "dh0"], grads, ref_grads):
        assert_close(name, a, b, 1e-5)


@triton_test
def test_triton_empty_sequence():
    _, (q, k, v, g, h0) = _inputs(2, 0, 3, 4)
    o, s = decayed_scan(q, k, v, g, initial_state=h0, output_final_state=True, backend="triton")
    assert o.shape == (2, 0, 4)
    assert torch.equal(s, h0)
    o, s = decayed_scan(q, k, v, g, output_final_state=True, backend="triton")
    assert torch.equal(s, torch.zeros(2, 3, 4, device=DEVICE))
    # the launchers themselves (as the fused K2 path calls them): nothing to launch
    o, s, states = ks.scan_fwd(q, k, v, g, h0, True, None, 64)
    assert o.shape == (2, 0, 4) and states.shape == (0, 3, 4) and torch.equal(s, h0)
    dfinal = torch.randn(2, 3, 4, device=DEVICE)
    dq, dk, dv, dg, dh0 = ks.scan_bwd(q, k, v, g, h0, states, o, dfinal, None, 64)
    assert dq.shape == q.shape and dv.shape == v.shape
    assert torch.equal(dg, torch.zeros(3, device=DEVICE)) and torch.equal(dh0, dfinal)


@triton_test
def test_triton_bad_input():
    _, (q, k, v, g, _) = _inputs(1, 4, 129, 3, init=False)
    with pytest.raises(ValueError, match="R <= 128"):
        decayed_scan(q, k, v, g, backend="triton")
    with pytest.raises(ValueError, match="R <= 128"):
        ks.scan_fwd(q.detach(), k.detach(), v.detach(), g.detach(), None, False, None, 64)
    _, (q, k, v, g, _) = _inputs(1, 40, 2, 3, init=False)
    with pytest.raises(ValueError, match="chunk_size"):
        ks.scan_fwd(q, k, v, g, None, False, None, 48)
    _, _, states = ks.scan_fwd(q.detach(), k.detach(), v.detach(), g.detach(), None, False, None, 16)
    with pytest.raises(ValueError, match="chunk_states"):
        ks.scan_bwd(q, k, v, g, None, states, torch.ones_like(v), None, None, 32)


def _int64_case(T, D, block, edge_row, device, R=4):
    """A (1, T, D) bf16 scan with an initial state, forward and every gradient (random cotangents on
    o and the final state), against a float64 reference computed ``block`` rows at a time over all
    rows and channels (helpers.check_blockwise); the rows past ``edge_row`` are also judged alone."""
    gen = torch.Generator(device=device).manual_seed(0)
    bf = torch.bfloat16
    q = (torch.randn(1, T, R, generator=gen, device=device) / R ** 0.5).to(bf)
    k = (torch.randn(1, T, R, generator=gen, device=device) / R ** 0.5).to(bf)
    v = torch.randn(1, T, D, generator=gen, device=device, dtype=bf)
    g = torch.tensor([0.3, 0.9, 0.999, 1.0], device=device)[:R]
    h0 = torch.randn(1, R, D, generator=gen, device=device)
    leaves = [t.requires_grad_() for t in (q, k, v, g, h0)]
    o, s = decayed_scan(q, k, v, g, initial_state=h0, output_final_state=True, backend="triton")
    do = torch.randn(o.shape, generator=gen, device=device, dtype=bf)
    ds = torch.randn(s.shape, generator=gen, device=device)
    dq, dk, dv, dg, dh0 = torch.autograd.grad([o, s], leaves, [do, ds])
    got = {"out": o, "final state": s, "dq": dq, "dk": dk, "dv": dv, "dgamma": dg, "dstate": dh0}

    def step(xs, ps, st):
        o_b, s_b = chunked_decayed_scan(*xs, ps[0], initial_state=st[0], output_final_state=True)
        return o_b, [s_b]

    tally = ErrorTally(edge_row)
    check_blockwise(step, [("q", q), ("k", k), ("v", v)], [("gamma", g)], [("state", h0)], got, do, [ds],
                    block, tally)
    tally.check(TOL[("triton", bf)])
    for name in ("out", "dq", "dk", "dv"):
        assert "past the int32 edge" in tally.regions(name), name


@triton_test
@RACE
def test_triton_int64_case_small():
    """The CUDA-only int64 test below, at a size the interpreter runs (its reference and checks
    are the same code): 4 blocks of 40 rows, the last 37 rows judged alone."""
    _int64_case(T=150, D=20, block=40, edge_row=113, device=DEVICE)


@triton_test
@pytest.mark.skipif(DEVICE != "cuda", reason=CUDA_ONLY_INT64)
def test_triton_int64_offsets_cuda():
    """B*T*D past 2^31 with small grids (B = 1, D = 8192, T = 270,000: 2.2e9 elements, 4,219 chunks):
    o, the final state and every gradient vs float64 over all rows and channels, the 7,856 rows
    whose element offsets pass 2^31 also judged alone.  Device memory: q, k (small), v, o, do, dv
    in bf16 (4.4 GB each), the kernels' chunk states (0.6 GB), the reference's 4,096-row float64
    blocks (0.3 GB per D-wide tensor): about 20 GB; the peak is printed."""
    D = 8192
    T = 270_000
    assert T * D > INT32_EDGE
    torch.cuda.reset_peak_memory_stats()
    _int64_case(T=T, D=D, block=4096, edge_row=-(-INT32_EDGE // D), device="cuda")
    print(f"peak CUDA memory {torch.cuda.max_memory_allocated() / 2 ** 30:.1f} GiB")


@triton_test
@pytest.mark.skipif(DEVICE != "cuda", reason=CUDA_ONLY_LONG)
def test_triton_long_sequence_cuda():
    """T = 1,000,003 with decays at both ends: o, final state and every gradient vs the float64
    chunked reference (itself checked against naive in the reference section above)."""
    from kop_triton.ops.scan import chunked_decayed_scan
    T, R, D = 1_000_003, 4, 24
    gamma = torch.tensor([0.01, 0.5, 0.999, 1.0])
    got_in = [t.to("cuda").float().requires_grad_() for t in scan_inputs(1, T, R, D, gamma=gamma,
                                                                         requires_grad=False)]
    # the reference sees the float32-rounded values (gamma = 0.999 rounds visibly over 1e6 steps)
    ref_in = [t.detach().double().requires_grad_() for t in got_in]

    def run(fn, q, k, v, g, h0, **kw):
        o, s = fn(q, k, v, g, initial_state=h0, output_final_state=True, **kw)
        gen = torch.Generator(device="cuda").manual_seed(1)
        do = torch.randn(o.shape, generator=gen, device="cuda", dtype=F64).to(o)
        ds = torch.randn(s.shape, generator=gen, device="cuda", dtype=F64).to(s)
        return (o, s) + torch.autograd.grad((o * do).sum() + (s * ds).sum(), [q, k, v, g, h0])

    ref = run(chunked_decayed_scan, *ref_in, chunk_size=256)
    got = run(lambda *a, **kw: decayed_scan(*a, backend="triton", **kw), *got_in)
    for name, a, b in zip(["o", "final_state", "dq", "dk", "dv", "dgamma", "dh0"], got, ref):
        assert_close(name, a, b, TOL[("triton", F32)])
