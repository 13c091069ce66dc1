import os
import shutil
import sys

# Triton kernels run through the interpreter on machines without a GPU; this must be set
# before triton is imported anywhere.
if "TRITON_INTERPRET" not in os.environ and shutil.which("nvidia-smi") is None:
    os.environ["TRITON_INTERPRET"] = "1"

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

# One intra-op thread per test process: pytest-xdist already runs one process per core, and
# oversubscribed OpenMP threads stall tiny ops by orders of magnitude on a 2-core machine.
torch.set_num_threads(1)

import pytest  # noqa: E402


@pytest.fixture
def nan_empty(monkeypatch):
    """torch.empty / torch.empty_like return NaN-filled floating tensors, so an output element a
    kernel launcher allocates but never writes is caught by the comparison."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def nan_filled(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: nan_filled(real_empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: nan_filled(real_empty_like(*a, **kw)))
