"""The kernels' flat grids (``kop_triton.kernels.launch.grid_of``): past CUDA's 65,535 programs on
grid axis y or z (a sequence of over 4M tokens, more than 65,535 batch rows, ...) a launch runs with
its whole grid on axis x and the kernel decodes its indices (FLAT).  Those sizes cannot run on a CPU,
so ``launch.FORCE_FLAT`` puts every launch on its flat grid at small sizes: scan, conv and the fused
K2 mixer, forward and every gradient, plain batches and packed sequences, against the float64
references -- the same checks as their natural grids."""
import pytest
import torch

from helpers import DEVICE, NEEDS_TRITON, TRITON_OK, assert_close, cotangent_grads, make_gamma
from kop_triton import causal_conv, decayed_scan, k2_mixer
from kop_triton.kernels import launch as launch_mod

pytestmark = pytest.mark.skipif(not TRITON_OK, reason=NEEDS_TRITON)
# ``race``: in the race check's curated set (tests/grid_order.py): the flat grids' index decoding,
# every kernel with FLAT set, under reversed and shuffled program orders
RACE = pytest.mark.race


@pytest.fixture
def flat(monkeypatch):
    """Every launch on its flat grid; the launches seen, to check they were all flat."""
    seen = []
    real = launch_mod.launch

    def spy(kernel, grid, **kw):
        seen.append((kernel.__name__ if hasattr(kernel, "__name__") else str(kernel), tuple(grid),
                     kw.get("FLAT")))
        return real(kernel, grid, **kw)

    monkeypatch.setattr(launch_mod, "FORCE_FLAT", True)
    for mod in ("scan", "conv", "k2"):
        m = __import__(f"kop_triton.kernels.{mod}", fromlist=["launch"])
        monkeypatch.setattr(m, "launch", spy)
    return seen


def _assert_all_flat(seen, names):
    assert {n for n, _, _ in seen} >= set(names), sorted({n for n, _, _ in seen})
    for n, grid, fl in seen:
        if n not in ("_k2_qk_kernel", "_k2_dp_kernel"):       # one-dimensional already
            assert fl is True and len(grid) == 1, (n, grid, fl)


def _cu(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)


@RACE
@pytest.mark.parametrize("levels", [False, True], ids=["one-level", "grouped-pass"])
@pytest.mark.parametrize("varlen", [False, True])
def test_scan_on_flat_grids(flat, varlen, levels):
    """grouped-pass: the state pass over groups of 2 chunks (kernels/scan.py pass_group, forced),
    its three launches on flat grids too."""
    import dataclasses
    from kop_triton.kernels.settings import SCAN
    settings = dataclasses.replace(SCAN, pass_group=2 if levels else 0)
    g = torch.Generator().manual_seed(0)
    B, T, R, D = (1, 150, 4, 40) if varlen else (2, 130, 4, 40)
    cu = _cu([70, 1, 79]) if varlen else None
    N = 3 if varlen else B
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    q, k, v, h0 = mk(B, T, R) * 0.5, mk(B, T, R) * 0.5, mk(B, T, D), mk(N, R, D)
    gamma = make_gamma(R, 0.5, 1.0)
    leaves64 = [t.clone().requires_grad_() for t in (q, k, v, gamma, h0)]
    leaves = [t.to(DEVICE, torch.float32).requires_grad_() for t in (q, k, v, gamma, h0)]
    ref = decayed_scan(*leaves64[:4], initial_state=leaves64[4], output_final_state=True,
                       cu_seqlens=None if cu is None else cu.cpu(), backend="naive")
    out = decayed_scan(*leaves[:4], initial_state=leaves[4], output_final_state=True, cu_seqlens=cu,
                       backend="triton", settings=settings)
    for name, a, e in zip(("o", "final", "dq", "dk", "dv", "dgamma", "dh0"),
                          list(out) + list(cotangent_grads(list(out), leaves, 1)),
                          list(ref) + list(cotangent_grads(list(ref), leaves64, 1))):
        assert_close(name, a.detach().cpu().double(), e.detach(), 1e-5)
    _assert_all_flat(flat, ["_intra_A_kernel", "_chunk_state_kernel", "_state_pass_kernel",
                            "_chunk_out_kernel", "_bwd_dqk_kernel"]
                     + (["_group_sum_kernel", "_group_apply_kernel"] if levels else []))


@RACE
@pytest.mark.parametrize("varlen", [False, True])
@pytest.mark.parametrize("K,per_channel", [(4, True), (70, False)])
def test_conv_on_flat_grids(flat, varlen, K, per_channel):
    g = torch.Generator().manual_seed(1)
    B, T, D = (1, 150, 40) if varlen else (2, 100, 40)
    cu = _cu([70, 1, 79]) if varlen else None
    N = 3 if varlen else B
    x = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    w = torch.randn(*((D, K) if per_channel else (K,)), generator=g, dtype=torch.float64) / K ** 0.5
    h0 = torch.randn(N, K - 1, D, generator=g, dtype=torch.float64)
    leaves64 = [t.clone().requires_grad_() for t in (x, w, h0)]
    leaves = [t.to(DEVICE, torch.float32).requires_grad_() for t in (x, w, h0)]
    ref = causal_conv(leaves64[0], leaves64[1], initial_state=leaves64[2], output_final_state=True,
                      cu_seqlens=None if cu is None else cu.cpu(), backend="naive")
    out = causal_conv(leaves[0], leaves[1], initial_state=leaves[2], output_final_state=True,
                      cu_seqlens=cu, backend="triton")
    for name, a, e in zip(("y", "final", "dx", "dw", "dh0"),
                          list(out) + list(cotangent_grads(list(out), leaves, 1)),
                          list(ref) + list(cotangent_grads(list(ref), leaves64, 1))):
        assert_close(name, a.detach().cpu().double(), e.detach(), 1e-5)
    _assert_all_flat(flat, ["_conv_fwd_kernel", "_conv_bwd_dx_kernel", "_conv_bwd_dw_kernel"])


@pytest.mark.parametrize("dtype,varlen,fold", [
    pytest.param(torch.float32, False, False, marks=RACE), (torch.float32, True, False), (torch.bfloat16, False, False),
    pytest.param(torch.bfloat16, True, False, marks=RACE), pytest.param(torch.float32, False, True, marks=RACE),
    pytest.param(torch.bfloat16, True, True, marks=RACE)],
    ids=["fp32-batch", "fp32-varlen", "bf16-batch", "bf16-varlen", "fp32-batch-folded", "bf16-varlen-folded"])
def test_k2_on_flat_grids(flat, varlen, dtype, fold):
    """The fused K2 mixer, fp32 (weight gradients in their own passes: conv_bwd_dw's flat grid too)
    and bf16 (summed inside _k2_dx_kernel); folded: the forward's projection and chunk-state pass in
    one launch (kernels/k2.py fold_qk, forced)."""
    import dataclasses
    from kop_triton.kernels.settings import K2
    st = dataclasses.replace(K2, fold_qk=fold)
    g = torch.Generator().manual_seed(2)
    B, T, D, R, K = (1, 150, 40, 4, 4) if varlen else (2, 130, 40, 4, 4)
    cu = _cu([70, 1, 79]) if varlen else None
    N = 3 if varlen else B
    f = torch.float64
    x = torch.randn(B, T, D, generator=g, dtype=f)
    u, v = torch.randn(D, R, generator=g, dtype=f) / D ** 0.5, torch.randn(D, R, generator=g, dtype=f) / D ** 0.5
    alpha, gamma = torch.rand(R, generator=g, dtype=f) * 0.8 + 0.2, make_gamma(R, 0.5, 1.0)
    w, gl = torch.randn(K, generator=g, dtype=f) / K ** 0.5, torch.tensor(0.4, dtype=f)
    s0, c0 = torch.randn(N, R, D, generator=g, dtype=f), torch.randn(N, K - 1, D, generator=g, dtype=f)
    base = (x, u, v, alpha, gamma, w, gl, s0, c0)
    leaves64 = [t.clone().requires_grad_() for t in base]
    leaves = [t.to(DEVICE, dtype if i == 0 else torch.float32).requires_grad_() for i, t in enumerate(base)]

    def call(ls, backend, cu_):
        y, (s1, c1) = k2_mixer(*ls[:7], initial_state=(ls[7], ls[8]), output_final_state=True,
                               cu_seqlens=cu_, backend=backend, **({"settings": st} if backend == "triton" else {}))
        return [y, s1, c1]

    ref = call(leaves64, "naive", None if cu is None else cu.cpu())
    out = call(leaves, "triton", cu)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    names = ("y", "scan_final", "conv_final", "dx", "du", "dv", "dalpha", "dgamma", "dkernel", "dgate_logit",
             "dscan_state", "dconv_state")
    for name, a, e in zip(names, out + list(cotangent_grads(out, leaves, 1)),
                          ref + list(cotangent_grads(ref, leaves64, 1))):
        assert_close(name, a.detach().cpu().double(), e.detach(), tol)
    kernels = (["_k2_qk_state_kernel"] if fold else ["_k2_qk_kernel"]) + [
        "_chunk_state_kernel", "_state_pass_kernel", "_k2_out_kernel", "_bwd_dqk_kernel", "_k2_dp_kernel",
        "_k2_dx_kernel"]
    _assert_all_flat(flat, kernels + (["_conv_bwd_dw_kernel"] if dtype == torch.float32 else []))


def test_natural_grid_below_the_limits_flat_above():
    """grid_of keeps the natural grid while y and z fit CUDA's 65,535, and flattens past it."""
    from kop_triton.kernels.launch import grid_of
    assert grid_of((16, 65535, 3)) == ((16, 65535, 3), False)
    assert grid_of((16, 65536, 3)) == ((16 * 65536 * 3,), True)
    assert grid_of((4, 70000), (70000, 4)) == ((280000,), True)
