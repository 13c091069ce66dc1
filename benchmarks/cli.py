"""Command-line pieces shared by the benchmark scripts."""
from __future__ import annotations

import argparse
import json
import os
import sys

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


def setup(args):
    """Device, threads, budget from the common arguments."""
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
