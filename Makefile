# The two commands of the README: `make demo` (main job on the embedded synthetic default) and
# `make test`. Each sets up its own environment first (scripts/setup_env.sh, idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
export NUCLEUS_VENV := $(VENV)

.PHONY: setup demo test lint bench clean
setup:
	@bash scripts/setup_env.sh

demo:
	@started=$$(date +%s) && bash scripts/setup_env.sh && \
	NUCLEUS_DEMO_STARTED=$$started PATH="$(abspath $(VENV))/bin:$$PATH" bash scripts/demo.sh

test: lint
	@$(PY) -m pytest -q tests

lint: setup
	@$(PY) -m ruff check nucleus_seg tests benchmarks scripts
	@$(VENV)/bin/lint-imports --no-cache

clean:
	rm -rf build output .pytest_cache
