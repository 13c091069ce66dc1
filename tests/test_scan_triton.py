"""Triton decayed scan vs the float64 naive reference: forward, every gradient, varlen, states.

Runs on CUDA when a GPU is present, otherwise on CPU tensors through the Triton interpreter
(TRITON_INTERPRET=1, set by conftest.py).  Every buffer the launchers allocate is filled
with NaN first (fixture below), so an element a kernel never writes cannot go unnoticed.
"""

import pytest
import torch

from helpers import DEVICE, TOL, TRITON_OK, assert_close, cotangent_grads, make_gamma, scan_inputs
from kop_triton import decayed_scan
from kop_triton.ops.scan import naive_decayed_scan

pytestmark = pytest.mark.skipif(not TRITON_OK, reason="triton is not installed")

if TRITON_OK:
    import kop_triton.kernels.scan as ks

F32 = torch.float32
F64 = torch.float64


@pytest.fixture(autouse=True)
def _nan_filled_buffers(nan_empty):
    """Every buffer the launchers allocate starts as NaN (conftest.nan_empty)."""


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


def _run(q, k, v, g, h0, backend, seed=1, cu=None, final=True):
    o, s = decayed_scan(q, k, v, g, initial_state=h0, output_final_state=final, cu_seqlens=cu,
                        backend=backend)
    return o, s, cotangent_grads([o, s], [q, k, v, g, h0], seed)


def _compare(B, T, R, D, dtype=F32, gamma=None, init=True, final=True, cu=None, seed=0, tol=None):
    ref_in, got_in = _inputs(B, T, R, D, dtype=dtype, seed=seed, gamma=gamma, init=init)
    if cu is not None and init:
        n = cu.numel() - 1
        h0 = torch.randn(n, R, D, generator=torch.Generator().manual_seed(seed + 7), dtype=F64)
        ref_in[4] = h0.clone().requires_grad_()
        got_in[4] = h0.to(F32).to(DEVICE).requires_grad_()
    ref = _run(*ref_in, "naive", cu=cu, final=final)
    got = _run(*got_in, "triton", cu=None if cu is None else cu.to(DEVICE), final=final)
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


@pytest.mark.parametrize("T", [1, 7, 63, 64, 65, 200])
def test_matches_naive_every_gradient(T):
    _compare(2, T, 5, 7)


@pytest.mark.parametrize("gamma", [
    torch.full((6,), 0.01), torch.full((6,), 1.0), make_gamma(6, 0.01, 1.0),
    torch.tensor([0.999999, 0.01, 0.5, 1.0, 0.02, 0.97])], ids=["all-0.01", "all-1", "mixed", "shuffled"])
def test_decay_sweep(gamma):
    _compare(1, 130, 6, 9, gamma=gamma)


@pytest.mark.parametrize("R,D,T", [(1, 1, 20), (3, 33, 50), (17, 70, 90), (128, 20, 40), (31, 130, 70)],
                         ids=lambda x: str(x))
def test_odd_sizes(R, D, T):
    _compare(1, T, R, D)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision(dtype):
    _compare(2, 100, 8, 24, dtype=dtype)


def test_float64_inputs_run_in_float32():
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


@pytest.mark.parametrize("init,final", [(False, False), (False, True), (True, False)],
                         ids=["no-states", "final-only", "init-only"])
def test_optional_states(init, final):
    _compare(2, 70, 3, 5, init=init, final=final)


def test_gradient_through_one_output_only():
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


def test_varlen_matches_naive():
    lens = [5, 1, 70, 64, 12, 17]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    _compare(1, sum(lens), 4, 6, cu=cu)


def test_varlen_equals_separate_runs():
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


def test_state_chaining():
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


def test_backward_is_deterministic():
    _, (q, k, v, g, h0) = _inputs(2, 200, 7, 20, seed=5)
    runs = [_run(q, k, v, g, h0, "triton") for _ in range(2)]
    for name, a, b in zip(["o", "final_state"], runs[0][:2], runs[1][:2]):
        assert torch.equal(a, b), name
    for name, a, b in zip(["dq", "dk", "dv", "dgamma", "dh0"], runs[0][2], runs[1][2]):
        assert torch.equal(a, b), f"{name} differs between two identical backward runs"


def test_non_contiguous_inputs():
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


@pytest.mark.parametrize("chunk_size", [16, 32, 128])
def test_launchers_other_chunk_sizes(chunk_size):
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


def test_empty_sequence():
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


def test_bad_input():
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


@pytest.mark.skipif(DEVICE != "cuda", reason="needs > 8 GiB of device memory; the interpreter cannot run it")
def test_int64_offsets_cuda():
    """B*T*D past 2^31: the tail of the output still matches a short run from the chained state."""
    B, R, D = 2, 2, 64
    T = 2 ** 31 // (B * D) + 300
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, T, R, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(B, T, R, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(B, T, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    g = torch.tensor([0.5, 0.9], device="cuda")
    o, s = decayed_scan(q, k, v, g, output_final_state=True, backend="triton")
    cut = T - 200
    _, s1 = decayed_scan(q[:, :cut], k[:, :cut], v[:, :cut], g, output_final_state=True, backend="triton")
    o_ref, s_ref = naive_decayed_scan(q[:, cut:].double(), k[:, cut:].double(), v[:, cut:].double(),
                                      g.double(), initial_state=s1.double(), output_final_state=True)
    assert_close("o tail", o[:, cut:], o_ref, TOL[("triton", torch.bfloat16)])
    assert_close("final_state", s, s_ref, TOL[("triton", torch.bfloat16)])


@pytest.mark.skipif(DEVICE != "cuda", reason="a million tokens is out of the interpreter's reach")
def test_long_sequence_cuda():
    """T = 1,000,003 with decays at both ends: o, final state and every gradient vs the float64
    chunked reference (itself checked against naive in test_scan_reference.py)."""
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
