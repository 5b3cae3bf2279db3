# Two commands set everything up on a fresh machine: `make bench` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: bench test test-all install-bench install-dev lint

$(PY):
	$(PYTHON) -m venv $(VENV)

install-bench: $(PY)
	$(PY) -m pip install -q -e '.[bench]'

install-dev: $(PY)
	$(PY) -m pip install -q -e '.[dev]'

# The main job: measure the zoo on this machine (embedded default run).
bench: install-bench
	$(PY) -m effivit bench $(ARGS)

# The CI suite (under 20 minutes on 2 cores): everything but the tests marked slow (the large variants).
# The training tests run in a second process: after ~490 other tests in one process, the parent of a
# training subprocess has segfaulted inside subprocess.run (Python's own code; glibc and pymalloc debug
# checks found no corruption). Either half alone passes. Under investigation; see docs/reliability.md.
test: install-dev
	$(PY) -m pytest -q -m "not slow" --ignore=tests/test_train.py $(ARGS)
	$(PY) -m pytest -q -m "not slow" tests/test_train.py $(ARGS)

# Everything, the large variants included (about an hour on 2 cores).
test-all: install-dev
	$(PY) -m pytest -q $(ARGS)

lint: install-dev
	$(VENV)/bin/ruff check src tests benchmarks
