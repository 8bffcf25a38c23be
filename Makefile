# Two commands on a fresh machine: `make demo` and `make test` (each sets everything up first).
PYTHON ?= python3
VENV ?= .venv
# CPU build of torch by default (a bare `torch` requirement pulls a multi-GB CUDA build); override e.g.
#   make test TORCH_SPEC="torch==2.5.1"
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.latentfit-installed

.PHONY: setup demo test test-slow lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	MPLBACKEND=Agg $(BIN)/python -m latentfit demo

# Tests work on small tensors: one intra-op thread per test process avoids oversubscribing small CPUs, and
# TEST_WORKERS processes (pytest-xdist, whole files per worker so module fixtures run once) use the cores.
TEST_ENV := MPLBACKEND=Agg OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
TEST_WORKERS ?= 2

test: setup
	$(TEST_ENV) $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test-slow: setup
	$(TEST_ENV) $(BIN)/python -m pytest -q -m slow -n $(TEST_WORKERS) --dist loadfile

lint: setup
	$(BIN)/python -m ruff check latentfit tests examples benchmarks

bench: setup
	for f in benchmarks/*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
