import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402  (torch does not import triton)

# Triton kernels run through the interpreter on machines where torch has no CUDA device; this
# must be set before triton is imported anywhere.  An explicit TRITON_INTERPRET wins:
# TRITON_INTERPRET=0 on a machine without CUDA runs the suite as on a GPU machine whose kernels
# cannot run here (the Triton tests skip as CUDA-only; `make test` runs that mode too).
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# One intra-op thread per test process: pytest-xdist already runs one process per core, and
# oversubscribed OpenMP threads stall tiny ops by orders of magnitude on a 2-core machine.
torch.set_num_threads(1)

import pytest  # noqa: E402

import grid_order  # noqa: E402

# The race check (tests/grid_order.py): KOP_GRID_ORDER=reverse | shuffle:SEED runs every Triton
# grid of the interpreter in that program order.
GRID_ORDER = os.environ.get("KOP_GRID_ORDER")
if GRID_ORDER:
    grid_order.parse(GRID_ORDER)                 # a bad value stops the run here, with the choices
    grid_order.install()                         # and a Triton it does not fit, loudly
    grid_order.set_order(GRID_ORDER)


def pytest_addoption(parser):
    group = parser.getgroup("kop-triton")
    group.addoption("--race-coverage", action="store_true",
                    help="after a KOP_GRID_ORDER run, fail unless it launched every kernel with every value of "
                         "each flag that the compile gate's CI workload launches")
    group.addoption("--only-cuda-skips", action="store_true",
                    help="fail any test skipped for a reason that does not mention CUDA (the GPU-machine mode "
                         "of `make test`: TRITON_INTERPRET=0 on a machine without CUDA)")


def pytest_report_header(config):
    mode = os.environ.get("TRITON_INTERPRET")
    lines = [f"kop-triton: TRITON_INTERPRET={mode!r}, torch CUDA available: {torch.cuda.is_available()}"]
    if GRID_ORDER:
        lines.append(f"kop-triton: race check, every Triton grid in program order {GRID_ORDER!r}")
    return lines


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.skipped and item.config.getoption("--only-cuda-skips"):
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        if "CUDA" not in reason:
            rep.outcome = "failed"
            rep.longrepr = (f"--only-cuda-skips: skipped for a reason that is not CUDA: {reason!r}; "
                            f"in this mode only CUDA-only tests may skip")


# ---- the race run's coverage: workers report what they launched, the controller checks ----

def pytest_sessionfinish(session, exitstatus):
    config = session.config
    if not (GRID_ORDER and config.getoption("--race-coverage")):
        return
    if hasattr(config, "workerinput"):                       # an xdist worker: hand the launches over
        config.workeroutput["kop_launches"] = json.dumps(grid_order.launches_seen())
        return
    seen = _merge(getattr(config, "_kop_worker_launches", []) + [grid_order.launches_seen()])
    missing = grid_order.missing_launches(grid_order.expected_launches(), seen)
    tr = config.pluginmanager.get_plugin("terminalreporter")
    tr.write_line("")
    if missing:
        tr.write_line(f"race check ({GRID_ORDER}): the selected tests never launched {len(missing)} kernel/flag "
                      f"combinations of the compile gate's CI workload: {', '.join(missing)}", red=True)
        session.exitstatus = 1
    else:
        n = sum(len(v) for v in seen.values())
        tr.write_line(f"race check ({GRID_ORDER}): {len(seen)} kernels launched, {n} flags, every kernel and flag "
                      f"value of the compile gate's CI workload reached", green=True)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):                         # xdist controller, per finished worker
    out = getattr(node, "workeroutput", {}) or {}
    if "kop_launches" in out:
        lst = getattr(node.config, "_kop_worker_launches", [])
        lst.append(json.loads(out["kop_launches"]))
        node.config._kop_worker_launches = lst


def _merge(parts):
    seen = {}
    for part in parts:
        for kernel, flags in part.items():
            dst = seen.setdefault(kernel, {})
            for flag, values in flags.items():
                dst.setdefault(flag, set()).update(values)
    return seen


@pytest.fixture
def nan_empty(monkeypatch):
    """torch.empty / torch.empty_like return NaN-filled floating tensors, so an output element a
    kernel launcher allocates but never writes is caught by the comparison."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def nan_filled(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: nan_filled(real_empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: nan_filled(real_empty_like(*a, **kw)))
