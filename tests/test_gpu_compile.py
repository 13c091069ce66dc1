"""The offline compile gate (``kop_triton.kernels.report``): every Triton specialisation the ops
launch compiles for sm_80 / sm_90 / sm_100 with Triton's real compiler, with zero register
spills, shared memory within the target's limit, tensor cores for 16-bit dots and no TF32 --
checked on this machine, which has no GPU.  The compiler must run without the interpreter, so
every compile happens in a child process without TRITON_INTERPRET.

The CI workload (``--set ci``) covers every kernel, every dtype, every flag and the largest
tiles the launchers pick; ``--set full`` (the committed report, benchmarks/results/kernels-*.md)
adds the rest of the R / D / K grid.  Two Triton versions are gated: the pinned one (this
process's, the lent GPU machine's 3.6) on ``ci``, and the newest release (3.9, its own venv made
by ``make test``) on ``--set newest``; kernels/settings.py holds the launch settings that differ
between them."""
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = HERE + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _child(code: str, timeout: int = 600) -> dict:
    """Run ``code`` in a fresh interpreter-free process; it prints one JSON object last."""
    out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------
# the gate's parts, on known inputs
# --------------------------------------------------------------------------------------

def test_parse_ptxas_log():
    from kop_triton.kernels.report import parse_ptxas
    log = ("ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
           "ptxas info    : Function properties for k\n"
           "    0 bytes stack frame, 424 bytes spill stores, 412 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 16384 bytes smem, 400 bytes cmem[0]\n")
    assert parse_ptxas(log) == {"registers": 255, "spill_stores": 424, "spill_loads": 412, "ptxas_smem": 16384}
    with pytest.raises(ValueError, match="no register report"):
        parse_ptxas("garbage")


def test_mma_and_tf32_detection():
    from kop_triton.kernels.report import count_mma, dots_16bit
    ptx = ("\tmma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1}, {%r1}, {%r2}, {%f1};\n"
           "\twgmma.mma_async.sync.aligned.m64n64k8.f32.tf32.tf32 {%f2}, %rd1, %rd2, 1, 1, 1;\n"
           "\tfma.rn.f32 %f3, %f4, %f5, %f3;\n")
    assert count_mma(ptx) == {"mma": 2, "tf32_mma": 1}
    assert dots_16bit("%5 = tt.dot %3, %4, %cst : tensor<16x16xbf16> * tensor<16x64xbf16> -> tensor<16x64xf32>")
    assert not dots_16bit("%5 = tt.dot %3, %4, %cst, inputPrecision = ieee : tensor<16x16xf32> * "
                          "tensor<16x64xf32> -> tensor<16x64xf32>")


def test_gate_verdicts_on_known_kernels():
    """The gate fails what it must: a compile error, spills, TF32; passes a bf16 MMA dot."""
    rows = _child("""
import json, torch
from kop_triton.kernels.report import Ptr, compile_one, problems
P = Ptr(torch.float32)
dot = dict(a=P, b=P, c=P, M=64, K=128, N=64)
rows = {
    "float": compile_one("gate_kernels:uses_python_float", dict(x=P, N=16), 90),
    "fp32": compile_one("gate_kernels:big_fp32_dot", dict(dot, BF16=False), 90),
    "bf16": compile_one("gate_kernels:big_fp32_dot", dict(dot, M=64, K=64, BF16=True), 90),
    "tf32": compile_one("gate_kernels:tf32_dot", dict(dot, K=32), 90),
}
print(json.dumps({k: dict(r, problems=problems(r, 90)) for k, r in rows.items()}))
""")
    assert rows["float"]["problems"] == ["does not compile"]
    assert "global variable" in rows["float"]["error"]
    assert rows["fp32"]["spill_stores"] > 0 and any("spills" in p for p in rows["fp32"]["problems"])
    assert rows["bf16"]["mma"] > 0 and rows["bf16"]["dots_16bit"] and rows["bf16"]["problems"] == []
    assert rows["tf32"]["tf32_mma"] > 0 and any("TF32" in p for p in rows["tf32"]["problems"])


