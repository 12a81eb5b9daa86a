# Two entry points a new user needs: `make demo` and `make test`. Both set up .venv first (idempotent).
PY := .venv/bin/python

.PHONY: setup demo test lint format

setup:
	launch/setup_env.sh all

demo: setup
	.venv/bin/vbon demo

test: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	$(PY) -m pytest

lint: setup
	.venv/bin/ruff check .

format: setup
	.venv/bin/ruff format .
