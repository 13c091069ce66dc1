# Two commands do everything on a fresh machine:  make bench  /  make test
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch 2.13.0 (CPU build) lies on this project's CI/dev disk; Triton is pinned to the lent GPU's version
# (3.6.0) so the interpreter runs the same Triton.  Without a GPU, tests/conftest.py sets TRITON_INTERPRET=1
# and the Triton kernels run through the interpreter.  On a CUDA machine with its own torch, use
# benchmarks/device_check.sh (CUDA tests + benchmarks, no venv).
DEPS   := "setuptools>=64" torch==2.13.0 triton==3.6.0 "numpy<2.4" safetensors tqdm sentencepiece matplotlib pytest hypothesis pytest-xdist \
          tensorboard \
          "transformers>=5.23,<5.24" "accelerate>=1.10,<2" requests \
          "datasets>=5,<6" "sacrebleu>=2.4,<3" "pytablewriter>=1.2,<2"
# tensorboard: only the tests need it, to read kop-train's event files back with TensorBoard's own reader
# (kop-train writes them itself, without it).
# peft (LoRA through the HF model, tests/test_hf_correctness.py) and lm-evaluation-harness for tests/test_hf*.py, without
# the dependencies its tasks do not import (scikit-learn, evaluate, rouge-score, ...): its HFLM path imports transformers,
# accelerate, requests, jinja2, tqdm and numpy; a task run through its command line (python -m kop_triton.lm_eval run,
# tests/test_hf_features.py) also needs datasets (local json files), sacrebleu (imported by lm_eval.api.metrics) and
# pytablewriter (the results table).  datasets 5 keeps transformers' huggingface_hub 2 (datasets 4 would downgrade it).
NODEPS := lm-eval==0.4.13 peft==0.21.2
STAMP  := $(VENV)/.kop-installed
JOBS   ?= 2
BENCH_FLAGS ?=
# The newest Triton release, compile-gated beside the pinned one (tests/test_gpu_compile.py runs
# its gate with this venv's python): a second small venv with the same torch (the on-disk CPU build:
# pinned, so pip never fetches a CUDA torch), that Triton and numpy.  The gate runs no interpreter,
# so numpy is not capped here (numpy 2.4 works with it).
VENV39 ?= .venv-triton39
PY39   := $(VENV39)/bin/python
DEPS39 := "setuptools>=64" torch==2.13.0 triton==3.9.0 numpy
STAMP39 := $(VENV39)/.kop-installed

.PHONY: install install-triton39 test bench clean

CC     ?= cc

# ROSA's C helper (src/kop_triton/_rosa.c) is compiled by the editable install below
$(STAMP): setup.py Makefile src/kop_triton/_rosa.c
	@command -v $(CC) >/dev/null 2>&1 || command -v gcc >/dev/null 2>&1 || command -v clang >/dev/null 2>&1 || \
	  { echo "kop-triton needs a C compiler for ROSA's helper (src/kop_triton/_rosa.c): install gcc or clang (Debian/Ubuntu: apt-get install gcc) and rerun"; exit 1; }
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -m pip install -q $(DEPS)
	$(PY) -m pip install -q --no-deps $(NODEPS)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

$(STAMP39): setup.py Makefile src/kop_triton/_rosa.c
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV39)
	$(PY39) -m pip install -q $(DEPS39)
	$(PY39) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP39)

install-triton39: $(STAMP39)

# `make test` runs three things:
#  1. the whole suite (on a machine without CUDA the Triton kernels run through the interpreter), with
#     the offline compile gate under the pinned Triton and, in .venv-triton39, the newest one;
#  2. the files whose behaviour depends on the mode, as on a GPU machine (TRITON_INTERPRET=0): on a
#     machine without CUDA the kernel tests skip, and any skip whose reason is not CUDA fails;
#  3. the race check: the tests marked `race` (every kernel and flag at small sizes) through the
#     interpreter with every grid's programs run in reversed and in a seeded shuffled order
#     (tests/grid_order.py), and a check that they launched every kernel and flag value the compile
#     gate's CI workload launches.
GPU_MODE_TESTS := tests/test_scan.py tests/test_conv.py tests/test_k2.py tests/test_flat_grids.py \
                  tests/test_module_koperator.py tests/test_no_host_sync.py tests/test_api_errors.py
RACE_TESTS     := tests/test_scan.py tests/test_conv.py tests/test_k2.py tests/test_flat_grids.py
RACE_SEED      ?= 1

test: $(STAMP) $(STAMP39)
	KOP_TRITON_NEWEST_PYTHON=$(PY39) $(PY) -m pytest -q -n $(JOBS) tests
	TRITON_INTERPRET=0 $(PY) -m pytest -q -n $(JOBS) -rs --only-cuda-skips $(GPU_MODE_TESTS)
	TRITON_INTERPRET=1 KOP_GRID_ORDER=reverse $(PY) -m pytest -q -n $(JOBS) -m race --race-coverage $(RACE_TESTS)
	TRITON_INTERPRET=1 KOP_GRID_ORDER=shuffle:$(RACE_SEED) $(PY) -m pytest -q -n $(JOBS) -m race --race-coverage $(RACE_TESTS)

bench: $(STAMP)
	$(PY) -m benchmarks.run $(BENCH_FLAGS)

clean:
	rm -rf $(VENV) $(VENV39) build src/*.egg-info src/kop_triton/_rosa*.so
