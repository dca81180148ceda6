# Two commands for a new user: `make serve` (start the whole stack) and `make test` (run the test suite).
# Both create the virtual environment in .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: serve test bench install

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

install: $(VENV)/.installed

serve: $(VENV)/.installed
	$(PY) serve.py

# --durations: the slowest tests, so that a slow one shows (docs/TESTING.md has the times measured).
# Two xdist workers, each test file whole on one of them and the CPU-heavy files first on one worker
# (tests/conftest.py): on two cores most tests wait on processes they start, so two at a time take about 30% less
# time. `make test TEST_WORKERS=0` runs everything in this process, one test at a time.
TEST_WORKERS ?= 2
test: $(VENV)/.installed
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder --durations=15

bench: $(VENV)/.installed
	$(PY) bench/bench_vilbert.py
