#!/usr/bin/env bash
# One prepared run on a lent CUDA machine, at most 8 minutes, in order of value; or its CPU rehearsal.
#
#   bash benchmarks/device_check.sh               # the GPU run: results in $OUT (at most 8 files)
#   bash benchmarks/device_check.sh --rehearse    # every step on a CPU machine at tiny sizes
#   bash benchmarks/device_check.sh --help        # --out, --work, --steps, --plan
#
# The driver is benchmarks/device_check.py (standard library only: it runs before the install).
# Device tool call: timeout_s 560 (the run ends by 480 s), carry [".whl"] when wheels travel.
# Planned budget on the GPU (s); a step may also use what earlier steps left unused:
#   step     budget s ends by s  what
#   install        30        30  carried wheels, pip install -e . (ROSA's C helper), machine.txt
#   tests         180       210  pytest scan/conv/K2/module vs float64 refs, CP world of one over NCCL, -n 12, no -x; the _cuda ones serially beside
#   k2            100       310  bench_k2 fused/unfused/chunked, B 1, T 1K..1M, D 1024, R 16, bf16, fwd + fwd_bwd
#   model          40       350  model_check: fused K2 kernels profiled vs the perf model, D 64,1024 x T 64K,1M, bf16
#   gate           60       410  kernels.report --set ci --targets <GPU arch> --device --jobs 16
#   bench          50       460  benchmarks.run --max-minutes <what is left>
#   margin         20       480  archive, summary, last step's kill grace
#   total         480
# $OUT after every step: device_check.tar.gz (the whole work folder: every log, JSON, report),
# summary.json (per step: status, exit code, seconds, budget, key figures), machine.txt, tests.log,
# k2.log, model_check.md, gate.md, bench.md.
#
# Optional peers travel as wheels in the git-ignored .whl/ (name it in carry), e.g.
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform any -d .whl flash-linear-attention==0.6.0 fla-core==0.6.0
set -uo pipefail
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET
exec "${PYTHON:-python3}" -m benchmarks.device_check "$@"
