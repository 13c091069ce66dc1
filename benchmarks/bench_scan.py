"""Decayed-scan backends side by side (issue 2): forward and forward+backward time and peak memory
of every backend over a sweep of T at fixed tokens per batch, with the fitted log-log slope of time
per sequence vs T (linear-time backends ~1, the quadratic naive one ~2).

    python -m benchmarks.bench_scan                       # JSON on stdout, table on stderr
    python -m benchmarks.bench_scan --json scan.json --T 512,1024,2048 --D 256 --R 16
"""
from __future__ import annotations

import argparse

from . import cli
from .methods import select
from .report import tables
from .sweep import Log, SweepSpec, document, run_sweep

BACKENDS = ["scan/triton", "scan/chunked", "scan/naive", "scan/recurrent"]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=cli.int_list, default=cli.int_list("128,256,512,1024,2048,4096,8192,16384"))
    p.add_argument("--tokens", type=int, default=16384, help="tokens per batch (B = tokens // T, at least 1)")
    p.add_argument("--D", type=cli.int_list, default=[256])
    p.add_argument("--R", type=cli.int_list, default=[16])
    p.add_argument("--dtypes", type=cli.str_list, default=["fp32"])
    p.add_argument("--modes", type=cli.str_list, default=["fwd", "fwd_bwd"])
    p.add_argument("--methods", type=cli.str_list, default=BACKENDS,
                   help="comma list of method names (default: every decayed_scan backend)")
    p.add_argument("--json", default="-", help="output file, '-' for stdout")
    cli.add_common(p)
    args = p.parse_args(argv)
    device, threads, budget = cli.setup(args)
    spec = SweepSpec("scan", select(args.methods), args.T, args.tokens, args.D, args.R, args.dtypes, args.modes)
    log = Log(args.quiet)
    records, copies = run_sweep(spec, device, budget, log, grad_check=not args.no_grad_check)
    doc = document([spec], records, copies, device, threads,
                   {"note": args.note, "flush_denormal": args.flush_denormal,
                    "budget": {"time_s": budget.time_s, "mem_bytes": budget.mem_bytes}})
    cli.write_json(doc, args.json)
    log(tables(doc))
    return doc


if __name__ == "__main__":
    main()
