"""Decayed-scan backends side by side (issue 2): forward and forward+backward time and peak memory
of every backend over a sweep of T at fixed tokens per batch, with the fitted log-log slope of time
per sequence vs T (linear-time backends ~1, the quadratic naive one ~2).

    python -m benchmarks.bench_scan                       # JSON on stdout, table on stderr
    python -m benchmarks.bench_scan --json scan.json --T 512,1024,2048 --D 256 --R 16
"""
from __future__ import annotations

from . import cli

BACKENDS = ["scan/triton", "scan/chunked", "scan/naive", "scan/recurrent"]


def main(argv=None) -> dict:
    return cli.op_sweep_main("scan", __doc__, BACKENDS, argv)


if __name__ == "__main__":
    main()
