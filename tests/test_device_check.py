"""benchmarks/device_check.sh, the one-shot GPU run: its plan fits the 8 minutes and matches the
script's header, its steps stop at their deadlines, its log readers understand cut-short logs,
and the CPU rehearsal (--rehearse) runs every step at tiny sizes with the GPU run's layout of
results (one archive, one summary JSON, at most 8 files)."""
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))          # the repository root holds benchmarks/

from benchmarks import device_check as DC  # noqa: E402


def test_plan_fits_eight_minutes_and_is_the_scripts_header():
    gpu = sum(s.gpu_s for s in DC.PLAN) + DC.MARGIN_S
    assert gpu == DC.TOTAL_S <= 480 and DC.MARGIN_S >= 10
    assert [s.name for s in DC.PLAN] == ["install", "tests", "k2", "model", "gate", "bench"]      # order of value
    header = [ln[len("#   "):].rstrip() for ln in (ROOT / "benchmarks" / "device_check.sh").read_text().splitlines()
              if ln.startswith("#   ")]
    table = [ln.rstrip() for ln in DC.plan_table()]
    assert table[0] in header, header
    i = header.index(table[0])
    assert header[i:i + len(table)] == table, "device_check.sh's header differs from benchmarks/device_check.py's plan"
    assert table[-1].split() == ["total", "480"]


def test_steps_stop_at_their_deadline(tmp_path, monkeypatch):
    """A command that ends in time keeps its exit code; one that outlives the deadline gets
    SIGINT, and SIGKILL at the deadline if it ignores that; both logs keep what was written."""
    monkeypatch.setattr(DC, "GRACE_S", 1.0)
    quick = [sys.executable, "-c", "print('quick done')"]
    stubborn = [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
                                      "print('started', flush=True); time.sleep(60)"]
    polite = [sys.executable, "-c", "import time\ntry:\n    print('started', flush=True); time.sleep(60)\n"
                                    "except KeyboardInterrupt:\n    print('interrupted', flush=True)\n"]
    logs = [str(tmp_path / f"{i}.log") for i in range(3)]
    t0 = time.monotonic()
    res = DC.run_cmds([quick, stubborn, polite], logs, dict(os.environ), t0 + 4.0)
    took = time.monotonic() - t0
    assert res[0]["exit_code"] == 0 and not res[0]["stopped"]
    assert res[1]["stopped"] and res[1]["exit_code"] == -signal.SIGKILL
    assert res[2]["stopped"] and res[2]["exit_code"] == 0            # handled SIGINT, exited at once
    assert 3.0 <= took < 10, took
    texts = [Path(p).read_text() for p in logs]
    assert "quick done" in texts[0] and "started" in texts[1] and "interrupted" in texts[2]
    assert "stopped at the step's deadline" in texts[1]


def test_pytest_log_reader_on_finished_and_cut_short_logs():
    """Counts from pytest's summary line; from the -v progress lines (ids with spaces, xdist and
    serial formats) when it was killed before writing one; failed ids from both."""
    xdist = ("[gw0] [  1%] PASSED tests/test_scan.py::test_bad_input_errors[q_rank-ValueError-q must have shape] \n"
             "[gw1] [  2%] FAILED tests/test_k2.py::test_fused_other_dtypes[bf16] \n"
             "[gw1] [  3%] SKIPPED tests/test_k2.py::test_fused_long_sequence_cuda \n"
             "[gw0] [  4%] PASSED tests/test_scan.py::test_bad_input_errors[k_shape-ValueError-k must have the shape] \n")
    got = DC.pytest_figures(xdist)
    assert got["passed"] == 2 and got["failed"] == 1 and got["skipped"] == 1 and "from" in got
    assert got["failed_tests"] == ["tests/test_k2.py::test_fused_other_dtypes[bf16]"]
    serial = ("tests/test_scan.py::test_triton_int64_offsets_cuda PASSED [ 25%]\n"
              "tests/test_k2.py::test_fused_long_sequence_cuda SKIPPED (a million t...) [ 75%]\n"
              "FAILED tests/test_k2.py::test_x[a b] - AssertionError: boom\n"
              "=========== 1 failed, 1 passed, 1 skipped, 291 deselected in 8.63s ===========\n")
    got = DC.pytest_figures(serial)
    assert (got["passed"], got["failed"], got["skipped"], got["deselected"]) == (1, 1, 1, 291)
    assert got["pytest_seconds"] == 8.63 and "from" not in got
    assert got["failed_tests"] == ["tests/test_k2.py::test_x[a b]"]


