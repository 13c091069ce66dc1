"""The one-shot run on a lent CUDA machine (``benchmarks/device_check.sh``), and its CPU rehearsal.

    bash benchmarks/device_check.sh                 # on the GPU machine: OUT=<folder that comes back>
    bash benchmarks/device_check.sh --rehearse      # on a CPU machine: every step at tiny sizes

Steps, in order of value (install first, since nothing runs without it).  Each has a budget; a
step may run until the run's start + the budgets of the steps up to it, so time an earlier step
leaves unused goes to the later ones and the whole run never outlasts the total (8 minutes on the
GPU, inside the device tool's 600 s per command).  A step over its time gets SIGINT (pytest
prints its summary, the benchmarks keep what they wrote), then SIGKILL after a grace period:

    install  carried wheels (.whl/, git-ignored) into /tmp/site, ``pip install -e .`` (ROSA's C
             helper), machine.txt (GPU, driver, versions)
    tests    the CUDA correctness tests of scan, conv, K2 and the module against float64
             references, no -x: the CUDA-only large ones (names ending ``_cuda``: T = 1M,
             B*T*D > 2^31) one at a time beside the rest under pytest-xdist
    k2       issue 10's K2 timings: fused vs unfused Triton vs the chunked PyTorch path, B = 1,
             T = 1K..1M, D = 1024, R = 16, K = 8, bf16, forward and forward+backward
    model    issue 20's model check (``benchmarks/model_check.py``): each Triton kernel of the fused
             K2 mixer profiled (torch.profiler, CUDA) at D = 64, 1024 x T = 64K, 1M, bf16, beside
             the performance model's prediction (benchmarks/perf_model.py), with the model's error
    gate     the compile gate with --device (ci workload, the GPU's arch): ptxas's counts beside
             the driver's, workers spawned
    bench    the rest of the benchmark (python -m benchmarks.run) inside what time is left

Results: the work folder (default /tmp/kop_device_check) holds every log and JSON; after each
step ``$OUT`` is refreshed with at most 8 files (what the device tool brings back): the archive
``device_check.tar.gz`` of the whole work folder, ``summary.json`` (per step: status, exit code,
seconds, budget, key figures) and a few small text files.  So a run cut short still returns
everything up to its last step.

``--rehearse`` runs the same steps on a CPU machine at tiny sizes (tests through the Triton
interpreter on a small -k selection, the K2 sweep at tiny T where the Triton methods record
"skipped: no CUDA device", the gate without --device for one kernel and one target, the
benchmark's --quick sweep), with the same archive and summary layout; tests/test_device_check.py
runs it.  The install step then only installs carried wheels and checks that the package
imports (the venv already holds the editable install).

Only the standard library is imported here: the driver runs before the package is installed.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROG = "benchmarks/device_check.sh"
SCHEMA = "kop-triton-device-check/1"
TOTAL_S = 480                 # the whole run, install included: 8 minutes
GRACE_S = 8                   # from SIGINT to SIGKILL at a step's deadline (inside its time)
ARCHIVE = "device_check.tar.gz"
SUMMARY = "summary.json"
MARKER = ".device_check_work"      # marks a work folder this driver made (and may empty again)
# what $OUT holds (the device tool brings back at most 8 files): the archive, the summary and
# the small text files a reader opens first (each also in the archive)
OUT_FILES = (ARCHIVE, SUMMARY, "machine.txt", "tests.log", "k2.log", "model_check.md", "gate.md", "bench.md")
TEST_FILES = ["tests/test_scan.py", "tests/test_conv.py", "tests/test_k2.py", "tests/test_flat_grids.py",
              "tests/test_module_koperator.py", "tests/test_context_parallel_device.py"]
K2_METHODS = ["k2/triton_fused", "k2/triton_unfused", "k2/chunked"]


@dataclass(frozen=True)
class Step:
    name: str
    gpu_s: int                # budget on the GPU machine
    rehearse_s: int           # budget of the CPU rehearsal
    what: str
    rehearse_what: str


PLAN = [
    Step("install", 30, 30, "carried wheels, pip install -e . (ROSA's C helper), machine.txt",
         "carried wheels, check the venv's package imports, machine.txt"),
    Step("tests", 180, 90, "pytest scan/conv/K2/module vs float64 refs, CP world of one over NCCL, -n 12, no -x; "
                           "the _cuda ones serially beside",
         "the same, through the interpreter, on a small -k selection (CP over gloo)"),
    Step("k2", 100, 45, "bench_k2 fused/unfused/chunked, B 1, T 1K..1M, D 1024, R 16, bf16, fwd + fwd_bwd",
         "the same at T 64, 256, D 32, R 4 (Triton methods: skipped, no CUDA)"),
    Step("model", 40, 20, "model_check: fused K2 kernels profiled vs the perf model, D 64,1024 x T 64K,1M, bf16",
         "model_check without CUDA: the model's prediction only, D 64, T 1M"),
    Step("gate", 60, 75, "kernels.report --set ci --targets <GPU arch> --device --jobs 16",
         "kernels.report --set ci --targets sm_90 --kernel _state_pass_kernel --jobs 2"),
    Step("bench", 50, 60, "benchmarks.run --max-minutes <what is left>",
         "benchmarks.run --quick --no-plots --max-minutes <what is left>"),
]
MARGIN_S = TOTAL_S - sum(s.gpu_s for s in PLAN)        # archive, summary, kill grace of the last step
assert MARGIN_S >= 10, "the plan leaves no margin inside the 8 minutes"
assert sum(s.rehearse_s for s in PLAN) + MARGIN_S <= TOTAL_S


def plan_table(rehearse: bool = False) -> List[str]:
    """The planned budget, one line per step (also in device_check.sh's header and the summary)."""
    lines = [f"{'step':8s} {'budget s':>8s} {'ends by s':>9s}  what"]
    end = 0
    for s in PLAN:
        b = s.rehearse_s if rehearse else s.gpu_s
        end += b
        lines.append(f"{s.name:8s} {b:8d} {end:9d}  {s.rehearse_what if rehearse else s.what}")
    lines.append(f"{'margin':8s} {MARGIN_S:8d} {end + MARGIN_S:9d}  archive, summary, last step's kill grace")
    lines.append(f"{'total':8s} {end + MARGIN_S:8d}")
    return lines


# --------------------------------------------------------------------------------------
# running a step
# --------------------------------------------------------------------------------------


def run_cmds(cmds: List[List[str]], logs: List[str], env: Dict[str, str], deadline: float) -> List[Dict]:
    """Run ``cmds`` side by side (each in its own process group, output to its log, written as it
    goes) until all end or ``deadline`` (monotonic seconds): then SIGINT, and SIGKILL after
    GRACE_S.  -> per command: exit code, whether it was stopped, seconds."""
    procs = []
    for cmd, log in zip(cmds, logs):
        f = open(log, "ab")
        f.write(("$ " + " ".join(cmd) + "\n").encode())
        f.flush()
        t0 = time.monotonic()
        try:
            p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as e:
            f.write(f"cannot start: {e}\n".encode())
            p = None
        procs.append({"p": p, "f": f, "t0": t0, "stopped": False, "rc": None if p else 127, "end": t0})
    soft = deadline - GRACE_S
    while True:
        live = [r for r in procs if r["p"] is not None and r["rc"] is None]
        for r in live:
            rc = r["p"].poll()
            if rc is not None:
                r["rc"], r["end"] = rc, time.monotonic()
        live = [r for r in live if r["rc"] is None]
        if not live:
            break
        now = time.monotonic()
        if now >= soft:
            for r in live:
                if not r["stopped"]:
                    r["stopped"] = True
                    _signal(r["p"], signal.SIGINT)
            if now >= deadline:
                for r in live:
                    _signal(r["p"], signal.SIGKILL)
                    r["rc"], r["end"] = r["p"].wait(), time.monotonic()
                break
        time.sleep(0.2)
    out = []
    for r in procs:
        if r["stopped"]:
            r["f"].write(f"\n[device_check] stopped at the step's deadline (exit code {r['rc']})\n".encode())
        r["f"].close()
        out.append({"exit_code": r["rc"], "stopped": r["stopped"], "seconds": round(r["end"] - r["t0"], 1)})
    return out


def _signal(p: subprocess.Popen, sig) -> None:
    """Signal the process group of a command this driver started (its session leader is ``p``)."""
    try:
        os.killpg(p.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _load_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------------------
# key figures, read back from each step's outputs
# --------------------------------------------------------------------------------------

# -v progress lines (test ids may hold spaces): xdist "[gw3] [ 45%] PASSED tests/a.py::t[x y]",
# serial "tests/a.py::t[x y] SKIPPED (reason) [ 25%]"
_STATUS = r"(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)"
_PYTEST_LINE = re.compile(r"^\[gw\d+\] \[\s*\d+%\] " + _STATUS + r" (\S+::.+?)\s*$|"
                          r"^(\S+::.+?) " + _STATUS + r"\b.*\[\s*\d+%\]\s*$")
_PYTEST_FINAL = re.compile(r"^=+ (.*\d+ (?:passed|failed|skipped|errors?|deselected|xfailed|xpassed).*) in "
                           r"([\d.]+)s")
_COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed|warnings?)")


def pytest_figures(log: str) -> Dict:
    """Counts from pytest's last summary line, or from its -v lines when it was cut short."""
    counts: Dict[str, int] = {}
    final = None
    for line in log.splitlines():
        m = _PYTEST_FINAL.match(line)
        if m:
            final = m
    if final:
        for n, what in _COUNT.findall(final.group(1)):
            what = {"error": "errors", "warning": "warnings"}.get(what, what)
            counts[what] = counts.get(what, 0) + int(n)
        counts["pytest_seconds"] = float(final.group(2))
    failed, seen = [], {}
    for line in log.splitlines():
        m = _PYTEST_LINE.match(line)
        if m:
            st, tid = (m.group(1), m.group(2)) if m.group(1) else (m.group(4), m.group(3))
            seen[tid] = st
            if st in ("FAILED", "ERROR") and tid not in failed:
                failed.append(tid)
        elif line.startswith(("FAILED ", "ERROR ")) and "::" in line:      # -rfE short summary
            tid = line.split(" ", 1)[1].split(" - ")[0].strip()
            if tid not in failed:
                failed.append(tid)
    if not final:            # cut short: what the progress lines say
        for st in seen.values():
            k = {"PASSED": "passed", "FAILED": "failed", "SKIPPED": "skipped", "ERROR": "errors",
                 "XFAIL": "xfailed", "XPASS": "xpassed"}[st]
            counts[k] = counts.get(k, 0) + 1
        counts["from"] = "progress lines (pytest did not finish)"
    counts["failed_tests"] = failed[:60]
    return counts


_K2_LINE = re.compile(r"^\[\s*[\d.]+s\] (k2/\S+)\s+(fwd_bwd|fwd)\s+T=(\d+)\s+B=(\d+)\s+(.*)$")
_K2_OK = re.compile(r"^ok\s+([\d.]+) ms\s+([\d.]+) MB\s+err ([\d.e+-]+)")


def k2_points(doc: Optional[Dict], log: str) -> List[Dict]:
    """The K2 sweep's points: from its JSON, or from its progress log when it was cut short."""
    pts = []
    if doc:
        for r in doc.get("results", []):
            p = {"method": r["method"], "mode": r["mode"], "T": r["T"], "B": r["B"], "status": r["status"]}
            if r["status"] == "ok":
                p.update(ms=r["time_ms"]["median"], peak_MB=round(r["peak_mem_bytes"] / 2 ** 20, 1),
                         output_error=r["error"]["output"], fraction_of_copy_bound=r.get("fraction_of_copy_bound"))
            else:
                p["reason"] = r.get("reason")
            pts.append(p)
        return pts
    for line in log.splitlines():
        m = _K2_LINE.match(line)
        if not m:
            continue
        p = {"method": m.group(1), "mode": m.group(2), "T": int(m.group(3)), "B": int(m.group(4))}
        ok = _K2_OK.match(m.group(5))
        if ok:
            p.update(status="ok", ms=float(ok.group(1)), peak_MB=float(ok.group(2)),
                     output_error=float(ok.group(3)))
        else:
            p.update(status="not ok", reason=m.group(5).strip())
        pts.append(p)
    return pts


def k2_table(pts: List[Dict]) -> List[str]:
    """Median ms per T: each method forward and forward+backward, and the ratios to the fused kernel."""
    Ts = sorted({p["T"] for p in pts})
    cell = {(p["T"], p["method"], p["mode"]): p for p in pts}
    short = {"k2/triton_fused": "fused", "k2/triton_unfused": "unfused", "k2/chunked": "chunked"}
    cols = [(m, md) for md in ("fwd", "fwd_bwd") for m in K2_METHODS]
    head = ["T", "B"] + [f"{short[m]} {md}" for m, md in cols] + ["unfused/fused fwd_bwd", "chunked/fused fwd_bwd"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def ms(T, m, md):
        p = cell.get((T, m, md))
        return p["ms"] if p and p["status"] == "ok" else None

    for T in Ts:
        B = next(p["B"] for p in pts if p["T"] == T)
        row = [str(T), str(B)]
        for m, md in cols:
            p = cell.get((T, m, md))
            row.append("-" if p is None else f"{p['ms']:.3g} ms" if p["status"] == "ok" else p["status"])
        f = ms(T, "k2/triton_fused", "fwd_bwd")
        for other in ("k2/triton_unfused", "k2/chunked"):
            o = ms(T, other, "fwd_bwd")
            row.append(f"{o / f:.2f}x" if f and o else "-")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def model_figures(doc: Optional[Dict]) -> Dict:
    """Per shape and kernel: predicted and measured us per forward + backward, the model's error."""
    if not doc:
        return {"json": False, "table": []}
    rows, table = [], ["model check (us per fwd+bwd; error = measured / predicted - 1):"]
    for sh in doc["shapes"]:
        table.append(f"  D={sh['D']} T={sh['T']} {sh['dtype']}: {sh['status']}")
        for r in sh["rows"]:
            rows.append({"D": sh["D"], "T": sh["T"], **{k: r.get(k) for k in
                                                         ("kernel", "predicted_us", "measured_us", "error")}})
            f = lambda v: "-" if v is None else f"{v:,.1f}"  # noqa: E731
            table.append(f"    {r['kernel']:28s} predicted {f(r['predicted_us']):>10s}  measured "
                         f"{f(r['measured_us']):>10s}  error {'-' if r['error'] is None else format(r['error'], '+.0%')}")
    return {"json": True, "device": doc.get("device"), "priced_commit": doc.get("priced_commit"), "rows": rows,
            "table": table}


def gate_figures(doc: Optional[Dict], log: str) -> Dict:
    if not doc:
        last = [ln for ln in log.splitlines() if ln.startswith("gate:") or ": error:" in ln]
        return {"summary": None, "last_line": last[-1] if last else None}
    rows = doc["rows"]
    dev = [r for r in rows if "device_registers" in r]
    return {"summary": doc["summary"], "rows": len(rows),
            "failing": [f"{r['target']} {r['kernel']} [{r['dtype']}; {r['config']}]: {'; '.join(r['problems'])}"
                        for r in rows if r["problems"]][:40],
            "device_rows": len(dev),
            "device_register_mismatches": sum(r["device_registers"] != r["registers"] for r in dev),
            "device_spilling": sum(bool(r["device_spills"]) for r in dev)}


def bench_figures(doc: Optional[Dict]) -> Dict:
    if not doc:
        return {"results_json": False}
    counts: Dict[str, int] = {}
    for r in doc["results"]:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    lm = [{"backend": r["config"]["backend"], "autocast_bf16": r["autocast_bf16"], "status": r["status"],
           "tokens_per_s": r.get("tokens_per_s")} for r in (doc.get("lm_throughput") or {}).get("runs", [])]
    return {"results_json": True, "complete": doc.get("complete"), "measurements": counts,
            "lm_throughput": lm, "runtime_s": doc.get("runtime_s")}


# --------------------------------------------------------------------------------------
# the steps
# --------------------------------------------------------------------------------------


class Run:
    def __init__(self, args):
        self.rehearse = args.rehearse
        self.out = os.path.abspath(args.out)
        self.work = os.path.abspath(args.work)
        self.py = sys.executable
        self.t0 = time.monotonic()
        self.env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        self.env["PYTHONUNBUFFERED"] = "1"
        self.env["PYTHONDONTWRITEBYTECODE"] = "1"
        self.arch = None
        self.cpus = os.cpu_count() or 1
        self.wanted = args.steps
        self.summary = {
            "schema": SCHEMA, "mode": "rehearse" if self.rehearse else "gpu",
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([PROG] + (args.argv or [])), "margin_s": MARGIN_S,
            "total_budget_s": sum(self.budget(s) for s in PLAN) + MARGIN_S,
            "plan": [{"step": s.name, "budget_s": self.budget(s), "what": s.rehearse_what if self.rehearse else s.what}
                     for s in PLAN],
            "plan_table": plan_table(self.rehearse), "out_files": list(OUT_FILES), "work": self.work,
            "steps": [{"name": s.name, "status": "pending" if s.name in self.wanted else "not asked for",
                       "budget_s": self.budget(s)} for s in PLAN],
            "elapsed_s": 0.0, "finished": False,
        }

    def budget(self, s: Step) -> int:
        return s.rehearse_s if self.rehearse else s.gpu_s

    def path(self, *p) -> str:
        return os.path.join(self.work, *p)

    # -- bookkeeping ---------------------------------------------------------------

    def publish(self) -> None:
        """Refresh $OUT: summary, small text files, archive of the work folder (atomic renames)."""
        self.summary["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        with open(self.path(SUMMARY), "w") as f:
            json.dump(self.summary, f, indent=1)
        sources = {"machine.txt": "machine.txt", "tests.log": "tests.log", "k2.log": "k2.log",
                   "gate.md": "gate.md", "bench.md": os.path.join("bench", "results.md"),
                   "model_check.md": "model_check.md", SUMMARY: SUMMARY}
        for name, src in sources.items():
            if os.path.exists(self.path(src)):
                shutil.copyfile(self.path(src), os.path.join(self.out, "." + name + ".tmp"))
                os.replace(os.path.join(self.out, "." + name + ".tmp"), os.path.join(self.out, name))
        tmp = os.path.join(self.out, "." + ARCHIVE + ".tmp")
        with tarfile.open(tmp, "w:gz") as tar:
            tar.add(self.work, arcname="device_check")
        os.replace(tmp, os.path.join(self.out, ARCHIVE))

    def say(self, msg: str) -> None:
        print(f"[device_check {time.monotonic() - self.t0:6.1f}s] {msg}", flush=True)

    def main(self) -> int:
        os.makedirs(self.out, exist_ok=True)
        if os.path.exists(self.work):
            shutil.rmtree(self.work)             # main() checked it is an earlier run's work folder
        os.makedirs(self.work)
        open(self.path(MARKER), "w").close()
        print(f"{PROG}: {'CPU rehearsal' if self.rehearse else 'GPU run'}; planned budget (s):", flush=True)
        print("\n".join("  " + ln for ln in plan_table(self.rehearse)), flush=True)
        self.publish()
        end = 0.0
        for i, s in enumerate(PLAN):
            end += self.budget(s)
            rec = self.summary["steps"][i]
            if s.name not in self.wanted:
                continue
            deadline = self.t0 + end
            allowed = deadline - time.monotonic()
            rec.update(status="running", allowed_s=round(allowed, 1))
            self.say(f"{s.name}: up to {allowed:.0f} s")
            t = time.monotonic()
            try:
                res, figures = getattr(self, "step_" + s.name)(deadline)
            except Exception as e:  # noqa: BLE001 - a broken step is a result; the next ones still run
                res, figures = [{"exit_code": None, "stopped": False, "seconds": 0.0}], {
                    "driver_error": f"{type(e).__name__}: {e}"}
            rc = [r["exit_code"] for r in res]
            stopped = any(r["stopped"] for r in res)
            status = ("timeout" if stopped else "ok" if all(c == 0 for c in rc) else "failed")
            rec.update(status=status, exit_code=rc[0] if len(rc) == 1 else rc,
                       seconds=round(time.monotonic() - t, 1), figures=figures)
            self.say(f"{s.name}: {status} (exit {rec['exit_code']}) in {rec['seconds']:.1f} s")
            self.publish()
        self.summary["finished"] = True
        self.publish()
        self.report()
        return 0 if all(r["status"] in ("ok", "not asked for") for r in self.summary["steps"]) else 1

    def report(self) -> None:
        """The end of stdout (what the device tool's reply shows): budget, steps, key figures."""
        print("\n== device_check summary " + "=" * 48)
        print(f"{'step':8s} {'status':8s} {'exit':>6s} {'seconds':>8s} {'budget':>7s} {'allowed':>8s}")
        for r in self.summary["steps"]:
            print(f"{r['name']:8s} {r['status']:8s} {str(r.get('exit_code', '')):>6s} "
                  f"{r.get('seconds', 0):8.1f} {r['budget_s']:7d} {r.get('allowed_s', 0):8.1f}")
        planned = sum(r["budget_s"] for r in self.summary["steps"]) + MARGIN_S
        print(f"total {self.summary['elapsed_s']:.1f} s of {planned} s planned")
        steps = {r["name"]: r.get("figures") or {} for r in self.summary["steps"]}
        t = steps.get("tests", {})
        for part in ("parallel", "cuda_serial"):
            if part in t:
                c = {k: v for k, v in t[part].items() if k != "failed_tests"}
                print(f"tests ({part}): {c}")
                for tid in t[part].get("failed_tests", [])[:20]:
                    print(f"  FAILED {tid}")
        if steps.get("k2", {}).get("table"):
            print("K2 (median ms, bf16, D 1024, R 16):" if not self.rehearse else "K2 (median ms, tiny sizes):")
            print("\n".join(steps["k2"]["table"]))
        for ln in steps.get("model", {}).get("table", []):
            print(ln)
        g = steps.get("gate", {})
        for s in g.get("summary") or []:
            print(f"gate: {s}")
        if g.get("device_rows"):
            print(f"gate on the device: {g['device_rows']} rows, driver registers differ from ptxas's in "
                  f"{g['device_register_mismatches']}, driver reports spills in {g['device_spilling']}")
        b = steps.get("bench", {})
        if b.get("measurements"):
            print(f"bench: {b['measurements']}, complete {b.get('complete')}, LM {b.get('lm_throughput')}")
        print(f"files in {self.out}: {', '.join(sorted(os.listdir(self.out)))}")

    # -- 1. install ----------------------------------------------------------------

    def step_install(self, deadline: float):
        log = self.path("install.log")
        res = []
        whl = os.path.join(ROOT, ".whl")
        wheels = sorted(os.path.join(whl, w) for w in os.listdir(whl) if w.endswith(".whl")) \
            if os.path.isdir(whl) else []
        with open(log, "w") as f:
            f.write("carried wheels (.whl/): " + (", ".join(map(os.path.basename, wheels)) or "none") + "\n")
            if self.rehearse:
                f.write("rehearsal: the venv's editable install is used as it is (the probe checks it imports)\n")
        if wheels:
            site = self.work + "_site" if self.rehearse else "/tmp/site"      # outside the archive
            res += run_cmds([[self.py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                              "--no-cache-dir", "--upgrade", "--target", site] + wheels], [log], self.env, deadline)
            if res[-1]["exit_code"] == 0:
                self.env["PYTHONPATH"] = site + (os.pathsep + self.env["PYTHONPATH"]
                                                 if self.env.get("PYTHONPATH") else "")
        if not self.rehearse:   # (the rehearsal's venv holds the editable install: the probe checks it)
            res += run_cmds([[self.py, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", "."]],
                            [log], self.env, deadline)
        info = self.path("machine.txt")
        with open(info, "w") as f:
            f.write(f"{datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}\n")
        cmds = [[self.py, "-m", "benchmarks.device_check", "--probe"]]
        if shutil.which("nvidia-smi"):
            cmds.append(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm",
                         "--format=csv"])
        if shutil.which("git") and os.path.isdir(os.path.join(ROOT, ".git")):
            cmds.append(["git", "-C", ROOT, "log", "-1", "--format=commit %H %cI %s"])
        for c in cmds:
            r = run_cmds([c], [info], self.env, deadline)[0]
            if c[0] == self.py:
                res.append(r)
        m = re.findall(r"^MACHINE (\{.*\})$", _read(info), re.M)
        machine = json.loads(m[-1]) if m else {}
        self.arch = machine.get("arch")
        self.summary["machine"] = machine
        with open(info, "a") as f:
            f.write("\n--- install log\n" + _read(log)[-4000:])
        return res, {"machine": machine, "wheels": [os.path.basename(w) for w in wheels]}

    # -- 2. tests --------------------------------------------------------------------

    def step_tests(self, deadline: float):
        common = [self.py, "-m", "pytest", "-p", "no:cacheprovider", "-v", "--tb=short", "-rfE",
                  "--durations=15"] + TEST_FILES
        if self.rehearse:
            # a small selection through the interpreter: argument checks, a spec check, one kernel run
            sel = ("bad_input or init_follows_spec or reference_equals_direct_loop or odd_sizes[1-1-20] "
                   "or cp_world_of_one or cp_collectives")
            par = common + ["-n", "2", "-k", f"({sel}) and not _cuda"]
        else:
            par = common + ["-n", str(min(12, max(1, self.cpus - 2))), "-k", "not _cuda"]
        big = common + ["-p", "no:xdist", "-k", "_cuda"]
        par += ["--junitxml", self.path("tests_parallel.xml")]
        big += ["--junitxml", self.path("tests_cuda_serial.xml")]
        logs = [self.path("tests_parallel.log"), self.path("tests_cuda_serial.log")]
        res = run_cmds([par, big], logs, self.env, deadline)
        with open(self.path("tests.log"), "w") as f:
            for name, log in zip(("parallel", "cuda_serial"), logs):
                f.write(f"===== {name}: {os.path.basename(log)}\n" + _read(log) + "\n")
        figures = {name: pytest_figures(_read(log)) for name, log in zip(("parallel", "cuda_serial"), logs)}
        return res, figures

    # -- 3. K2 timings ----------------------------------------------------------------

    def step_k2(self, deadline: float):
        left = deadline - time.monotonic()
        # points not started by --max-minutes are recorded as over budget; the margin covers the
        # point in flight, the tables and the JSON
        minutes = max(0.1, (left - GRACE_S - (10 if self.rehearse else 20)) / 60)
        if self.rehearse:
            size = ["--T", "64,256", "--D", "32", "--R", "4", "--K", "4", "--threads", "1"]
        else:
            size = ["--T", "1k,4k,16k,64k,256k,1m", "--D", "1024", "--R", "16", "--K", "8"]
        cmd = [self.py, "-m", "benchmarks.bench_k2", *size, "--tokens", "1", "--dtypes", "bf16",
               "--modes", "fwd,fwd_bwd", "--methods", ",".join(K2_METHODS), "--max-minutes", f"{minutes:.2f}",
               "--json", self.path("k2.json"), "--note", f"{PROG} ({self.summary['mode']})"]
        res = run_cmds([cmd], [self.path("k2.log")], self.env, deadline)
        pts = k2_points(_load_json(self.path("k2.json")), _read(self.path("k2.log")))
        return res, {"max_minutes": round(minutes, 2), "json": os.path.exists(self.path("k2.json")),
                     "points": pts, "table": k2_table(pts) if pts else []}

    # -- 3b. the performance model's check ----------------------------------------------

    def step_model(self, deadline: float):
        size = ["--D", "64", "--T", "1048576"] if self.rehearse else ["--D", "64,1024", "--T", "65536,1048576"]
        cmd = [self.py, "-m", "benchmarks.model_check", *size, "--json", self.path("model_check.json"),
               "--md", self.path("model_check.md")]
        res = run_cmds([cmd], [self.path("model_check.log")], self.env, deadline)
        return res, model_figures(_load_json(self.path("model_check.json")))

    # -- 4. compile gate on the device --------------------------------------------------

    def step_gate(self, deadline: float):
        cmd = [self.py, "-m", "kop_triton.kernels.report", "--set", "ci", "--json", self.path("gate.json"),
               "--md", self.path("gate.md")]
        if self.rehearse:
            cmd += ["--targets", "sm_90", "--kernel", "_state_pass_kernel", "--jobs", "2"]
        else:
            cmd += ["--targets", self.arch or "sm_90", "--device", "--jobs", str(min(16, self.cpus))]
        res = run_cmds([cmd], [self.path("gate.log")], self.env, deadline)
        return res, gate_figures(_load_json(self.path("gate.json")), _read(self.path("gate.log")))

    # -- 5. the rest of the benchmark -----------------------------------------------------

    def step_bench(self, deadline: float):
        left = deadline - time.monotonic()
        # after the sweeps' deadline: the LM throughput figure (3 runs on a GPU), tables, plots
        minutes = max(0.1, (left - GRACE_S - (15 if self.rehearse else 40)) / 60)
        if self.rehearse:
            minutes = min(minutes, 0.2)     # the rehearsal shows the step works; no more points needed
        cmd = [self.py, "-m", "benchmarks.run", "--out", self.path("bench"), "--max-minutes", f"{minutes:.2f}",
               "--note", f"{PROG} ({self.summary['mode']})"]
        if self.rehearse:
            cmd += ["--quick", "--threads", "1", "--no-plots"]
        # benchmarks.run writes only into a new or empty folder: its log goes beside it
        res = run_cmds([cmd], [self.path("bench.log")], self.env, deadline)
        figures = bench_figures(_load_json(self.path("bench", "results.json")))
        figures["max_minutes"] = round(minutes, 2)
        return res, figures


def probe() -> Dict:
    """The machine, the versions, and that the package imports (run as its own process)."""
    import platform

    import numpy
    import torch
    import triton
    d = dict(python=platform.python_version(), torch=torch.__version__, triton=triton.__version__,
             numpy=numpy.__version__, cuda=torch.version.cuda, cpus=os.cpu_count(), gpu=torch.cuda.is_available())
    for name in ("transformers", "fla"):
        try:
            d[name] = getattr(__import__(name), "__version__", "installed")
        except Exception:  # noqa: BLE001 - absent or broken: not usable
            d[name] = None
    import kop_triton
    import kop_triton.gate  # noqa: F401
    import kop_triton.kernels.report  # noqa: F401
    import kop_triton.rosa  # noqa: F401
    d["kop_triton"] = os.path.dirname(kop_triton.__file__)
    if d["gpu"]:
        m, n = torch.cuda.get_device_capability()
        d.update(gpu_name=torch.cuda.get_device_name(), arch=f"sm_{m}{n}",
                 gpu_memory_GiB=round(torch.cuda.get_device_properties(0).total_memory / 2 ** 30, 1))
    return d


class _Parser(argparse.ArgumentParser):
    """The project's usage errors: one line ``PROG: error: ...``, exit status 2 (as kop_triton.cli,
    which is not importable before the install)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def main(argv: Optional[List[str]] = None) -> int:
    ap = _Parser(prog=PROG, description=__doc__.split("\n")[0])
    ap.add_argument("--rehearse", action="store_true", help="every step on this CPU machine at tiny sizes")
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "benchmarks", "results",
                                                                           "_scratch", "device"),
                    help="the folder that comes back (at most 8 files; default $OUT, else "
                         "benchmarks/results/_scratch/device)")
    ap.add_argument("--work", default=None, help="the full results (default /tmp/kop_device_check[_rehearse])")
    ap.add_argument("--steps", default=",".join(s.name for s in PLAN),
                    help="comma-separated steps to run (default all: " + ", ".join(s.name for s in PLAN)
                    + "); the install always runs")
    ap.add_argument("--plan", action="store_true", help="print the planned budget and exit")
    ap.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)     # the install step's machine line
    args = ap.parse_args(argv)
    if args.probe:
        print("MACHINE " + json.dumps(probe()), flush=True)
        return 0
    args.argv = list(argv if argv is not None else sys.argv[1:])
    if args.plan:
        print("\n".join(plan_table(args.rehearse)))
        return 0
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    bad = [s for s in steps if s not in {p.name for p in PLAN}]
    if bad or not steps:
        print(f"{PROG}: error: --steps: got {args.steps!r}; choose from {', '.join(s.name for s in PLAN)}",
              file=sys.stderr)
        return 2
    args.steps = ["install"] + steps        # the install always runs: a lent machine starts bare
    if args.work is None:
        args.work = "/tmp/kop_device_check" + ("_rehearse" if args.rehearse else "")
    if os.path.isdir(args.work) and os.listdir(args.work) and not os.path.exists(os.path.join(args.work, MARKER)):
        print(f"{PROG}: error: --work: {args.work!r} is a non-empty folder this script did not make; it empties "
              "its work folder first, so give a new or an earlier run's one", file=sys.stderr)
        return 2
    w, o = os.path.abspath(args.work) + os.sep, os.path.abspath(args.out) + os.sep
    if w.startswith(o) or o.startswith(w):
        print(f"{PROG}: error: --out {args.out!r} and --work {args.work!r} must not contain each other "
              "(the archive is made of --work; --out holds at most 8 files)", file=sys.stderr)
        return 2
    return Run(args).main()


if __name__ == "__main__":
    sys.exit(main())
