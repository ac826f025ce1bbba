# prism-trt developer commands. `make setup` then `make test` is all a fresh x86 Linux box needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
CONSTRAINTS ?= constraints/x86-cpu.txt
PYTEST_ARGS ?=

.PHONY: setup test test-all bench bench-profile lint clean

setup: $(STAMP)

# Re-installs when the project's dependencies change; pinned versions come from $(CONSTRAINTS).
$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install -c $(CONSTRAINTS) -e '.[dev]'
	touch $(STAMP)

# pytest exits 5 when it collects no test; that is reported, not treated as a crash.
define run_pytest
	$(BIN)/python -m pytest $(1) $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc
endef

test: $(STAMP)
	$(call run_pytest,-m "not slow")

test-all: $(STAMP)
	$(call run_pytest,)

bench: $(STAMP)
	@mkdir -p benchmarks/results
	@for script in benchmarks/bench_*.py benchmarks/staging_gpu.py; do echo "== $$script"; (cd benchmarks && ../$(BIN)/python $$(basename $$script)) || exit 1; done

# The profiler study on a tc-shaped network-namespace testbed (needs root, ip, tc; several minutes).
bench-profile: $(STAMP)
	@mkdir -p benchmarks/results
	cd benchmarks && ../$(BIN)/python profile_sweep.py

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) benchmarks/results .pytest_cache .hypothesis
