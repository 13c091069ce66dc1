"""No host-device synchronisation in the hot path: KOperator, k2_mixer, decayed_scan and
causal_conv forward + backward, and a KStackLM training step, read no tensor data on the host
(without cu_seqlens).  Counted on CPU tensors, which run the same Python code as CUDA ones: every
``.item()``, ``float(t)``, ``int(t)``, ``bool(t)``, ``.tolist()``, ``.cpu()``, ``.numpy()`` made by
kop_triton code.  The Triton path is counted with its launches recorded instead of run
(``kop_triton.kernels.launch.recording``), so what is counted is exactly the launchers' host code.
With cu_seqlens every op reads it once, in its argument check (tests/test_seqs.py)."""
import traceback

import pytest
import torch

from helpers import NEEDS_TRITON, TRITON_OK
from kop_triton import KOperator, KStackConfig, KStackLM, causal_conv, decayed_scan, k2_mixer

HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")


class HostReads:
    """Records every host read of tensor data whose caller is kop_triton code, forward and backward:
    the torch.Tensor methods are patched while it is entered (a TorchFunctionMode would not see the
    autograd backward, which runs outside the mode)."""

    def __init__(self):
        self.hits = []
        self._saved = {}

    def _wrap(self, name, real):
        hits = self.hits

        def read(t, *args, **kwargs):
            caller = traceback.extract_stack(limit=2)[0]                 # the frame that called it
            if "kop_triton" in caller.filename or "/kernels/" in caller.filename:
                hits.append(f"{name} at {caller.filename}:{caller.lineno}")
            return real(t, *args, **kwargs)
        return read

    def __enter__(self):
        for name in HOST_READS:
            self._saved[name] = real = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._wrap(name, real))
        return self

    def __exit__(self, *exc):
        for name, real in self._saved.items():
            setattr(torch.Tensor, name, real)
        return False


def test_the_counter_sees_host_reads():
    x = torch.randn(3)
    with HostReads() as c:
        _ = x.sum().item(), float(x[0]), bool(x[1] > 0), x.tolist(), int(x[2]), x.cpu()
    assert c.hits == [], "reads from test code are not kop_triton's"   # caller filter
    from kop_triton.ops import _checks
    with HostReads() as c:                       # a kop_triton function that does read the host
        _checks.check_cu_seqlens(torch.tensor([0, 2, 5]), 1, 5, torch.device("cpu"))
    assert any(h.startswith("tolist") for h in c.hits), c.hits
    ns = {}                                      # ... and in an autograd backward (a function whose code
    exec(compile("def read(t):\n    return t.tolist()", "/x/kop_triton/fake.py", "exec"), ns)  # is "kop_triton's")

    class ReadsInBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t * 2

        @staticmethod
        def backward(ctx, g):
            ns["read"](g)
            return g * 2

    with HostReads() as c:
        ReadsInBackward.apply(torch.randn(3, requires_grad=True)).sum().backward()
    assert [h.split(" at ")[0] for h in c.hits] == ["tolist"], c.hits


def _kop_fwd_bwd(backend):
    torch.manual_seed(0)
    m = KOperator(24, rank=4, kernel_size=4, backend=backend)
    x = torch.randn(2, 70, 24, requires_grad=True)
    s0 = m.zero_state(2)
    with HostReads() as c:
        y, st = m(x, state=s0, return_state=True)
        (y.sum() + st.scan.sum() + st.conv.sum()).backward()
    return c.hits


def test_koperator_chunked_no_host_reads():
    assert _kop_fwd_bwd("chunked") == []


@pytest.mark.skipif(not TRITON_OK, reason=NEEDS_TRITON)
def test_koperator_triton_launchers_no_host_reads():
    from kop_triton.kernels.launch import recording
    with recording() as rec:
        hits = _kop_fwd_bwd("triton")
    assert rec.launches, "the Triton path launched nothing"
    assert hits == []


@pytest.mark.parametrize("backend", ["chunked", "naive", "triton"])
def test_ops_no_host_reads(backend):
    if backend == "triton" and not TRITON_OK:
        pytest.skip(NEEDS_TRITON)
    from kop_triton.kernels.launch import recording
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 40, 8, generator=g, requires_grad=True)
    q = torch.randn(2, 40, 3, generator=g, requires_grad=True)
    gamma = torch.tensor([0.5, 0.9, 1.0], requires_grad=True)
    w = torch.randn(5, generator=g, requires_grad=True)
    u = torch.randn(8, 3, generator=g, requires_grad=True)
    alpha = torch.ones(3, requires_grad=True)
    gl = torch.tensor(0.1, requires_grad=True)
    cbk = "naive" if backend == "chunked" else backend
    with recording() if backend == "triton" else torch.enable_grad():
        with HostReads() as c:
            o, s = decayed_scan(q, q, x, gamma, output_final_state=True, backend=backend)
            y, cs = causal_conv(x, w, output_final_state=True, backend=cbk)
            z, (s2, c2) = k2_mixer(x, u, u, alpha, gamma, w, gl, output_final_state=True, backend=backend)
            (o.sum() + s.sum() + y.sum() + cs.sum() + z.sum() + s2.sum() + c2.sum()).backward()
    assert c.hits == []


def test_kstack_training_step_no_host_reads():
    torch.manual_seed(0)
    model = KStackLM(KStackConfig(vocab_size=20, d_model=16, n_k2=2, rank=4, kernel_size=4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 20, (2, 41))
    with HostReads() as c:
        loss = model(ids[:, :-1], ids[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert c.hits == []


def test_bad_gamma_still_caught():
    q = torch.randn(1, 6, 2)
    v = torch.randn(1, 6, 3)
    for bad in ([0.5, 1.5], [0.0, 0.5], [float("nan"), 0.5]):
        with pytest.raises(ValueError, match=r"gamma must lie in \(0, 1\]"):
            decayed_scan(q, q, v, torch.tensor(bad))


def test_bad_gamma_caught_under_compile():
    q = torch.randn(1, 8, 2)
    v = torch.randn(1, 8, 4)
    f = torch.compile(lambda g: decayed_scan(q, q, v, g, backend="chunked")[0], backend="aot_eager",
                      fullgraph=True)
    assert f(torch.tensor([0.5, 0.9])).shape == (1, 8, 4)
    with pytest.raises(RuntimeError, match=r"gamma must lie in \(0, 1\]"):
        f(torch.tensor([0.5, 1.5]))
