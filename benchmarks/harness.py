"""The measuring machinery shared by every benchmark script: timing, peak memory, budgets,
reference checks, log-log slopes, crossovers, machine description.

Timing
  CUDA: ``triton.testing.do_bench`` (CUDA events, L2 flushed between calls) quantiles 20/50/80 %,
        or a CUDA-event loop when Triton is absent.
  CPU:  repeated wall time (``time.perf_counter``) after one warm-up call, median / p20 / p80.
Peak memory (bytes allocated *during* the call above what was live before it, i.e. inputs excluded)
  CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.
  CPU:  the running sum of the allocation / free events that torch's CPU allocator reports to
        ``torch.profiler`` (``profile_memory=True``), maximised over the call.  This counts every
        tensor allocated by torch (not Python objects, not allocator caches), which is what the
        CUDA figure counts too.  (tracemalloc does not see torch's allocations and resident-set
        deltas are blurred by malloc's caching, so neither is used.)
Budgets
  Each method is run in order of increasing T.  Before a run, its time and memory are predicted
  from its last measured point with its known scaling (cost of one sequence ~ T^p, p = 1 or 2)
  and, for the quadratic methods, an analytic memory estimate; a run predicted over budget is
  recorded as ``over_budget`` with the prediction, never started.  (On CPU an allocation larger
  than RAM may get the process killed rather than raise, hence prediction, not try/except.)
"""
from __future__ import annotations

import contextlib
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

MB = 1024.0 ** 2

# --------------------------------------------------------------------------------------
# machine
# --------------------------------------------------------------------------------------


LOAD_AT_START = list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def set_threads(n: Optional[int]) -> int:
    """Set torch's intra-op threads explicitly (default: every core) and return the value used."""
    global LOAD_AT_START
    LOAD_AT_START = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    n = int(n) if n else (os.cpu_count() or 1)
    torch.set_num_threads(n)
    return torch.get_num_threads()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> Optional[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info(device: torch.device) -> dict:
    info = {
        "device": str(device),
        "kind": "cuda" if device.type == "cuda" else "cpu",
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "git_commit": _git_commit(),
    }
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        import numpy
        info["numpy"] = numpy.__version__
    except ImportError:
        pass
    try:
        import fla  # noqa: F401
        info["flash_linear_attention"] = getattr(fla, "__version__", "installed")
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        info["flash_linear_attention"] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu_name=p.name, gpu_memory_bytes=p.total_memory, cuda=torch.version.cuda,
                    tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                    tf32_cudnn=torch.backends.cudnn.allow_tf32)
    return info


def pick_device(name: str) -> torch.device:
    """--device: auto, cpu, cuda or cuda:N (the tools' own parser, ``kop_triton.distributed``)."""
    from kop_triton.distributed import resolve_device
    return resolve_device(name)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------
# timing and memory
# --------------------------------------------------------------------------------------

TIMING_METHOD = {
    "cuda": "triton.testing.do_bench (CUDA events, L2 cache flushed between calls), quantiles 0.2/0.5/0.8 "
            "in ms; CUDA-event loop when triton is absent",
    "cpu": "wall time (time.perf_counter) of repeated calls after the first call (which is checked against "
           "the reference and memory-profiled, not timed); median, p20, p80 over the repetitions (at least 3, "
           "2 for calls over 1 s, 1 for calls over the per-call budget, more until 0.5 s in all)",
}
MEMORY_METHOD = {
    "cuda": "torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus memory_allocated "
            "before the call (inputs excluded, outputs and gradients included), on a call after the timed "
            "ones (compilation and autotuning excluded)",
    "cpu": "torch.profiler(profile_memory=True): running sum of the CPU allocator's allocation/free "
           "events over the call, maximised (bytes allocated by torch during the call above the level "
           "before it; inputs excluded, outputs and gradients included), on the first call (the one checked "
           "against the reference, not timed)",
}


