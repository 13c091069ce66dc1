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
          "transformers>=5.23,<5.24" "accelerate>=1.10,<2" requests
# tensorboard: only the tests need it, to read kop-train's event files back with TensorBoard's own reader
# (kop-train writes them itself, without it).
# lm-evaluation-harness for tests/test_hf.py, without its task dependencies (datasets, pandas, pyarrow,
# scikit-learn, ...): its HFLM path imports only transformers, accelerate, requests, jinja2, tqdm and numpy.
NODEPS := lm-eval==0.4.13
STAMP  := $(VENV)/.kop-installed
JOBS   ?= 2
BENCH_FLAGS ?=

.PHONY: install test bench clean

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

test: $(STAMP)
	$(PY) -m pytest -q -n $(JOBS) tests

bench: $(STAMP)
	$(PY) -m benchmarks.run $(BENCH_FLAGS)

clean:
	rm -rf $(VENV) build src/*.egg-info src/kop_triton/_rosa*.so
