# Two commands for a new user: `make serve` (start the whole stack) and `make test` (run the test suite).
# Both create the virtual environment in .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Let Python cache compiled modules (__pycache__, ignored by git) even where the environment says not to, as some
# containers and CI images do: otherwise every process the tests start (workers, gunicorn, CLIs) compiles the
# project's modules again, and every pytest process rewrites the asserts of each plugin module (schemathesis: ~350)
# again: 6-10 s per pytest process, about half a second per worker process.
unexport PYTHONDONTWRITEBYTECODE

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
# Two runs: all but the tests marked cpu_heavy on two xdist workers, each test file whole on one of them
# (tests/conftest.py; on two cores most tests wait on the processes they start, so two at a time take about a
# quarter less time), then the cpu_heavy ones (in HEAVY_FILES: named, so that this run collects only those files),
# which keep both CPUs busy for a minute or more, alone, so that no test's time is doubled by another's.
# TEST_WORKERS=0: the first run in one process.
TEST_WORKERS ?= 2
HEAVY_FILES := tests/test_gpu_checks.py tests/test_avx2_cpu.py
test: $(VENV)/.installed
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup -m "not cpu_heavy" --durations=15
	$(PY) -m pytest -m cpu_heavy $(HEAVY_FILES) --durations=5

bench: $(VENV)/.installed
	$(PY) bench/bench_vilbert.py
