# sidecar: `make run` starts the demo, `make test` runs every test. Both set themselves up.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench soak clean system-deps

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		(echo "error: Python 3.11+ is required (found $$($(PYTHON) --version))" >&2; exit 1)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	scripts/run.sh

system-deps:
	scripts/system-deps.sh redis-server promtool:prometheus

test: $(STAMP) system-deps
	$(BIN)/ruff check proxy upstream_app tests bench
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: $(STAMP)
	$(BIN)/ruff check proxy upstream_app tests bench
	$(BIN)/ruff format --check proxy upstream_app tests bench

bench: $(STAMP)
	scripts/system-deps.sh wrk nginx redis-server
	$(BIN)/python -m bench

soak: $(STAMP) system-deps
	$(BIN)/python -m tests.soak

clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache
