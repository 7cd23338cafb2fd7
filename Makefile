# The two set-up commands (README): `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUN_ARGS ?=

.PHONY: run test lint pytest venv system-deps clean

# Create the environment, install, and run the main job on embedded parts
# (broker from a wheel, chdb, the Faust worker, the simulator). Ctrl-C stops it.
run: venv
	$(BIN)/csi run $(RUN_ARGS)

# Install what the tests need (Python packages, Debian's clickhouse-server),
# then lint, type-check and run every test.
test: venv system-deps lint pytest

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -U pip
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[embedded,dev]"
	touch $@

# The driver-level tests talk to a real (old, 18.16) ClickHouse server; `csi
# report` draws Chinese comments with a CJK font (5 MB) next to DejaVu Sans.
system-deps:
	@{ command -v clickhouse-server >/dev/null 2>&1 && \
	   [ -e /usr/share/fonts/truetype/wqy/wqy-microhei.ttc ]; } || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
	    clickhouse-server fonts-wqy-microhei >/dev/null; }

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/csi dashboards check

pytest: venv
	$(BIN)/pytest -q

clean:
	rm -rf .csi .pytest_cache .mypy_cache .ruff_cache
