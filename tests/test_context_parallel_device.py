"""Context parallelism on one device, the check ``benchmarks/device_check.sh`` runs on a lent GPU:
a world of one over NCCL (process group in-process, file store) with CUDA tensors and the Triton
backend; here on the CPU the same check over gloo with the chunked backend.

A world of one is the plain call: the context-parallel KOperator, the LM training wrapper and the
evaluation wrapper must give the plain model's outputs and gradients bit for bit (the Triton
kernels are deterministic), for both exchanges; and the state exchange's collectives (all-gather,
all-to-all of the gradients, all-reduce) must run on the device's backend and return what a world
of one holds.  The multi-rank exactness is tests/test_context_parallel.py (gloo, 2 and 3 ranks).
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from helpers import TRITON_OK

CUDA = torch.cuda.is_available()

DEVICES = [
    pytest.param("cpu", id="gloo_cpu"),
    pytest.param("cuda", id="nccl_cuda", marks=pytest.mark.skipif(not (CUDA and TRITON_OK),
                                                                   reason="needs a CUDA device and Triton")),
]


@pytest.fixture
def world_of_one(request, tmp_path):
    device = request.param
    assert not dist.is_initialized()
    store = dist.FileStore(str(tmp_path / "store"), 1)
    if device == "cuda":
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", store=store, rank=0, world_size=1)
    try:
        yield torch.device(device, 0) if device == "cuda" else torch.device("cpu")
    finally:
        dist.destroy_process_group()


def _grads(mod):
    return {n: p.grad.clone() for n, p in mod.named_parameters() if p.grad is not None}


def _same(a: dict, b: dict, what: str):
    assert a.keys() == b.keys() and a, (what, sorted(a), sorted(b))
    for k in a:
        assert torch.equal(a[k], b[k]), (what, k, float((a[k] - b[k]).abs().max()))


@pytest.mark.parametrize("world_of_one", DEVICES, indirect=True)
@pytest.mark.parametrize("exchange", ["allgather", "pipeline"])
def test_cp_world_of_one_is_the_plain_call(world_of_one, exchange):
    from kop_triton.context_parallel import (ContextParallel, ContextParallelEval, ContextParallelLM,
                                             context_parallel)
    from kop_triton.model import KStackConfig, KStackLM
    from kop_triton.modules import KOperator
    dev = world_of_one
    backend = "triton" if dev.type == "cuda" else "chunked"
    torch.manual_seed(0)
    cp = ContextParallel(exchange=exchange)
    assert cp.world == 1 and cp.rank == 0

    # KOperator: plain rows, packed documents (one row), an initial state
    mod = KOperator(64, rank=8, kernel_size=4, backend=backend).to(dev)
    with torch.no_grad():
        mod.gate_logit.fill_(0.3)
    cases = [dict(x=torch.randn(2, 300, 64, device=dev)),
             dict(x=torch.randn(1, 300, 64, device=dev),
                  cu_seqlens=torch.tensor([0, 70, 200, 300], dtype=torch.int32, device=dev)),
             dict(x=torch.randn(2, 300, 64, device=dev),
                  state=(torch.randn(2, 8, 64, device=dev), torch.randn(2, 3, 64, device=dev)))]
    for i, case in enumerate(cases):
        w = torch.randn_like(case["x"])
        runs = []
        for use_cp in (False, True):
            mod.zero_grad(set_to_none=True)
            x = case["x"].clone().requires_grad_()
            kw = {k: v for k, v in case.items() if k != "x"}
            if use_cp:
                with context_parallel(mod, cp):
                    y = mod(x, **kw)
            else:
                y = mod(x, **kw)
            (y * w).sum().backward()
            runs.append(dict(out=y.detach(), dx=x.grad, **_grads(mod)))
        _same(runs[0], runs[1], f"KOperator case {i}")

    # the LM, its training wrapper (loss term x world = the loss) and the evaluation wrapper
    model = KStackLM(KStackConfig(vocab_size=50, d_model=32, n_k2=2, rank=4, kernel_size=4,
                                  backend=backend)).to(dev)
    ids = torch.randint(0, 50, (2, 96), device=dev)
    tgt = torch.randint(0, 50, (2, 96), device=dev)
    model.zero_grad(set_to_none=True)
    ref = model(ids, tgt)
    ref.backward()
    g_ref = _grads(model)
    model.zero_grad(set_to_none=True)
    got = ContextParallelLM(model, cp)(ids, tgt)
    got.backward()
    assert torch.equal(got.detach(), ref.detach())
    _same(g_ref, _grads(model), "KStackLM")
    ev = ContextParallelEval(model, cp)(ids, tgt)
    assert ev.dtype == torch.float64 and float(ev) == pytest.approx(float(ref.detach()), rel=1e-6)


@pytest.mark.parametrize("world_of_one", DEVICES, indirect=True)
def test_cp_collectives_on_the_device(world_of_one):
    """The exchange's collectives through the device's backend: the all-gather of the states (and
    its all-to-all backward), the gather of token ids, the evaluation's all-reduce."""
    from kop_triton.context_parallel import ContextParallel, _GatherStates
    dev = world_of_one
    t = torch.randn(37, device=dev, requires_grad=True)
    g = _GatherStates.apply(t, None)
    assert g.shape == (1, 37) and torch.equal(g[0], t.detach())
    w = torch.randn(1, 37, device=dev)
    (g * w).sum().backward()
    assert torch.equal(t.grad, w[0])
    cp = ContextParallel()
    ids = torch.randint(0, 9, (2, 11), device=dev)
    assert torch.equal(cp.gather(ids), ids) and cp._sizes_for(11, dev) == [11]
    s = torch.tensor([1.25], dtype=torch.float64, device=dev)
    dist.all_reduce(s)
    assert float(s) == 1.25