def _quantile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    pos = q * (len(s) - 1)
    lo, hi = int(math.floor(pos)), int(math.ceil(pos))
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def time_call(call: Callable[[], object], device: torch.device, *, first_call_s: float,
              min_total_s: float = 0.5, max_reps: int = 20, grad_to_none=None,
              long_call_s: float = float("inf")) -> dict:
    """Time ``call`` (already warmed up once, which took ``first_call_s``); milliseconds."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
            p20, p50, p80 = do_bench(call, warmup=25, rep=100, grad_to_none=grad_to_none,
                                     quantiles=[0.2, 0.5, 0.8])
            return {"median": p50, "p20": p20, "p80": p80, "reps": None, "timer": "triton.testing.do_bench"}
        except ImportError:
            times = []
            for _ in range(max(5, max_reps)):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                call()
                b.record()
                torch.cuda.synchronize(device)
                times.append(a.elapsed_time(b))
            return {"median": statistics.median(times), "p20": _quantile(times, 0.2),
                    "p80": _quantile(times, 0.8), "min": min(times), "max": max(times),
                    "reps": len(times), "timer": "cuda events"}
    # CPU: fewer repetitions for long calls (the first call is not counted): 3, 2 over 1 s, 1 over
    # ``long_call_s`` (the per-call budget: such a point is the method's last anyway)
    min_reps = 3 if first_call_s < 1.0 else 2 if first_call_s < long_call_s else 1
    times: List[float] = []
    while len(times) < min_reps or (sum(times) < min_total_s and len(times) < max_reps):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    ms = [t * 1e3 for t in times]
    return {"median": statistics.median(ms), "p20": _quantile(ms, 0.2), "p80": _quantile(ms, 0.8),
            "min": min(ms), "max": max(ms), "reps": len(ms), "timer": "wall"}


def peak_memory(call: Callable[[], object], device: torch.device):
    """(peak bytes allocated during ``call`` above the level before it, call's result); see the
    module docstring for how each device measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        result = call()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base), result
    from torch.profiler import ProfilerActivity, profile
    with without_profiler_banner(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = call()
    events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort()
    cur = peak = 0
    for _, n in events:
        cur += n
        peak = max(peak, cur)
    return int(peak), result


@contextlib.contextmanager
def without_profiler_banner():
    """torch.profiler's C++ side (kineto, SyncActivityProfilerHandler) writes ``USDT: ... profiler_start``
    and ``... profiler_stop`` straight to file descriptor 2 for every profile, two lines per measured
    call (hundreds in a run).  Inside, fd 2 goes to a temporary file; afterwards every other line is
    passed on to stderr, so warnings and errors are kept."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):   # no real fd 2 (an embedding host): leave it as it is
        yield
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = [line for line in tmp.read().decode("utf-8", "replace").splitlines(keepends=True)
                    if not line.startswith("USDT:")]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, getattr(torch, "OutOfMemoryError", ())):
        return True
    msg = str(exc).lower()
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        "out of memory" in msg or "not enough memory" in msg or isinstance(exc, MemoryError))


# --------------------------------------------------------------------------------------
# references
# --------------------------------------------------------------------------------------


def rel_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||a - e||_2 / ||e||_2 in float64 (the project's error measure, tests/helpers.py)."""
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(device=a.device, dtype=torch.float64)
    num = float((a - e).pow(2).mean().sqrt())
    den = float(e.pow(2).mean().sqrt())
    return num / den if den > 0 else num


def check_rows(T: int, max_rows: int = 96, seed: int = 0) -> torch.Tensor:
    """Query positions at which outputs are checked: all of them for short sequences; else the
    first and last 32 positions and a fixed random sample in between (the last rows see the
    whole sequence, so a wrong state anywhere shows up there)."""
    if T <= max_rows:
        return torch.arange(T)
    g = torch.Generator().manual_seed(seed)
    mid = torch.randperm(T - 64, generator=g)[: max_rows - 64] + 32
    return torch.cat([torch.arange(32), mid.sort().values, torch.arange(T - 32, T)])


# Tolerances on the relative RMS error vs the float64 reference (inputs rounded to the tested
# dtype first, so only the method's own arithmetic is measured).  Looser than the unit tests'
# table because benchmark sequences are up to 1M tokens long.
TOLERANCE = {torch.float32: {"output": 1e-4, "grads": 1e-3},
             torch.bfloat16: {"output": 5e-2, "grads": 5e-2},
             torch.float16: {"output": 1e-2, "grads": 1e-2}}


# --------------------------------------------------------------------------------------
# budgets and fits
# --------------------------------------------------------------------------------------


@dataclass
class Budget:
    time_s: float = 4.0                 # largest predicted single call (fwd or fwd+bwd)
    mem_bytes: float = 3.0 * 1024 ** 3  # largest predicted peak memory of a call
    deadline: Optional[float] = None    # time.perf_counter() after which no new point is started


@dataclass
class Tracker:
    """Last measured point per (method, mode, shape) and the ones that ran out of budget."""
    last: Dict[tuple, dict] = field(default_factory=dict)
    prev: Dict[tuple, dict] = field(default_factory=dict)     # the point before last
    dead: Dict[tuple, tuple] = field(default_factory=dict)   # key -> (status, reason) for larger T


def scale_factor(p: int, B: int, T: int, B0: int, T0: int) -> float:
    """Cost of B sequences of length T relative to B0 of length T0, for cost ~ B * T^p."""
    return (B * T ** p) / (B0 * T0 ** p)


def fit_loglog_slope(Ts: Sequence[float], ys: Sequence[float]) -> Optional[float]:
    """Least-squares slope of log(y) against log(T); None with fewer than 2 distinct T."""
    pts = [(math.log(t), math.log(y)) for t, y in zip(Ts, ys) if y and y > 0]
    if len({p[0] for p in pts}) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    sxy = sum((p[0] - mx) * (p[1] - my) for p in pts)
    return sxy / sxx


def crossover(Ts: Sequence[int], ours: Dict[int, float], theirs: Dict[int, float]) -> dict:
    """Smallest T from which ``ours`` is faster than ``theirs`` at every larger common T.

    Between the last T where ours is slower and the next one, the crossing is interpolated in
    log-log space.  Returns {"T": value or None, "note": how it was found}."""
    common = [t for t in sorted(Ts) if t in ours and t in theirs]
    if not common:
        return {"T": None, "note": "no T measured for both"}
    faster = [ours[t] < theirs[t] for t in common]
    if len(common) == 1:
        t = common[0]
        return {"T": None, "note": f"one T only: at T={t} ours {'faster' if faster[0] else 'slower'} "
                                   f"({ours[t]:.3g} ms vs {theirs[t]:.3g} ms)"}
    if all(faster):
        return {"T": None, "note": f"ours faster at every common T ({common[0]}..{common[-1]}); crossover <= {common[0]}"}
    if not faster[-1]:
        return {"T": None, "note": f"ours slower up to the largest common T = {common[-1]}"}
    i = max(j for j, f in enumerate(faster) if not f)  # last T where ours is slower
    t0, t1 = common[i], common[i + 1]
    r0 = math.log(ours[t0] / theirs[t0])
    r1 = math.log(ours[t1] / theirs[t1])
    frac = r0 / (r0 - r1) if r0 != r1 else 0.0
    tx = math.exp(math.log(t0) + frac * (math.log(t1) - math.log(t0)))
    return {"T": round(tx), "note": f"log-log interpolation between T={t0} (ours slower) and T={t1} (ours faster)"}


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def command_line() -> str:
    mod = sys.modules.get("__main__")
    spec = getattr(mod, "__spec__", None)
    head = f"python -m {spec.name}" if spec is not None and spec.name else f"python {sys.argv[0]}"
    return " ".join([head, shlex.join(sys.argv[1:])]).strip()
