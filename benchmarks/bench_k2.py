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
              "traffic_model": _traffic(), "perf_model": perf_model_rows()})


def _traffic():
    from .traffic import Shape, model
    return [model(p, Shape(1, T, D, 16, 8, 2)) for D in (64, 256, 1024) for T in (2048, 65536, 1 << 20)
            for p in ("fused", "old_fused", "unfused", "chunked")]


def perf_model_rows(path=None) -> dict:
    """The performance model's prediction per launch and per op (benchmarks/perf_model.py, a model,
    not a measurement) from its committed JSON, which names the commit it priced: beside the
    timings of a GPU run (benchmarks/model_check.py measures the same launches)."""
    import json
    import os
    path = path or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "model",
                                "k2_perf_model_bf16_R16_K8.json")
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        return {"label": "model, not a measurement", "error": f"cannot read {path}: {e}"}
    keep = ("phase", "kernel", "traffic_name", "programs", "bytes_per_token", "dependent_steps", "warps_per_sm",
            "time_s", "bound", "limit")
    return {"label": doc["label"], "source": os.path.relpath(path, os.path.dirname(os.path.dirname(
                os.path.abspath(__file__)))), "priced_commit": doc.get("priced_commit"), "gpu": doc["gpu"]["name"],
            "shapes": [{"shape": sh["shape"], "ops": sh["ops"],
                        "launches": [{k: r.get(k) for k in keep} for r in sh["launches"]]} for sh in doc["shapes"]]}


if __name__ == "__main__":
    main()
