# Every target builds and uses the project virtualenv, so a fresh machine needs nothing else.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint bench venv node browser clean compose-up

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@# No PostgreSQL server binaries on this machine: take them from the pgserver wheel.
	$(BIN)/python -c 'from pgguard.embedded import find_bindir; find_bindir()' 2>/dev/null \
		|| $(BIN)/python -m pip install --quiet 'pgserver>=0.1.4'
	touch $(STAMP)

venv: $(STAMP)

tests/node/node_modules/.installed: tests/node/package.json
	cd tests/node && npm install --silent --no-audit --no-fund
	touch $@

node: tests/node/node_modules/.installed

# The approvals page test drives Debian's chromium (playwright-core from npm). Installed when
# missing and possible (root with apt); otherwise that one test skips and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium \
		>/dev/null 2>&1; } || echo "chromium not installed: the browser test will be skipped"

run: venv
	$(BIN)/pgguard demo

test: venv node browser
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check pgguard tests scripts
	$(BIN)/ruff format --check pgguard tests scripts
	$(BIN)/mypy

bench: venv
	$(BIN)/python scripts/bench.py --output docs/benchmarks.md $(BENCH_ARGS)

# Where Docker runs: pgguard, PostgreSQL, Prometheus and Grafana (deploy/README.md).
compose-up:
	docker compose -f deploy/docker-compose.yml up --build

clean:
	rm -rf $(VENV) tests/node/node_modules .pytest_cache .mypy_cache
