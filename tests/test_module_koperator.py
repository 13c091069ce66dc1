"""KOperator: init, parallel vs SPEC formula (forward and every gradient), step == parallel,
prompt in pieces == one pass, shared kernel, autocast, torch.compile, DDP, Triton path, errors;
the other building blocks of modules.py: the hand-written RMSNorm and the CPU dropout.
(The K2 op itself, k2_mixer and its torch.library ops, is tested in test_k2.py.)"""
import math
import os
import socket

import pytest
import torch
import torch.nn.functional as F

from helpers import TOL, assert_close, cotangent_grads
from kop_triton import KOperator
from kop_triton.modules import Dropout, KOperatorState, RMSNorm, _RMSNormFn


def spec_koperator(x, m, s0=None, c0=None):
    """SPEC section 1 written out token by token in float64 (independent of the package ops)."""
    x = x.double()
    B, T, D = x.shape
    u, v = m.u.double(), m.v.double()
    gamma = m.gamma_min + (m.gamma_max - m.gamma_min) * torch.sigmoid(m.decay_logit.double())
    alpha = m.alpha_cap * torch.sigmoid(m.alpha_logit.double())
    w = m.get_kernel().double()
    K = w.shape[0]
    g = torch.sigmoid(m.gate_logit.double())
    S = torch.zeros(B, m.rank, D, dtype=torch.float64) if s0 is None else s0.double()
    hist = torch.zeros(B, K - 1, D, dtype=torch.float64) if c0 is None else c0.double()
    xs = torch.cat([hist, x], dim=1)                      # x_{t<0} from the conv state
    outs = []
    for t in range(T):
        xt = x[:, t]
        qn = xt @ u
        kn = xt @ v
        q = alpha * qn / qn.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        k = kn / kn.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        S = gamma[:, None] * S + k[:, :, None] * xt[:, None, :]
        y = torch.einsum("br,brd->bd", q, S)
        c = sum(w[l] * xs[:, K - 1 + t - l] for l in range(K))
        outs.append(F.linear(g * c + y, m.proj.weight.double(), m.proj.bias.double()))
    return torch.stack(outs, 1), S, xs[:, xs.shape[1] - (K - 1):]


def _module(D=7, R=3, K=4, seed=0, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    m = KOperator(D, rank=R, kernel_size=K, **kw)
    with torch.no_grad():   # move away from the symmetric init so every gradient is exercised
        m.alpha_logit.normal_()
        m.gate_logit.fill_(0.3)
        m.decay_logit.add_(torch.randn_like(m.decay_logit))
        m.proj.bias.normal_()
        if m.kernel is not None:
            m.kernel.add_(0.1 * torch.randn_like(m.kernel))
    return m.to(dtype)


def _inputs(B, T, m, seed=1, dtype=torch.float64, state=True):
    g = torch.Generator().manual_seed(seed)
    D, R, K = m.d_model, m.rank, m.kernel_size
    x = torch.randn(B, T, D, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    if not state:
        return x, None, None
    sd = torch.float64 if dtype == torch.float64 else torch.float32
    s0 = torch.randn(B, R, D, generator=g, dtype=torch.float64).to(sd).requires_grad_()
    c0 = torch.randn(B, K - 1, D, generator=g, dtype=torch.float64).to(sd).requires_grad_()
    return x, s0, c0


def test_init_follows_spec():
    torch.manual_seed(0)
    m = KOperator(256, rank=16, kernel_size=8, gamma_min=0.05, gamma_max=1.0, alpha_cap=2.0)
    tau = torch.logspace(math.log10(1 / 0.95), math.log10(1e6), 16, dtype=torch.float64)
    assert_close("gamma", m.gamma(), (1 - 1 / tau).clamp(0.05 + 0.95e-6, 1 - 0.95e-6), 1e-6)
    lag = torch.arange(8, dtype=torch.float64)
    assert_close("kernel", m.kernel, torch.exp(-0.15 * lag) / torch.exp(-0.15 * lag).sum(), 1e-7)
    assert torch.equal(m.alpha(), torch.ones(16))            # 2.0 * sigmoid(0)
    assert m.gate_logit.shape == () and float(m.gate_logit.detach()) == 0.0
    assert abs(float(m.u.detach().std()) - 0.05) < 0.005 and abs(float(m.proj.weight.detach().std()) - 0.02) < 0.001
    assert torch.equal(m.proj.bias, torch.zeros(256))
    names = {n for n, _ in m.named_parameters()}
    assert names == {"u", "v", "decay_logit", "alpha_logit", "kernel", "gate_logit", "proj.weight", "proj.bias"}


@pytest.mark.parametrize("backend", ["chunked", "naive", "recurrent"])
@pytest.mark.parametrize("T", [1, 5, 40, 70])
def test_parallel_matches_spec_every_gradient(backend, T):
    m = _module(backend=backend)
    x, s0, c0 = _inputs(2, T, m)
    y, st = m(x, state=(s0, c0), return_state=True)
    y_ref, s_ref, c_ref = spec_koperator(x, m, s0, c0)
    tol = TOL[("torch", torch.float64)]
    assert_close("y", y, y_ref, tol)
    assert_close("scan_state", st.scan, s_ref, tol)
    assert_close("conv_state", st.conv, c_ref, tol)
    inputs = [x, s0, c0] + list(m.parameters())
    names = ["x", "s0", "c0"] + [n for n, _ in m.named_parameters()]
    got = cotangent_grads([y, st.scan, st.conv], inputs)
    ref = cotangent_grads([y_ref, s_ref, c_ref], inputs)
    for n, a, b in zip(names, got, ref):
        assert_close(f"d{n}", a, b, tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_step_equals_parallel(dtype):
    m = _module(D=16, R=4, K=8, dtype=dtype, backend="chunked")
    x, s0, c0 = _inputs(3, 50, m, dtype=dtype)
    with torch.no_grad():
        y, st = m(x, state=(s0, c0), return_state=True)
        state, ys = KOperatorState(s0, c0), []
        for t in range(x.shape[1]):
            y_t, state = m.step(x[:, t], state)
            ys.append(y_t)
    tol = TOL[("torch", dtype)]
    assert_close("y step vs parallel", torch.stack(ys, 1), y, tol)
    assert_close("scan state", state.scan, st.scan, tol)
    assert_close("conv state", state.conv, st.conv, tol)
    assert state.scan.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


def test_step_from_zero_state_and_none():
    m = _module(backend="chunked")
    x, _, _ = _inputs(2, 6, m, state=False)
    with torch.no_grad():
        y = m(x)
        y0, st = m.step(x[:, 0], None)
        y1, _ = m.step(x[:, 1], st)
        z = m.zero_state(2, dtype=torch.float64)
        y0b, _ = m.step(x[:, 0], z)
    assert_close("step 0", y0, y[:, 0], 1e-12)
    assert_close("step 1", y1, y[:, 1], 1e-12)
    assert_close("zero state", y0b, y0, 1e-14)


@pytest.mark.parametrize("cuts", [[1], [17], [1, 2, 3], [31, 32, 33]], ids=str)
def test_prompt_in_pieces_equals_one_pass(cuts):
    m = _module(D=8, R=4, K=5, backend="chunked")
    x, s0, c0 = _inputs(2, 64, m)
    with torch.no_grad():
        y, st = m(x, state=(s0, c0), return_state=True)
        bounds = [0] + cuts + [x.shape[1]]
        state, ys = (s0, c0), []
        for a, b in zip(bounds[:-1], bounds[1:]):
            y_i, state = m(x[:, a:b], state=state, return_state=True)
            ys.append(y_i)
    assert_close("y pieces", torch.cat(ys, 1), y, 1e-12)
    assert_close("scan", state.scan, st.scan, 1e-12)
    assert_close("conv", state.conv, st.conv, 1e-12)


def test_packed_sequences_equal_separate_runs():
    m = _module(D=6, R=2, K=3, backend="chunked")
    lens = [5, 1, 12]
    x, _, _ = _inputs(1, sum(lens), m, state=False)
    cu = torch.tensor([0, 5, 6, 18])
    with torch.no_grad():
        y, st = m(x, return_state=True, cu_seqlens=cu)
        for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
            y_i, st_i = m(x[:, a:b], return_state=True)
            assert_close(f"y seq {i}", y[:, a:b], y_i, 1e-12)
            assert_close(f"scan seq {i}", st.scan[i:i + 1], st_i.scan, 1e-12)


def test_shared_kernel_is_used_not_registered():
    shared = torch.nn.Parameter(torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64))
    m = KOperator(6, rank=2, shared_kernel=shared, backend="chunked").double()
    assert m.kernel is None and m.kernel_size == 3
    assert "kernel" not in dict(m.named_parameters()) and "kernel" not in m.state_dict()
    x, s0, c0 = _inputs(1, 9, m)
    y, st = m(x, state=(s0, c0), return_state=True)
    y_ref, _, _ = spec_koperator(x, m, s0, c0)
    assert_close("y", y, y_ref, 1e-10)
    (g_got,) = cotangent_grads([y], [shared])
    (g_ref,) = cotangent_grads([y_ref], [shared])
    assert_close("dshared_kernel", g_got, g_ref, 1e-10)
    # a kernel passed at call time (how KStack hands over its shared parameter) wins
    other = torch.tensor([0.1, -0.4, 0.9, 0.2], dtype=torch.float64)
    own = KOperator(6, rank=2, kernel_size=4, backend="chunked").double()
    own.load_state_dict({**m.state_dict(), "kernel": other})
    with torch.no_grad():
        y_arg, st_arg = m(x, state=(s0, torch.zeros(1, 3, 6, dtype=torch.float64)), return_state=True, kernel=other)
        y_own = own(x, state=(s0, torch.zeros(1, 3, 6, dtype=torch.float64)))
        y_step, _ = m.step(x[:, 0], None, kernel=other)
    assert_close("kernel argument", y_arg, y_own, 1e-12)
    assert_close("kernel argument, step", y_step, own(x[:, :1])[:, 0], 1e-12)
    assert st_arg.conv.shape == (1, 3, 6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_cpu(dtype):
    m = _module(D=16, R=4, K=4, dtype=torch.float32, backend="chunked")
    x, _, _ = _inputs(2, 33, m, dtype=torch.float32, state=False)
    y32, st32 = m(x, return_state=True)
    with torch.autocast("cpu", dtype=dtype):
        y, st = m(x, return_state=True)
        y_t, st_t = m.step(x[:, 0], None)
    assert y.dtype == dtype and st.scan.dtype == torch.float32 and st.conv.dtype == torch.float32
    tol = TOL[("torch", dtype)]
    assert_close("y autocast vs fp32", y, y32, tol)
    assert_close("scan autocast vs fp32", st.scan, st32.scan, tol)
    assert_close("step autocast", y_t, y32[:, 0], tol)
    y.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def _compile_check(m, x, s0, c0):
    def f(x, s0, c0):
        y, st = m(x, state=(s0, c0), return_state=True)
        return y, st.scan, st.conv

    torch._dynamo.reset()
    outs_c = torch.compile(f, fullgraph=True, backend="aot_eager")(x, s0, c0)
    outs_e = f(x, s0, c0)
    inputs = [x, s0, c0] + list(m.parameters())
    for n, a, b in zip(["y", "scan", "conv"], outs_c, outs_e):
        assert_close(f"compiled {n}", a, b, 1e-6)
    for i, (a, b) in enumerate(zip(cotangent_grads(outs_c, inputs), cotangent_grads(outs_e, inputs))):
        assert_close(f"compiled grad {i}", a, b, 1e-6)


def test_compile_fullgraph_reference_backend():
    """Dynamo must trace forward + backward of the module without a graph break."""
    m = _module(D=8, R=3, K=4, dtype=torch.float32, backend="naive")
    _compile_check(m, *_inputs(2, 19, m, dtype=torch.float32))


def test_compile_fullgraph_chunked_backend():
    m = _module(D=8, R=3, K=4, dtype=torch.float32, backend="chunked")
    _compile_check(m, *_inputs(2, 19, m, dtype=torch.float32))


def test_bad_arguments():
    with pytest.raises(ValueError, match="gamma_min"):
        KOperator(8, gamma_min=0.0)
    with pytest.raises(ValueError, match="gamma_min"):
        KOperator(8, gamma_min=0.5, gamma_max=0.4)
    with pytest.raises(ValueError, match="alpha_cap"):
        KOperator(8, alpha_cap=-1.0)
    with pytest.raises(ValueError, match="d_model"):
        KOperator(0)
    with pytest.raises(ValueError, match="rank"):
        KOperator(8, rank=0)
    with pytest.raises(ValueError, match="backend"):
        KOperator(8, backend="cuda")
    with pytest.raises(TypeError, match="shared_kernel"):
        KOperator(8, shared_kernel=torch.ones(2, 2))
    m = KOperator(8, rank=2, kernel_size=3)
    with pytest.raises(ValueError, match=r"x must have shape \(B, T, D=8\)"):
        m(torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match=r"x_t must have shape"):
        m.step(torch.randn(2, 1, 8), None)
    with pytest.raises(ValueError, match="state must hold"):
        m.step(torch.randn(2, 8), (torch.zeros(2, 2, 8), torch.zeros(2, 3, 8)))
    with pytest.raises(ValueError, match="initial_state"):
        m(torch.randn(2, 5, 8), state=(torch.zeros(3, 2, 8), None))


# --------------------------------------------------------------------------------------
# DDP (one process, gloo): the module works under DistributedDataParallel with a shared kernel
# --------------------------------------------------------------------------------------


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_single_process_matches_plain():
    import torch.distributed as dist
    from kop_triton import KStackConfig, KStackLM

    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    torch.manual_seed(0)
    model = KStackLM(KStackConfig(vocab_size=11, d_model=8, n_k2=2, rank=2, kernel_size=3, backend="chunked"))
    ref = KStackLM(model.config)
    ref.load_state_dict(model.state_dict())
    ids = torch.randint(0, 11, (2, 12))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(_free_port())
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        ddp(ids[:, :-1], ids[:, 1:]).backward()
    finally:
        dist.destroy_process_group()
    ref(ids[:, :-1], ids[:, 1:]).backward()
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert_close(f"ddp grad {n}", p.grad, q.grad, 1e-6)


# --------------------------------------------------------------------------------------
# Triton path (fused kernel of H2 through the torch.library op; interpreter on CPU)
# --------------------------------------------------------------------------------------


def triton_k2_missing():
    """None when the fused Triton K2 mixer runs here, else the reason it cannot be tested."""
    from helpers import NEEDS_TRITON, TRITON_OK
    if not TRITON_OK:
        return NEEDS_TRITON
    from kop_triton import k2_mixer
    x = torch.randn(1, 2, 4)
    try:
        k2_mixer(x, torch.randn(4, 2), torch.randn(4, 2), torch.ones(2), torch.full((2,), 0.5),
                 torch.ones(2), torch.zeros(()), backend="triton")
    except NotImplementedError as e:
        return f"the fused Triton K2 mixer is not implemented yet ({e})"
    return None


needs_triton_k2 = pytest.mark.skipif(triton_k2_missing() is not None, reason=str(triton_k2_missing()))


@needs_triton_k2
@pytest.mark.parametrize("T", [1, 19, 70])
def test_triton_module_matches_chunked_every_gradient(T):
    from helpers import DEVICE
    m = _module(D=12, R=3, K=4, dtype=torch.float32, backend="triton").to(DEVICE)
    ref = _module(D=12, R=3, K=4, dtype=torch.float64, backend="chunked")
    ref.load_state_dict({k: v.double().cpu() for k, v in m.state_dict().items()})
    # gamma enters as a leaf (float64 values, rounded once to float32 for the kernel), so the
    # comparison is dgamma itself: d decay_logit adds only the float32 sigmoid derivative, whose
    # rounding near gamma ~ 1 would dominate on any backend
    g64 = torch.tensor([0.05, 0.6, 0.999], dtype=torch.float64)
    g32 = g64.float().to(DEVICE).requires_grad_()
    g64 = g32.detach().double().cpu().requires_grad_()
    m.gamma, ref.gamma = (lambda: g32), (lambda: g64)
    x, s0, c0 = _inputs(2, T, m, dtype=torch.float32)
    x, s0, c0 = (t.detach().to(DEVICE).requires_grad_() for t in (x, s0, c0))
    xr, s0r, c0r = (t.detach().double().cpu().requires_grad_() for t in (x, s0, c0))
    y, st = m(x, state=(s0, c0), return_state=True)
    yr, str_ = ref(xr, state=(s0r, c0r), return_state=True)
    tol = TOL[("triton", torch.float32)]
    assert_close("y", y, yr, tol)
    assert_close("scan", st.scan, str_.scan, tol)
    assert_close("conv", st.conv, str_.conv, tol)
    params = [(n, p) for n, p in m.named_parameters() if n != "decay_logit"]
    ref_params = [p for n, p in ref.named_parameters() if n != "decay_logit"]
    names = ["x", "s0", "c0", "gamma"] + [n for n, _ in params]
    got = cotangent_grads([y, st.scan, st.conv], [x, s0, c0, g32] + [p for _, p in params])
    exp = cotangent_grads([yr, str_.scan, str_.conv], [xr, s0r, c0r, g64] + ref_params)
    for n, a, b in zip(names, got, exp):
        assert_close(f"d{n}", a, b, tol)


@needs_triton_k2
def test_triton_custom_op_compiles_fullgraph():
    from helpers import DEVICE
    m = _module(D=8, R=2, K=3, dtype=torch.float32, backend="triton").to(DEVICE)
    x, s0, c0 = (t.detach().to(DEVICE).requires_grad_() for t in _inputs(1, 9, m, dtype=torch.float32))
    _compile_check(m, x, s0, c0)


# --------------------------------------------------------------------------------------
# modules.py building blocks: the hand-written RMSNorm and the CPU dropout
# --------------------------------------------------------------------------------------


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
