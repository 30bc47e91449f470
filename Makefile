# One place for the install steps the README, CI and the Dockerfile share.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
SUDO    = $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup redis demo test test-slow proto

setup: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	# MovieLens-100K ships inside the recbole wheel; its own dependencies (torch) are not needed.
	$(BIN)/pip install -q --no-deps recbole==1.2.1
	touch $@

redis:
	@command -v redis-server >/dev/null || ($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q redis-server)

demo: setup
	$(BIN)/feedrank demo

test: setup redis
	$(BIN)/python -m pytest -q

test-slow: setup redis
	$(BIN)/python -m pytest -q -m slow

proto: setup
	$(BIN)/python scripts/gen_proto.py
