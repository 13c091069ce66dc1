# Two commands do everything on a fresh machine:  make bench  /  make test
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch 2.13.0 (CPU build) lies on this project's CI/dev disk; on a GPU box install your CUDA torch first
# and run `make test VENV_FLAGS=--system-site-packages`.  Triton is pinned to the version of the lent GPU.
DEPS   := "setuptools>=64" torch==2.13.0 triton==3.6.0 "numpy<2.4" safetensors tqdm sentencepiece matplotlib pytest hypothesis pytest-xdist
STAMP  := $(VENV)/.kop-installed
JOBS   ?= 2

.PHONY: install test bench clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -m pip install -q $(DEPS)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q -n $(JOBS) tests

bench: $(STAMP)
	$(PY) -m benchmarks.run

clean:
	rm -rf $(VENV) build src/*.egg-info
