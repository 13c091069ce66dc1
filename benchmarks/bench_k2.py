"""The K2 mixer (issue 3): the fused Triton kernel vs the unfused composition (Triton scan + Triton
conv + elementwise) vs the PyTorch references (chunked, recurrent, naive scans + F.conv1d);
forward and forward+backward time, peak memory and modelled bytes moved per token.

    python -m benchmarks.bench_k2                          # JSON on stdout, table on stderr
    python -m benchmarks.bench_k2 --json k2.json --T 1024,4096 --D 256 --R 16
"""
from __future__ import annotations

import argparse

from . import cli
from .methods import select
from .report import tables
from .sweep import Log, SweepSpec, document, run_sweep

VARIANTS = ["k2/triton_fused", "k2/triton_unfused", "k2/chunked", "k2/recurrent", "k2/naive"]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=cli.int_list, default=cli.int_list("128,256,512,1024,2048,4096,8192,16384"))
    p.add_argument("--tokens", type=int, default=16384, help="tokens per batch (B = tokens // T, at least 1)")
    p.add_argument("--D", type=cli.int_list, default=[256])
    p.add_argument("--R", type=cli.int_list, default=[16])
    p.add_argument("--K", type=int, default=8, help="Kbase kernel taps")
    p.add_argument("--dtypes", type=cli.str_list, default=["fp32"])
    p.add_argument("--modes", type=cli.str_list, default=["fwd", "fwd_bwd"])
    p.add_argument("--methods", type=cli.str_list, default=VARIANTS)
    p.add_argument("--json", default="-", help="output file, '-' for stdout")
    cli.add_common(p)
    args = p.parse_args(argv)
    device, threads, budget = cli.setup(args)
    spec = SweepSpec("k2", select(args.methods), args.T, args.tokens, args.D, args.R, args.dtypes, args.modes,
                     K=args.K)
    log = Log(args.quiet)
    records, copies = run_sweep(spec, device, budget, log, grad_check=not args.no_grad_check)
    doc = document([spec], records, copies, device, threads,
                   {"note": args.note, "flush_denormal": args.flush_denormal,
                    "budget": {"time_s": budget.time_s, "mem_bytes": budget.mem_bytes},
                    "bytes_per_token_model": "each kernel reads its inputs and writes its outputs once: fused "
                                             "2D (fwd) / 5D (fwd+bwd) elements per token, unfused 8D+4R / 23D+10R"})
    cli.write_json(doc, args.json)
    log(tables(doc))
    return doc


if __name__ == "__main__":
    main()
