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
test: install-dev
	$(PY) -m pytest -q -m "not slow" $(ARGS)

# Everything, the large variants included (about an hour on 2 cores).
test-all: install-dev
	$(PY) -m pytest -q $(ARGS)

lint: install-dev
	$(VENV)/bin/ruff check src tests benchmarks
