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
        meta={"bytes_per_token_model": "each kernel reads its inputs and writes its outputs once: fused "
                                       "2D (fwd) / 5D (fwd+bwd) elements per token, unfused 8D+4R / 23D+10R"})


if __name__ == "__main__":
    main()
