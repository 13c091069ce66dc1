"""The sweep engine: for each shape, T ascending, every method: check against the float64
reference, then time and measure memory; budgets, OOM and missing kernels are recorded, never raised."""
from __future__ import annotations

import gc
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from . import harness as H
from .methods import Method, Problem, grad_reference, op_min_bytes, reference_rows, select_rows

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MODES = ("fwd", "fwd_bwd")
GRAD_CHECK_MAX_T = 65536
GRAD_NAIVE_MAX_BYTES = 256 * 1024 ** 2   # above this the float64 gradient reference is the chunked algorithm


@dataclass
class SweepSpec:
    name: str
    methods: List[Method]
    Ts: List[int]
    tokens: int                       # tokens per batch: B = max(1, tokens // T)
    Ds: List[int] = field(default_factory=lambda: [256])
    Rs: List[int] = field(default_factory=lambda: [16])
    dtypes: List[str] = field(default_factory=lambda: ["fp32"])
    modes: List[str] = field(default_factory=lambda: list(MODES))
    K: int = 8
    long_Ts: List[int] = field(default_factory=list)   # only for methods with long_ok (1M on GPU)

    def describe(self) -> dict:
        return {"name": self.name, "methods": [m.name for m in self.methods], "T": self.Ts,
                "long_T": self.long_Ts, "tokens_per_batch": self.tokens, "D": self.Ds, "R": self.Rs,
                "dtypes": self.dtypes, "modes": self.modes, "K": self.K}


