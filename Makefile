# Two entry points, each working on a fresh machine with only Python 3.11-3.13:
#   make demo   runs the quick version of seven experiments (writes runs/<name>/<timestamp>/)
#   make test   runs ruff and the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
# The benchmarks' peers (PyTorch, PyHessian, matfree) are large and only `make benchmark` needs them.
BENCHMARK_PEERS := $(VENV)/.benchmark-peers

.PHONY: demo test benchmark lint clean

$(INSTALLED): pyproject.toml requirements-lock.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check \
	  -c requirements-lock.txt -e ".[test,experiments]"
	touch $(INSTALLED)

$(BENCHMARK_PEERS): $(INSTALLED)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check \
	  -c requirements-lock.txt -e ".[test,experiments,benchmarks]"
	touch $(BENCHMARK_PEERS)

demo: $(INSTALLED)
	$(BIN)/python -m experiments escape-toy --quick
	$(BIN)/python -m experiments pgd-networks --quick
	$(BIN)/python -m experiments saddles-good-enough --quick
	$(BIN)/python -m experiments attraction-region --quick
	$(BIN)/python -m experiments curvature-search --quick
	$(BIN)/python -m experiments hessian-outliers --quick
	$(BIN)/python -m experiments scr-autoencoder --quick
	@echo "summaries (newest first):" && ls -1t runs/*/*/summary.md | head -n 7

test: $(INSTALLED)
	$(BIN)/python -m ruff check .
	$(BIN)/python -m pytest -q -n 2

benchmark: $(BENCHMARK_PEERS)
	$(BIN)/python -m benchmarks.perturbation
	$(BIN)/python -m benchmarks.smoothing
	$(BIN)/python -m benchmarks.curvature
	$(BIN)/python -m benchmarks.spectrum

lint: $(INSTALLED)
	$(BIN)/python -m ruff check .
	$(BIN)/python -m ruff format --check .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
