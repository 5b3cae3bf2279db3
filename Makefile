# Two commands set everything up on a fresh machine: `make bench` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: bench test install-bench install-dev lint

$(PY):
	$(PYTHON) -m venv $(VENV)

install-bench: $(PY)
	$(PY) -m pip install -q -e '.[bench]'

install-dev: $(PY)
	$(PY) -m pip install -q -e '.[dev]'

# The main job: measure the zoo on this machine (embedded default run).
bench: install-bench
	$(PY) -m effivit bench $(ARGS)

test: install-dev
	$(PY) -m pytest -q $(ARGS)

lint: install-dev
	$(VENV)/bin/ruff check src tests benchmarks
