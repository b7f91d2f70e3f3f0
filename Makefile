# Two commands for a fresh machine with Python 3.11+ and make:
#   make run    set up .venv and run the whole system locally (offline source)
#   make test   set up .venv and run lint, types and the whole test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# promtool checks deploy/prometheus in the tests; deploy/prometheus/get-promtool.sh says whence.
PROMTOOL := $(BIN)/promtool
SOURCE ?= synthetic
REPLAY_DIR ?= ../shared/data/candles
REPLAY_SPEED ?= 600
PORT ?= 8000

.PHONY: run test lint bench clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is required"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

run: $(STAMP)
	$(BIN)/tickstream up --source $(SOURCE) --replay-dir $(REPLAY_DIR) --replay-speed $(REPLAY_SPEED) --port $(PORT)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

$(PROMTOOL): | $(STAMP)
	@sh deploy/prometheus/get-promtool.sh $(PROMTOOL)

test: lint $(PROMTOOL)
	$(BIN)/pytest

bench: $(STAMP)
	$(BIN)/python bench/bench_pipeline.py

clean:
	rm -rf $(VENV) .tickstream .mypy_cache .ruff_cache .pytest_cache .hypothesis
