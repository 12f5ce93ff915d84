# make demo   - set up .venv, build fastst, run the IAST demo pipeline on synthetic data (CPU, minutes)
# make test   - set up .venv, build fastst, run the test suite
# make bench  - run the benchmarks (bench/), FASTST_BENCH_QUICK=1 for the short version
VENV ?= .venv
PY := $(VENV)/bin/python
CUDA_HOME ?= $(wildcard /usr/local/cuda)
export CUDA_HOME
SOURCES := $(shell find csrc -type f) setup.py CMakeLists.txt pyproject.toml

.PHONY: install demo test bench clean

$(VENV)/.deps: requirements.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(PY) -m pip install --quiet -e .
	$(PY) -c "import fastst._C as c; print('fastst._C built, has_cuda =', c.has_cuda)"
	touch $@

install: $(VENV)/.built

demo: install
	$(PY) -m fastst.train --preset demo --out runs/demo

test: install
	$(PY) -m pytest tests -q

bench: install
	$(PY) -m pytest bench -q

clean:
	rm -rf build $(VENV) fastst/_C*.so *.egg-info
