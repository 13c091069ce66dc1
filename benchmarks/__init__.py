"""Benchmarks for kop-triton: ``python -m benchmarks.run`` (the harness), ``benchmarks.bench_scan``,
``benchmarks.bench_k2``.  See benchmarks/README.md."""