def test_workload_records_every_kernel_without_running_it():
    """The workload drives the ops' Triton paths on meta tensors (T = 1M, D = 8192 cost nothing)
    and records every launch; each kernel of kernels/ appears, forward and backward."""
    got = _child("""
import json, math
from kop_triton.gate import Case, run_case, workload
names = sorted({ln.name for c in workload("ci") for ln in run_case(c)})
big = run_case(Case("k2", "bf16", 1, 1 << 20, 8192, R=16, K=8, states=True))
print(json.dumps({"names": names, "big": sorted({ln.name for ln in big}),
                  "grid": max(math.prod(ln.grid) for ln in big if ln.name == "_k2_out_kernel")}))
""")
    assert got["names"] == sorted(["_intra_A_kernel", "_chunk_state_kernel", "_state_pass_kernel",
                                   "_group_sum_kernel", "_group_apply_kernel", "_chunk_out_kernel", "_bwd_dqk_kernel", "_conv_fwd_kernel",
                                   "_conv_bwd_dx_kernel", "_conv_bwd_dw_kernel", "_k2_qk_kernel",
                                   "_k2_qk_state_kernel", "_k2_out_kernel", "_k2_dp_kernel", "_k2_dx_kernel"])
    # 16K chunks at R = 16: the projection folded into the chunk-state pass (kernels/k2.py fold_qk)
    assert {"_k2_qk_state_kernel", "_k2_out_kernel", "_bwd_dqk_kernel", "_k2_dx_kernel"} <= set(got["big"])
    assert got["grid"] == (8192 // 64) * (1 << 20) // 64   # one program per channel block and 64-token chunk


def test_check_grid_holds_cuda_limits():
    """A grid over CUDA's limits (axis x < 2^31, y and z <= 65,535) is refused with the kernel and
    the grid named, before anything runs or is recorded."""
    from kop_triton.kernels.launch import check_grid, launch, recording
    check_grid("k", (2 ** 31 - 1, 65535, 65535))
    for grid, axis in (((1, 65536), "y"), ((1, 1, 65536), "z"), ((2 ** 31,), "x")):
        with pytest.raises(ValueError, match=rf"my_kernel: grid .* on axis {axis}, over CUDA's limit"):
            check_grid("my_kernel", grid)
    with pytest.raises(ValueError, match="not a CUDA grid"):
        check_grid("k", (1, 2, 3, 4))

    class Kernel:
        __name__ = "_fake_kernel"
    with recording() as rec, pytest.raises(ValueError, match=r"_fake_kernel: grid \(4, 70000\)"):
        launch(Kernel(), (4, 70000))
    assert rec.launches == []


def test_every_op_launches_within_cuda_grid_limits():
    """The gate's limit sizes (one sequence of 16M and 64M tokens, 64M tokens packed, 100,000 packed
    sequences, B = 100,000, D = 8192), forward and backward, recorded on meta tensors: every launch
    is within CUDA's limits (``launch.check_grid`` raises otherwise).  Before ``launch.grid_of``
    (chunks on axis y, batch rows on z, always) the 16M-token, packed and B = 100,000 cases were
    over the y / z limit; now they run on flat grids, all on axis x."""
    got = _child("""
import json
from kop_triton.gate import check_limits
print(json.dumps(check_limits()))
""")
    assert not [r for r in got if r["error"]], [r for r in got if r["error"]]
    assert {r["op"] for r in got} == {"scan", "conv", "k2"}
    for op in ("scan", "conv", "k2"):
        rs = [r for r in got if r["op"] == op]
        assert max(r["T"] for r in rs) == 1 << 26 and max(r["B"] for r in rs) == 100_000
        assert max(r["N"] for r in rs) == 100_000 and max(r["D"] for r in rs) == 8192
        # a 64M-token sequence: over 2^20 programs, all on axis x (1M chunks of 64 tokens)
        big = [r for r in rs if r["T"] == 1 << 26]
        assert all(r["largest_grid"][0] > 1 << 20 and r["max_axis_yz"] <= 65535 for r in big), big


# --------------------------------------------------------------------------------------
# the gate itself
# --------------------------------------------------------------------------------------

KERNELS = {"_intra_A_kernel", "_chunk_state_kernel", "_state_pass_kernel", "_group_sum_kernel", "_group_apply_kernel",
           "_chunk_out_kernel", "_bwd_dqk_kernel",
           "_conv_fwd_kernel", "_conv_bwd_dx_kernel", "_conv_bwd_dw_kernel", "_k2_qk_kernel", "_k2_qk_state_kernel",
           "_k2_out_kernel", "_k2_dp_kernel", "_k2_dx_kernel"}


def _gate(python: str, which: str, target: str, tmp_path) -> list:
    """Run the gate's ``which`` workload for ``target`` under ``python`` -> its rows, after the
    checks every gate run must pass."""
    out = tmp_path / "gate.json"
    proc = subprocess.run([python, "-m", "kop_triton.kernels.report", "--set", which, "--targets", target,
                           "--jobs", "1", "--json", str(out), "--no-limits"], env=_env(), capture_output=True, text=True,
                          timeout=1500)
    assert out.exists(), proc.stderr[-4000:]
    rows = json.loads(out.read_text())["rows"]
    failing = [f"{r['kernel']} [{r['dtype']}; {r['config']}]: {r['problems']} (e.g. {r['cases'][0]})"
               + (f"\n{r['error'][-600:]}" if r.get("error") else "") for r in rows if r["problems"]]
    assert not failing, "\n".join(failing)
    assert proc.returncode == 0, proc.stdout[-2000:]
    kernels = {r["kernel"].split(":")[-1] for r in rows}
    assert kernels == KERNELS, kernels
    mma16 = [r for r in rows if r["dots_16bit"]]
    assert mma16 and all(r["mma"] > 0 for r in mma16)
    assert any(not r["dots_16bit"] and r["mma"] == 0 for r in rows)    # fp32 stays off tensor cores
    return rows


@pytest.mark.parametrize("target", ["sm_80", "sm_90", "sm_100"])
def test_compile_gate(target, tmp_path):
    """Every specialisation of the CI workload compiles for ``target`` with zero spills, shared
    memory within the limit, MMA instructions wherever 16-bit operands are multiplied, no TF32."""
    _gate(sys.executable, "ci", target, tmp_path)


# The newest Triton release (3.9), gated beside the pinned one: `make test` makes its venv
# (.venv-triton39: the same torch, that Triton, numpy) and names its python here.
ROOT = os.path.dirname(HERE)
NEWEST_ENV = "KOP_TRITON_NEWEST_PYTHON"


def _newest_python() -> str:
    named = os.environ.get(NEWEST_ENV)
    if named:
        assert os.path.exists(named), f"{NEWEST_ENV}={named} does not exist: `make install-triton39` makes it"
        return named
    default = os.path.join(ROOT, ".venv-triton39", "bin", "python")
    if not os.path.exists(default):
        pytest.skip("no venv with the newest Triton (.venv-triton39): `make install-triton39` makes it, "
                    "`make test` makes it and runs this gate")
    return default


@pytest.mark.parametrize("target", ["sm_80", "sm_90", "sm_100"])
def test_compile_gate_newest_triton(target, tmp_path):
    """The gate under the newest Triton release, in its own venv, on its CI set (``--set newest``:
    every kernel, dtype and flag at the tiles whose settings depend on the version or target, or
    that spilled under it): zero compile errors, zero spills, MMA for 16-bit dots, no TF32."""
    python = _newest_python()
    version = subprocess.run([python, "-c", "import triton; print(triton.__version__)"], env=_env(),
                             capture_output=True, text=True, timeout=300)
    assert version.returncode == 0, version.stderr[-2000:]
    from kop_triton.kernels.settings import TRITON, parse_version
    newest = parse_version(version.stdout.strip().splitlines()[-1])
    assert newest > TRITON, f"{python} has Triton {newest}, not newer than this process's {TRITON}"
    _gate(python, "newest", target, tmp_path)


# --------------------------------------------------------------------------------------
# the committed report matches today's kernels
# --------------------------------------------------------------------------------------

def _source_kernels():
    """Names of the @triton.jit kernels (``_*_kernel``) defined in kernels/*.py."""
    import re
    root = os.path.join(os.path.dirname(HERE), "kernels")
    names = set()
    for f in sorted(os.listdir(root)):
        if f.endswith(".py"):
            src = open(os.path.join(root, f)).read()
            names |= set(re.findall(r"@triton\.jit[^\n]*\ndef (_\w+_kernel)\(", src))
    return names


def _committed_reports():
    """The newest committed compile report of each Triton version: {version: path}."""
    import re
    res = os.path.join(os.path.dirname(HERE), "benchmarks", "results")
    newest = {}
    for f in sorted(os.listdir(res)):
        m = re.fullmatch(r"kernels-(?:triton([\d.]+)-)?(\d{4}-\d{2}-\d{2})\.md", f)
        if m:
            text = open(os.path.join(res, f)).read()
            version = re.search(r"Triton (\d+\.\d+)", text).group(1)
            if version not in newest or m.group(2) >= newest[version][0]:
                newest[version] = (m.group(2), os.path.join(res, f))
    return {v: p for v, (_, p) in newest.items()}


def test_committed_report_names_every_kernel_of_today():
    """The newest committed compile report (per Triton version; the README cites them) has rows for
    every kernel defined in kernels/ and for no kernel that no longer exists."""
    import re
    kernels = _source_kernels()
    assert len(kernels) >= 12, kernels
    reports = _committed_reports()
    assert "3.6" in reports, f"no committed compile report for Triton 3.6 in benchmarks/results: {reports}"
    for version, path in reports.items():
        rows = set(re.findall(r"^\| sm_\d+ \| (_\w+_kernel) \|", open(path).read(), re.M))
        assert rows == kernels, (f"{os.path.basename(path)} (Triton {version}) is stale: kernels without rows "
                                 f"{sorted(kernels - rows)}, rows of kernels that no longer exist "
                                 f"{sorted(rows - kernels)}; regenerate it with python -m kop_triton.kernels.report")


def test_flat_grid_spills_are_reported_not_failed():
    """The flat grids (FLAT=True) report spills apart; every other rule, and spills on the natural
    grids, fail the gate."""
    from kop_triton.kernels.report import _verdict
    row = {"error": None, "spill_stores": 8, "spill_loads": 8, "smem": 0, "dots_16bit": True, "mma": 0,
           "tf32_mma": 0}
    nat = _verdict(row, 90, "BD=64, FLAT=False, num_warps=8")
    flat = _verdict(row, 90, "BD=64, FLAT=True, num_warps=8")
    assert any(p.startswith("spills") for p in nat["problems"]) and nat["notes"] == []
    assert flat["notes"] == ["spills 8 B stores / 8 B loads"]
    assert flat["problems"] == ["16-bit dot without MMA instructions"]
    assert _verdict({"error": "boom"}, 90, "FLAT=True")["problems"] == ["does not compile"]
