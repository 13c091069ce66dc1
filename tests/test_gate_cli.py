"""The compile gate's command line and worker pool (``python -m kop_triton.kernels.report``): its
workers are spawned, never forked (with ``--device`` each loads binaries through the CUDA driver,
which a child forked from a parent that touched CUDA cannot initialise), and a kernel filter or
target list that selects nothing is a usage error, not an empty "0 pass, 0 fail" report.  The
gate compiles, so it runs in child processes without TRITON_INTERPRET."""
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
PROG = "python -m kop_triton.kernels.report"


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = HERE + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _report(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "kop_triton.kernels.report", *args], env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def test_gate_workers_are_spawned_not_forked():
    """run_gate with jobs > 1 (and --device's on_device) hands its compiles to a pool whose
    processes are spawned: the pool is recorded instead of run (a fake executor)."""
    code = r"""
import json
import kop_triton.gate as G
import kop_triton.kernels.report as R
seen = {}
class FakePool:
    def __init__(self, *args, **kwargs):
        seen["args"], seen["ctx"] = args, kwargs.get("mp_context")
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        return False
    def map(self, fn, work):
        work = list(work)
        seen["jobs"] = len(work)
        return [{"error": "not compiled (recorded by the test)"} for _ in work]
R.ProcessPoolExecutor = FakePool
rows = G.run_gate([G.Case("conv", "fp32", 2, 4096, 24, K=8)], ["sm_90"], jobs=2, on_device=True)
ctx = seen.get("ctx")
print(json.dumps({"method": ctx.get_start_method() if ctx is not None else None, "jobs": seen.get("jobs"),
                  "rows": len(rows), "kernels": sorted({r["kernel"] for r in rows})}))
"""
    out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["method"] == "spawn", got
    assert got["jobs"] == got["rows"] >= 3, got          # forward, dx and dw kernels of the conv
    assert {"_conv_fwd_kernel", "_conv_bwd_dx_kernel", "_conv_bwd_dw_kernel"} <= set(got["kernels"]), got


def _one_line_usage_error(proc, flag):
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"{PROG}: error: {flag}"), lines[0]
    assert "gate:" not in proc.stdout, proc.stdout
    return lines[0]


def test_empty_targets_and_unknown_kernel_are_usage_errors():
    line = _one_line_usage_error(_report("--set", "ci", "--targets", ""), "--targets")
    assert "sm_90" in line                                  # says what to give
    _one_line_usage_error(_report("--set", "ci", "--targets", " , "), "--targets")
    _one_line_usage_error(_report("--set", "ci", "--kernel", ",", "--targets", "sm_90"), "--kernel")
    line = _one_line_usage_error(_report("--set", "ci", "--targets", "sm_90", "--kernel",
                                         "_state_pass_kernel,nonexistent_kernel"), "--kernel")
    named, listed = line.split("matches no kernel")
    assert "'nonexistent_kernel'" in named and "_state_pass_kernel" not in named, line   # only the bad part
    assert "_k2_qk_kernel" in line                           # lists the kernels there are
