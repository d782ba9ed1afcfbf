# raycv: `make demo` and `make test` work on a fresh machine (they install first).
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.install-stamp

.PHONY: install demo test lint typecheck unit format clean

install: $(STAMP)

# Re-install only when the dependency declarations change (idempotent, fast when nothing changed).
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: install
	$(BIN)/raycv demo

lint: install
	$(BIN)/ruff check raycv tests jobs
	$(BIN)/ruff format --check raycv tests jobs

typecheck: install
	$(BIN)/mypy raycv

unit: install
	$(BIN)/python -m pytest -q -rs --durations=15

test: lint typecheck unit

format: install
	$(BIN)/ruff format raycv tests jobs
	$(BIN)/ruff check --fix raycv tests jobs

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