def test_cpu_rehearsal_runs_every_step(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUT")}
    env["PYTHON"] = sys.executable
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "device_check.sh"), "--rehearse", "--out", str(out),
                           "--work", str(work)], env=env, capture_output=True, text=True, timeout=560)
    took = time.monotonic() - t0
    summary = json.loads((out / "summary.json").read_text())
    steps = {s["name"]: s for s in summary["steps"]}
    assert proc.returncode == 0, (proc.stdout[-4000:], proc.stderr[-2000:],
                                  {n: (s["status"], s.get("exit_code")) for n, s in steps.items()})
    # the layout the GPU run returns: at most 8 files, all named, each step recorded
    files = sorted(os.listdir(out))
    assert len(files) <= 8 and set(files) == set(DC.OUT_FILES), files
    assert summary["schema"] == DC.SCHEMA and summary["mode"] == "rehearse" and summary["finished"]
    assert summary["plan_table"] == DC.plan_table(rehearse=True)
    assert list(steps) == [s.name for s in DC.PLAN]
    for name, s in steps.items():
        assert s["status"] == "ok", (name, s)
        assert s["exit_code"] in (0, [0, 0]), (name, s)
        assert 0 < s["seconds"] <= s["allowed_s"] + 1 and s["budget_s"] > 0, (name, s)
    assert summary["elapsed_s"] <= summary["total_budget_s"] and took < summary["total_budget_s"] + 30
    assert "planned budget" in proc.stdout and DC.plan_table(rehearse=True)[1] in proc.stdout
    # key figures of each step
    assert steps["install"]["figures"]["machine"]["torch"]
    tests = steps["tests"]["figures"]
    assert tests["parallel"]["passed"] > 10 and not tests["parallel"].get("failed")
    assert tests["cuda_serial"]["skipped"] >= 1 and not tests["cuda_serial"].get("failed")   # CUDA-only here
    k2 = steps["k2"]["figures"]
    assert k2["json"] and k2["table"]
    by = {(p["method"], p["mode"], p["T"]): p for p in k2["points"]}
    assert {(m, md) for m, md, _ in by} == {(m, md) for m in DC.K2_METHODS for md in ("fwd", "fwd_bwd")}
    for (m, md, T), p in by.items():
        assert p["status"] == ("ok" if m == "k2/chunked" else "skipped"), p   # Triton: CUDA only
        if p["status"] == "ok":
            assert p["ms"] > 0 and p["output_error"] < 2e-2
    model = steps["model"]["figures"]                      # the prediction only: no CUDA here
    assert model["json"] and model["rows"] and all(r["measured_us"] is None for r in model["rows"])
    assert any(r["kernel"] == "_state_pass_kernel" and r["predicted_us"] > 0 for r in model["rows"])
    gate = steps["gate"]["figures"]["summary"]
    assert len(gate) == 1 and gate[0]["target"] == "sm_90" and gate[0]["specializations"] > 0
    assert gate[0]["compile_errors"] == gate[0]["failing"] == 0
    bench = steps["bench"]["figures"]
    assert bench["results_json"] and bench["complete"] and bench["measurements"].get("ok", 0) > 0
    # the archive holds every step's outputs; the logs' reader agrees with the JSON it backs up
    with tarfile.open(out / DC.ARCHIVE) as tar:
        names = set(tar.getnames())
        k2_log = tar.extractfile("device_check/k2.log").read().decode()
    expected = {"machine.txt", "install.log", "tests.log", "tests_parallel.log", "tests_cuda_serial.log",
                "tests_parallel.xml", "tests_cuda_serial.xml", "k2.json", "k2.log", "model_check.json", "model_check.md",
                "model_check.log", "gate.json", "gate.md",
                "gate.log", "bench/results.json", "bench/results.md", "bench.log", "summary.json"}
    assert {f"device_check/{n}" for n in expected} <= names, expected - {n[len("device_check/"):] for n in names}
    from_log = {(p["method"], p["mode"], p["T"]): p for p in DC.k2_points(None, k2_log)}
    assert set(from_log) == set(by)
    for key, p in by.items():
        if p["status"] == "ok":
            assert from_log[key]["status"] == "ok" and abs(from_log[key]["ms"] - p["ms"]) <= 0.01 + 1e-3 * p["ms"]
