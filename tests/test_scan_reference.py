"""PyTorch references of the decayed scan: gradcheck, agreement, varlen, chaining, errors."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from helpers import TOL, assert_close, cotangent_grads, make_gamma, scan_inputs
from kop_triton import decayed_scan
from kop_triton.ops.scan import chunked_decayed_scan, naive_decayed_scan, recurrent_decayed_scan

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
def test_bad_input_errors(case, exc, match):
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
        decayed_scan(q, k, v, g, **{"backend": "chunked", **kw})


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


@pytest.mark.parametrize("op", ["scan", "conv", "k2"])
def test_triton_backend_on_cpu_without_interpreter_is_a_clear_error(op, monkeypatch):
    """Not a crash inside Triton's driver lookup: a ValueError naming the backend and the device."""
    from kop_triton import causal_conv, k2_mixer
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v, g = _good()
    calls = {
        "scan": lambda: decayed_scan(q, k, v, g, backend="triton"),
        "conv": lambda: causal_conv(v, torch.rand(3), backend="triton"),
        "k2": lambda: k2_mixer(v, torch.randn(4, 3), torch.randn(4, 3), torch.ones(3), g,
                               torch.rand(3), torch.zeros(()), backend="triton"),
    }
    with pytest.raises(ValueError, match=r"backend='triton' runs Triton kernels on CUDA tensors.*got tensors on cpu"):
        calls[op]()
