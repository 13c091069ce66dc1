"""The K2 mixer (issue 3): the fused Triton kernel vs the unfused composition (Triton scan + Triton
conv + elementwise) vs the PyTorch references (chunked, recurrent, naive scans + F.conv1d);
forward and forward+backward time, peak memory and modelled bytes moved per token.

    python -m benchmarks.bench_k2                          # JSON on stdout, table on stderr
    python -m benchmarks.bench_k2 --json k2.json --T 1024,4096 --D 256 --R 16
"""
from __future__ import annotations

from . import cli

VARIANTS = ["k2/triton_fused", "k2/triton_unfused", "k2/chunked", "k2/recurrent", "k2/naive"]


def main(argv=None) -> dict:
    return cli.op_sweep_main(
        "k2", __doc__, VARIANTS, argv, with_K=True,
        meta={"bytes_per_token_model": "benchmarks/traffic.py: per launch, from the kernels' loads and stores "
                                       "(a model, not a measurement); the per-launch table is in traffic_model",
              "traffic_model": _traffic()})


def _traffic():
    from .traffic import Shape, model
    return [model(p, Shape(1, T, D, 16, 8, 2)) for D in (64, 256, 1024) for T in (2048, 65536, 1 << 20)
            for p in ("fused", "old_fused", "unfused", "chunked")]


if __name__ == "__main__":
    main()
