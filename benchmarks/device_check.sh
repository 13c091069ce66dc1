#!/usr/bin/env bash
# One prepared run on a CUDA machine: install (which compiles ROSA's C helper: Triton needs a C
# compiler there anyway), the compile gate with the driver's register counts, the Triton/CUDA
# tests, the benchmark harness.
# Everything lands in $OUT (at most 8 files: the device tool returns no more):
#   machine.txt (+ compile gate summary)  kernels.md  tests.log  bench.log  bench/results.json
#   bench/results.md  bench_extra.tgz (the plots and the two K2 runs below: k2_1m_tokens.json,
#   fused vs unfused at 1M tokens per batch, and k2_b1.json, the fused mixer at B = 1, T 1K..1M)
#
# The flash-linear-attention peer travels as wheels in the git-ignored .whl/ (carry it):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform any -d .whl flash-linear-attention==0.6.0 fla-core==0.6.0
# Budget (seconds) by environment: GATE_S (default 120), TEST_S (default 200), BENCH_MIN (default 2
# minutes of new points), K2_MIN (default 1.5 minutes for each K2 run).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/_scratch/device}
mkdir -p "$OUT/bench"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/machine.txt" 2>&1 \
    || { cat "$OUT/machine.txt"; exit 1; }
{
    date -u; git rev-parse HEAD 2>/dev/null
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
    python3 -c "import fla; print('fla', fla.__version__)" 2>&1 | tail -1
} >>"$OUT/machine.txt" 2>&1

# the offline compile gate on the device: ptxas's counts beside the driver's, for the GPU's own arch
arch=$(python3 -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'sm_{m}{n}')")
timeout "${GATE_S:-120}" python3 -m kop_triton.kernels.report --set ci --targets "$arch" --jobs 8 --device \
    --md "$OUT/kernels.md" >"$OUT/kernels.log" 2>&1
echo "compile report exit code $?" >>"$OUT/kernels.log"
cat "$OUT/kernels.log" >>"$OUT/machine.txt"; rm -f "$OUT/kernels.log"

timeout "${TEST_S:-200}" python3 -m pytest -q -x -p no:cacheprovider -n 4 \
    tests/test_scan.py tests/test_conv.py tests/test_k2.py tests/test_module_koperator.py \
    tests/test_model.py tests/test_eval.py tests/test_rosa.py \
    tests/test_rosa_model.py tests/test_decode.py >"$OUT/tests.log" 2>&1
echo "tests exit code $?" >>"$OUT/tests.log"

timeout $(( ${BENCH_MIN:-2} * 60 + 120 )) python3 -m benchmarks.run --max-minutes "${BENCH_MIN:-2}" \
    --out "$OUT/bench" --note "device_check.sh on a lent GPU" >"$OUT/bench.log" 2>&1
echo "bench exit code $?" >>"$OUT/bench.log"

# issue 10's GPU checks: fused vs unfused K2 forward + backward at 1M tokens per batch (D = 1024,
# R = 16, bf16; ratio and fraction of the copy bound), and the fused mixer's time vs T at B = 1
K2="python3 -m benchmarks.bench_k2 --D 1024 --R 16 --K 8 --dtypes bf16 --quiet --max-minutes ${K2_MIN:-1.5}"
timeout 200 $K2 --T 1k,4k,16k,64k,256k,1m --tokens 1048576 --methods k2/triton_fused,k2/triton_unfused \
    --json "$OUT/bench/k2_1m_tokens.json" >>"$OUT/bench.log" 2>&1
echo "k2 1M-token run exit code $?" >>"$OUT/bench.log"
timeout 200 $K2 --T 1k,4k,16k,64k,256k,1m --tokens 1 --methods k2/triton_fused \
    --json "$OUT/bench/k2_b1.json" >>"$OUT/bench.log" 2>&1
echo "k2 B = 1 run exit code $?" >>"$OUT/bench.log"
(cd "$OUT/bench" && tar czf ../bench_extra.tgz $(ls ./*.png ./k2_*.json 2>/dev/null) && rm -f ./*.png ./k2_*.json)

tail -n 3 "$OUT/tests.log" "$OUT/bench.log"
