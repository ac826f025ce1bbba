# prism-trt developer commands. `make setup` then `make test` is all a fresh x86 Linux box needs.
#
# Two environments, two test legs (both run by `make test`, which is what CI runs):
#   .venv         the verified pins (constraints/x86-cpu.txt)
#   .venv-lowest  the lowest versions pyproject.toml declares (constraints/lowest.txt), on Python 3.10
#                 as JetPack 6 ships it when this machine has one, else on $(PYTHON)
PYTHON ?= python3
# The first Python 3.10 that runs (a pyenv shim may exist without working), else $(PYTHON).
LOWEST_PYTHON ?= $(shell for p in $(wildcard $(HOME)/.pyenv/versions/3.10*/bin/python3.10) python3.10; do \
                   "$$p" -c "" 2>/dev/null && { echo "$$p"; exit 0; }; done; echo $(PYTHON))
VENV ?= .venv
LOWEST_VENV ?= .venv-lowest
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
LOWEST_STAMP := $(LOWEST_VENV)/.installed-stamp
CONSTRAINTS ?= constraints/x86-cpu.txt
LOWEST_CONSTRAINTS ?= constraints/lowest.txt
PYTEST_ARGS ?=

.PHONY: setup test test-main test-lowest test-all bench bench-profile lint clean

setup: $(STAMP) $(LOWEST_STAMP)

# Re-installs when the project's dependencies change; pinned versions come from the constraints file.
define make_venv
	$(1) -m venv $(2)
	$(2)/bin/python -m pip install --quiet --upgrade pip
	$(2)/bin/python -m pip install -c $(3) -e '.[dev]'
	@$(2)/bin/python -c "import sys, torch, onnxruntime; print(f'$(2): Python {sys.version.split()[0]}, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}')"
	touch $(2)/.installed-stamp
endef

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(call make_venv,$(PYTHON),$(VENV),$(CONSTRAINTS))

$(LOWEST_STAMP): pyproject.toml $(LOWEST_CONSTRAINTS)
	$(call make_venv,$(LOWEST_PYTHON),$(LOWEST_VENV),$(LOWEST_CONSTRAINTS))

# pytest exits 5 when it collects no test; that is reported, not treated as a crash.
define run_pytest
	$(1)/bin/python -m pytest $(2) $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc
endef

# The README's test command and CI's: the pinned leg, then the lowest-versions leg.
test: test-main test-lowest

test-main: $(STAMP)
	$(call run_pytest,$(VENV),-m "not slow")

test-lowest: $(LOWEST_STAMP)
	$(call run_pytest,$(LOWEST_VENV),-m "not slow")

test-all: $(STAMP)
	$(call run_pytest,$(VENV),)

bench: $(STAMP)
	@mkdir -p benchmarks/results
	@for script in benchmarks/bench_*.py benchmarks/staging_gpu.py; do echo "== $$script"; (cd benchmarks && ../$(BIN)/python $$(basename $$script)) || exit 1; done

# The profiler studies on a tc-shaped network-namespace testbed (needs root, ip, tc; ~30 minutes on
# 2 cores): the vit_tiny sweep, the transfer to other architectures, the bandwidth step under serve,
# link faults against a served cluster.
bench-profile: $(STAMP)
	@mkdir -p benchmarks/results
	@for script in benchmarks/profile_*.py benchmarks/link_faults.py; do echo "== $$script"; (cd benchmarks && ../$(BIN)/python $$(basename $$script)) || exit 1; done

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) $(LOWEST_VENV) benchmarks/results .pytest_cache .hypothesis
