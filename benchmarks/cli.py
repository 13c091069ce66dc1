"""Command-line pieces shared by the benchmark scripts."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

import torch

from . import harness as H


def int_list(s: str):
    out = []
    for part in s.split(","):
        part = part.strip().lower()
        if not part:
            continue
        mult = 1
        if part.endswith("k"):
            part, mult = part[:-1], 1024
        elif part.endswith("m"):
            part, mult = part[:-1], 1024 * 1024
        out.append(int(part) * mult)
    if not out or any(v < 1 for v in out):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of positive integers, got {s!r}")
    return out


def str_list(s: str):
    return [p.strip() for p in s.split(",") if p.strip()]


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (cuda when available) | cpu | cuda[:i]")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: every core); recorded in the JSON")
    p.add_argument("--time-budget", type=float, default=None,
                   help="largest predicted seconds for one call; bigger runs are recorded as over budget")
    p.add_argument("--mem-budget", type=float, default=None,
                   help="largest predicted peak memory of one call in GiB")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="wall-time limit: points not started by then are recorded as over budget")
    p.add_argument("--no-grad-check", action="store_true", help="check forward outputs only")
    p.add_argument("--flush-denormal", action="store_true",
                   help="torch.set_flush_denormal(True) on CPU (off by default: what a user gets)")
    p.add_argument("--note", default=None, help="free text stored in the JSON (e.g. 'machine shared')")
    p.add_argument("--quiet", action="store_true", help="no progress log on stderr")


def check_common(args) -> None:
    """The common flags' values, else a ValueError naming the flag (before anything is measured)."""
    import math
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads} (leave it out to use every core)")
    for flag, v in (("--time-budget", args.time_budget), ("--mem-budget", args.mem_budget),
                    ("--max-minutes", args.max_minutes)):
        if v is not None and not (v > 0 and math.isfinite(v)):
            raise ValueError(f"{flag} must be a finite number > 0, got {v} (leave it out for no limit of your own)")


def setup(args):
    """Device, threads, budget from the common arguments."""
    check_common(args)
    device = H.pick_device(args.device)
    threads = H.set_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False   # fp32 means fp32 (project rule: no TF32)
        torch.backends.cudnn.allow_tf32 = False
    if args.flush_denormal:
        torch.set_flush_denormal(True)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = H.Budget(time_s=2.0, mem_bytes=0.8 * free)
    else:
        budget = H.Budget()
    if args.time_budget is not None:
        budget.time_s = args.time_budget
    if args.mem_budget is not None:
        budget.mem_bytes = args.mem_budget * 1024 ** 3
    if args.max_minutes is not None:
        import time
        budget.deadline = time.perf_counter() + 60.0 * args.max_minutes
    return device, threads, budget


def _round(x, digits: int = 5):
    """Floats to ``digits`` significant digits (timings are not better than that), recursively."""
    if isinstance(x, float):
        return float(f"{x:.{digits}g}")
    if isinstance(x, dict):
        return {k: _round(v, digits) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_round(v, digits) for v in x]
    return x


def write_json(doc: dict, path: str) -> None:
    # compact, floats to 5 significant digits: committed results stay small
    text = json.dumps(_round(doc), default=str, separators=(",", ":"))
    if path == "-":
        sys.stdout.write(text + "\n")
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text + "\n")
    os.replace(tmp, path)


def op_sweep_main(op: str, doc: str, default_methods, argv=None, with_K: bool = False,
                  meta: Optional[dict] = None) -> dict:
    """The per-op scripts (bench_scan, bench_k2): one T sweep of one op's methods, JSON out."""
    from .methods import select
    from .report import tables
    from .sweep import Log, SweepSpec, document, run_sweep

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int_list, default=int_list("128,256,512,1024,2048,4096,8192,16384"))
    p.add_argument("--tokens", type=int, default=16384, help="tokens per batch (B = tokens // T, at least 1)")
    p.add_argument("--D", type=int_list, default=[256])
    p.add_argument("--R", type=int_list, default=[16])
    if with_K:
        p.add_argument("--K", type=int, default=8, help="Kbase kernel taps")
    p.add_argument("--dtypes", type=str_list, default=["fp32"])
    p.add_argument("--modes", type=str_list, default=["fwd", "fwd_bwd"])
    p.add_argument("--methods", type=str_list, default=list(default_methods),
                   help=f"comma list of method names (default: {','.join(default_methods)})")
    p.add_argument("--json", default="-", help="output file, '-' for stdout")
    add_common(p)
    args = p.parse_args(argv)
    device, threads, budget = setup(args)
    extra = {"K": args.K} if with_K else {}
    spec = SweepSpec(op, select(args.methods), args.T, args.tokens, args.D, args.R, args.dtypes, args.modes,
                     **extra)
    log = Log(args.quiet)
    records, copies = run_sweep(spec, device, budget, log, grad_check=not args.no_grad_check)
    out = document([spec], records, copies, device, threads,
                   {"note": args.note, "flush_denormal": args.flush_denormal,
                    "budget": {"time_s": budget.time_s, "mem_bytes": budget.mem_bytes}, **(meta or {})})
    write_json(out, args.json)
    log(tables(out))
    return out