class Log:
    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.t0 = time.perf_counter()

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(f"[{time.perf_counter() - self.t0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def _make_call(m: Method, inp: dict, mode: str, dy: Optional[torch.Tensor]):
    if mode == "fwd":
        def call():
            with torch.no_grad():
                return m.fn(inp)
        return call
    leaves = [t for t in inp.values() if t.requires_grad]

    def call():
        for t in leaves:
            t.grad = None
        out = m.fn(inp)
        out.backward(dy)
        return out.detach()
    return call


def _clear_grads(inp: dict) -> None:
    for t in inp.values():
        t.grad = None


def _sizeof(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def measure_copy(B, T, D, dtype, device, log) -> dict:
    """The bandwidth bound: a device-to-device copy of x (B, T, D) into y (read x, write y)."""
    rec = {"B": B, "T": T, "D": D, "dtype": DTYPE_NAMES[dtype], "bytes": 2 * B * T * D * _sizeof(dtype)}
    try:
        x = torch.randn(B, T, D, device=device).to(dtype)
        y = torch.empty_like(x)
        call = lambda: y.copy_(x)  # noqa: E731
        t0 = time.perf_counter()
        call()
        H.sync(device)
        tm = H.time_call(call, device, first_call_s=time.perf_counter() - t0)
        rec.update(status="ok", time_ms=tm, bandwidth_GBps=rec["bytes"] / (tm["median"] * 1e-3) / 1e9)
    except Exception as exc:  # noqa: BLE001 - recorded, never raised
        rec.update(status="oom" if H.is_oom(exc) else "error", reason=f"{type(exc).__name__}: {exc}"[:300])
    log(f"copy bound B={B} T={T} D={D} {rec['dtype']}: "
        + (f"{rec['bandwidth_GBps']:.1f} GB/s" if rec["status"] == "ok" else rec["status"]))
    return rec


def _check(m: Method, prob: Problem, inp: dict, mode: str, out: torch.Tensor, dy, budget: H.Budget,
           grad_check: bool) -> dict:
    """Errors of the method's first call vs the float64 reference (output at sampled rows; grads)."""
    key = ("rows", m.op)
    if key not in prob.refs:
        rows = H.check_rows(prob.T)
        prob.refs[key] = (rows, reference_rows(m.op, inp, rows.to(prob.device)))
    rows, ref = prob.refs[key]
    err = {"output": H.rel_rms(select_rows(m.op, out, rows), ref),
           "output_reference": f"naive formula in float64 at {len(rows)} of {prob.T} positions"}
    if mode == "fwd_bwd":
        if not grad_check:
            err["grads"], err["grads_reference"] = None, "not checked (--no-grad-check)"
            return err
        if prob.T > GRAD_CHECK_MAX_T:
            err["grads"], err["grads_reference"] = None, (f"not checked at T > {GRAD_CHECK_MAX_T} (the float64 "
                                                          "reference would dominate the run); checked at smaller T")
            return err
        gkey = ("grads", m.op)
        if gkey not in prob.refs:
            prob.refs[gkey] = grad_reference(m.op, inp, dy, prob.B, prob.T, prob.D, prob.R,
                                             mem_limit=min(budget.mem_bytes, GRAD_NAIVE_MAX_BYTES))
        grads, name = prob.refs[gkey]
        err["grads_reference"] = name
        if grads is None:
            err["grads"] = None
        else:
            err["grads"] = {n: (H.rel_rms(t.grad, grads[n]) if t.grad is not None else None)
                            for n, t in inp.items()}
    return err


def _tolerance_failure(err: dict, dtype: torch.dtype) -> Optional[str]:
    tol = H.TOLERANCE[dtype]
    if not err["output"] <= tol["output"]:
        return f"output error {err['output']:.2e} > {tol['output']:.0e}"
    for n, e in (err.get("grads") or {}).items():
        if e is None:
            return f"no gradient reached input {n!r}"
        if not e <= tol["grads"]:
            return f"gradient error of {n!r} {e:.2e} > {tol['grads']:.0e}"
    return None


# the benchmarks/traffic.py path of each K2 method
_TRAFFIC_PATHS = {"k2/triton_fused": "fused", "k2/triton_unfused": "unfused", "k2/chunked": "chunked"}


def _traffic_at(m: Method, B, T, D, R, K, s, mode):
    """The traffic model's summary at this point (bytes per token, D-wide passes, grids): a model."""
    path = _TRAFFIC_PATHS.get(m.name)
    if path is None:
        return None
    from .traffic import Shape, model
    doc = model(path, Shape(B, T, D, R, K or 8, s))
    keep = ("bytes_per_token", "passes", "smallest_parallel_grid", "longest_walk")
    return {md: {k: doc[md][k] for k in keep} for md in (("fwd",) if mode == "fwd" else ("fwd", "bwd"))}


def run_point(m: Method, prob: Problem, mode: str, tracker: H.Tracker, budget: H.Budget,
              device: torch.device, copy: dict, grad_check: bool, log) -> dict:
    B, T, D, R, dtype = prob.B, prob.T, prob.D, prob.R, prob.dtype
    s = _sizeof(dtype)
    rec = {"method": m.name, "op": m.op, "group": m.group, "label": m.label, "mode": mode,
           "dtype": DTYPE_NAMES[dtype], "B": B, "T": T, "D": D, "R": R, "K": prob.K, "tokens": B * T,
           "op_min_bytes_per_token": op_min_bytes(m.op, D, R, s, mode),
           "bytes_per_token_model": m.bytes_model(D, R, s, mode) if m.bytes_model else None,
           "traffic_model": _traffic_at(m, B, T, D, R, prob.K, s, mode)}
    key = (m.name, mode)

    def done(status, reason=None, **kw):
        rec.update(status=status, reason=reason, **kw)
        log(f"{m.name:22s} {mode:7s} T={T:<7d} B={B:<4d} " + (reason if reason else status)
            + (f"  {rec['time_ms']['median']:.2f} ms  {rec['peak_mem_bytes'] / H.MB:.1f} MB  "
               f"err {rec['error']['output']:.1e}" if status == "ok" else ""))
        return rec

    why = m.unavailable(device)
    if why:
        return done("skipped", why)
    if budget.deadline is not None and time.perf_counter() > budget.deadline:
        return done("over_budget", "skipped: the run's wall-time limit (--max-minutes) was reached")
    if key in tracker.dead:
        return done(*tracker.dead[key])
    # predicted cost from the last measured point (or the analytic estimate for the first one)
    last = tracker.last.get(key)
    pred_t = pred_m = None
    if last is not None:
        # the method's known exponent, or the one observed between its last two points when steeper
        # (a one-step-per-token loop is interpreter-bound: its batch time grows with T at fixed tokens)
        p_t, p_m = m.p_time, m.p_mem
        prev = tracker.prev.get(key)
        if prev is not None and prev["T"] < last["T"]:
            lt = math.log(last["T"] / prev["T"])
            per_seq = lambda pt, k: pt[k] / pt["B"]  # noqa: E731
            if per_seq(prev, "s") > 0 and per_seq(last, "s") > 0:
                p_t = min(3.0, max(p_t, math.log(per_seq(last, "s") / per_seq(prev, "s")) / lt))
            if per_seq(prev, "mem") > 0 and per_seq(last, "mem") > 0:
                p_m = min(3.0, max(p_m, math.log(per_seq(last, "mem") / per_seq(prev, "mem")) / lt))
        pred_t = last["s"] * H.scale_factor(p_t, B, T, last["B"], last["T"])
        pred_m = last["mem"] * H.scale_factor(p_m, B, T, last["B"], last["T"])
    elif mode == "fwd_bwd" and (m.name, "fwd") in tracker.last and tracker.last[(m.name, "fwd")]["T"] == T:
        fwd = tracker.last[(m.name, "fwd")]        # first fwd+bwd point: about 3 forwards
        pred_t, pred_m = 3 * fwd["s"], 3 * fwd["mem"]
    if m.mem_estimate is not None:
        est = m.mem_estimate(B, T, D, R, s, mode)
        pred_m = est if pred_m is None else max(pred_m, est)
    if pred_t is not None and pred_t > budget.time_s:
        tracker.dead[key] = ("over_budget", f"skipped: over budget (predicted {pred_t:.1f} s per call > "
                                            f"{budget.time_s:g} s, at T={T})")
        return done(*tracker.dead[key], predicted_s=pred_t)
    if pred_m is not None and pred_m > budget.mem_bytes:
        tracker.dead[key] = ("over_budget", f"skipped: over budget (predicted {pred_m / 2**30:.2f} GiB peak > "
                                            f"{budget.mem_bytes / 2**30:.2f} GiB, at T={T})")
        return done(*tracker.dead[key], predicted_mem_bytes=pred_m)
    try:
        inp = prob.inputs(m.op)
        dy = None
        if mode == "fwd_bwd":
            like = inp["q"] if m.op == "attention" else inp["v"] if m.op == "scan" else inp["x"]
            dy = prob.cotangent(m.op, like)
        call = _make_call(m, inp, mode, dy)
        _clear_grads(inp)        # leaves are shared by the methods of an op: free the last one's grads
        t0 = time.perf_counter()
        if device.type == "cpu":
            # the first call (checked, not timed) also gives the peak memory: one call fewer per point
            mem, out = H.peak_memory(call, device)
        else:
            out = call()
        H.sync(device)
        first_s = time.perf_counter() - t0
        err = _check(m, prob, inp, mode, out, dy, budget, grad_check)
        del out
        bad = _tolerance_failure(err, dtype)
        if bad:
            tracker.dead[key] = ("wrong", f"not run: failed the reference check at T={T}")
            return done("wrong", f"failed the reference check: {bad}", error=err)
        leaves = [t for t in inp.values() if t.requires_grad] if mode == "fwd_bwd" else None
        tm = H.time_call(call, device, first_call_s=first_s, grad_to_none=leaves, long_call_s=budget.time_s)
        if device.type == "cuda":
            _clear_grads(inp)
            mem, _ = H.peak_memory(call, device)   # after warm-up: compilation and autotuning excluded
    except NotImplementedError as exc:
        tracker.dead[key] = ("skipped", f"skipped: not implemented ({exc})")
        return done(*tracker.dead[key])
    except Exception as exc:  # noqa: BLE001 - a failing method is a result, not a crash
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if H.is_oom(exc):
            tracker.dead[key] = ("oom", f"not run: out of memory at T={T}")
            return done("oom", f"{type(exc).__name__}: {exc}"[:300])
        return done("error", f"{type(exc).__name__}: {exc}"[:300])
    sec = tm["median"] * 1e-3
    if key in tracker.last:
        tracker.prev[key] = tracker.last[key]
    tracker.last[key] = {"B": B, "T": T, "s": sec, "mem": mem}
    if sec > budget.time_s:
        tracker.dead[key] = ("over_budget", f"skipped: over budget (measured {sec:.1f} s per call > "
                                            f"{budget.time_s:g} s at T={T})")
    extra = {"time_ms": tm, "time_per_seq_ms": tm["median"] / B, "tokens_per_s": B * T / sec,
             "peak_mem_bytes": mem, "error": err, "copy_bound_ms": None, "fraction_of_copy_bound": None}
    if copy.get("status") == "ok":
        bound_ms = rec["op_min_bytes_per_token"] * B * T / (copy["bandwidth_GBps"] * 1e9) * 1e3
        extra.update(copy_bound_ms=bound_ms, fraction_of_copy_bound=bound_ms / tm["median"])
    return done("ok", None, **extra)


def run_sweep(spec: SweepSpec, device: torch.device, budget: H.Budget, log, grad_check: bool = True):
    """Run one sweep; returns (records, copy_records)."""
    records, copies = [], []
    for dname in spec.dtypes:
        dtype = DTYPES[dname]
        for D in spec.Ds:
            for R in spec.Rs:
                tracker = H.Tracker()
                has_long = any(m.long_ok for m in spec.methods) and spec.long_Ts
                Ts = sorted(set(spec.Ts) | (set(spec.long_Ts) if has_long else set()))
                for T in Ts:
                    methods = [m for m in spec.methods if T in spec.Ts or m.long_ok]
                    B = max(1, spec.tokens // T)
                    log(f"--- {spec.name}: {dname} D={D} R={R} T={T} B={B}")
                    prob = Problem(B, T, D, R, spec.K, dtype, device)
                    copy = measure_copy(B, T, D, dtype, device, log)
                    copy["sweep"] = spec.name
                    copies.append(copy)
                    for mode in spec.modes:
                        for m in methods:
                            rec = run_point(m, prob, mode, tracker, budget, device, copy, grad_check, log)
                            rec["sweep"] = spec.name
                            records.append(rec)
                    del prob
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    return records, copies


# --------------------------------------------------------------------------------------
# summaries
# --------------------------------------------------------------------------------------


def _groups(records):
    g: Dict[tuple, List[dict]] = {}
    for r in records:
        g.setdefault((r["sweep"], r["dtype"], r["D"], r["R"], r["mode"]), []).append(r)
    return g


def slopes(records) -> List[dict]:
    """Fitted log-log slope of time per sequence (batch time / B) vs T, per method and shape.

    At fixed tokens per batch, the batch time of a linear-time method is flat in T; per sequence it
    grows like T (slope 1); a quadratic method's like T^2 (slope 2)."""
    out = []
    for (sweep, dt, D, R, mode), recs in _groups(records).items():
        by_m: Dict[str, List[dict]] = {}
        for r in recs:
            if r["status"] == "ok":
                by_m.setdefault(r["method"], []).append(r)
        for name, rs in by_m.items():
            Ts = [r["T"] for r in rs]
            sl = H.fit_loglog_slope(Ts, [r["time_per_seq_ms"] for r in rs])
            # best-of-repetitions time: less sensitive to other processes on a shared machine
            sl_min = H.fit_loglog_slope(Ts, [r["time_ms"].get("min", r["time_ms"]["p20"]) / r["B"] for r in rs])
            ms = H.fit_loglog_slope(Ts, [r["peak_mem_bytes"] / r["B"] for r in rs if r["peak_mem_bytes"] > 0])
            if sl is None:
                continue
            out.append({"sweep": sweep, "dtype": dt, "D": D, "R": R, "mode": mode, "method": name,
                        "time_slope": round(sl, 3), "time_slope_min": round(sl_min, 3), "memory_per_seq_slope": None if ms is None else round(ms, 3),
                        "T_range": [min(Ts), max(Ts)], "points": len(Ts)})
    return out


def crossovers(records, ours=("scan/triton", "k2/triton_fused", "scan/chunked", "k2/chunked"),
               theirs="attention/sdpa") -> List[dict]:
    """T from which each of our methods beats causal softmax attention (same tokens, same D)."""
    out = []
    for (sweep, dt, D, R, mode), recs in _groups(records).items():
        att = {r["T"]: r["time_ms"]["median"] for r in recs if r["method"] == theirs and r["status"] == "ok"}
        if len(att) < 1:
            continue
        for name in ours:
            mine = {r["T"]: r["time_ms"]["median"] for r in recs if r["method"] == name and r["status"] == "ok"}
            if not mine:
                continue
            c = H.crossover(sorted(set(att) | set(mine)), mine, att)
            out.append({"sweep": sweep, "dtype": dt, "D": D, "R": R, "mode": mode, "ours": name,
                        "vs": theirs, "crossover_T": c["T"], "note": c["note"]})
    return out


def document(specs: Sequence[SweepSpec], records, copies, device, threads: int, extra: dict) -> dict:
    info = H.machine_info(device)
    info["load_average_at_start"] = H.LOAD_AT_START
    info["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return {
        "schema": "kop-triton-bench/1",
        "created": H.now_iso(),
        "command": H.command_line(),
        "machine": info,
        "settings": {"torch_threads": threads, "flush_denormal": extra.pop("flush_denormal", None),
                     "timing_method": H.TIMING_METHOD[info["kind"]],
                     "memory_method": H.MEMORY_METHOD[info["kind"]],
                     "tolerance": {DTYPE_NAMES[k]: v for k, v in H.TOLERANCE.items()},
                     "slope_definition": "least-squares slope of log(batch time / B) vs log(T); time_slope from "
                                         "the median time, time_slope_min from the fastest repetition",
                     "copy_bound": "time of y.copy_(x) for x (B, T, D) gives the achievable bandwidth; a method's "
                                   "bound = op_min_bytes_per_token * tokens / bandwidth; fraction = bound / time"},
        "sweeps": [s.describe() for s in specs],
        **extra,
        "results": records,
        "copy_bound": copies,
        "slopes": slopes(records),
        "crossovers": crossovers(records),
    }
