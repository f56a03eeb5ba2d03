# The two commands a newcomer needs: `make run` and `make test`. Everything they need is
# installed here, on a fresh machine, by these targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml sdk/python/pyproject.toml | sha1sum | cut -c1-12)
KAFKA := deploy/kafka/kafka.sh
POSTGRES := deploy/postgres/postgres.sh
BROWSER_DIR := tests/collector/browser
BROWSER_STAMP := $(BROWSER_DIR)/node_modules/.installed-$(shell sha1sum $(BROWSER_DIR)/package-lock.json | cut -c1-12)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install browser deploy-tools run test services services-stop lint fmt bench schemas clean

$(STAMP): pyproject.toml sdk/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,bench]' -e sdk/python
	rm -f $(VENV)/.installed-* && touch $(STAMP)

install: $(STAMP)

## browser: Debian's Chromium and, from npm, playwright-core, axe-core (console) and the web libraries the drop-in tests run
browser: $(BROWSER_STAMP)

$(BROWSER_STAMP): $(BROWSER_DIR)/package-lock.json
	command -v chromium >/dev/null || $(SUDO) apt-get install -y -q chromium || \
		{ $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium; }
	npm ci --prefix $(BROWSER_DIR) --no-audit --no-fund
	touch $@

## deploy-tools: what tests/deploy needs: kustomize (Go module proxy), which renders
## deploy/kubernetes, and Prometheus's PromQL grammar (npm), which parses the dashboard's queries
KUSTOMIZE_VERSION := v5.8.1
KUSTOMIZE := $(BIN)/kustomize-$(KUSTOMIZE_VERSION)
PROMQL_DIR := tests/deploy/promql
PROMQL_STAMP := $(PROMQL_DIR)/node_modules/.installed-$(shell sha1sum $(PROMQL_DIR)/package-lock.json | cut -c1-12)
deploy-tools: $(KUSTOMIZE) $(PROMQL_STAMP)

$(KUSTOMIZE): | $(STAMP)
	GOBIN=$(abspath $(BIN)) GOTOOLCHAIN=local go install sigs.k8s.io/kustomize/kustomize/v5@$(KUSTOMIZE_VERSION)
	mv $(BIN)/kustomize $@ && ln -sf $(notdir $@) $(BIN)/kustomize

$(PROMQL_STAMP): $(PROMQL_DIR)/package-lock.json
	npm ci --prefix $(PROMQL_DIR) --no-audit --no-fund
	touch $@

## run: the whole pipeline in one process on the embedded default (embedded Postgres, the bus on it)
run: install
	$(BIN)/cdp-stream up

## services: start the local Kafka broker and PostgreSQL server (idempotent)
services: install
	bash $(KAFKA) start
	bash $(POSTGRES) start

services-stop:
	-bash $(KAFKA) stop
	-bash $(POSTGRES) stop

## test: lint, start Kafka and Postgres (stopping afterwards what this run started), run every test
test: install lint browser deploy-tools
	@started=""; \
	bash $(KAFKA) status >/dev/null 2>&1 || started="$$started kafka"; \
	bash $(POSTGRES) status >/dev/null 2>&1 || started="$$started postgres"; \
	trap 'for s in $$started; do case $$s in kafka) bash $(KAFKA) stop;; postgres) bash $(POSTGRES) stop;; esac; done' EXIT; \
	bash $(KAFKA) start && bash $(POSTGRES) start && \
	CDP_TEST_KAFKA_BOOTSTRAP=127.0.0.1:$${CDP_KAFKA_PORT:-9092} \
	CDP_TEST_DATABASE_URL=$$(bash $(POSTGRES) url) \
	$(BIN)/pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check src tests benchmarks sdk
	$(BIN)/ruff format --check src tests benchmarks sdk
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/cdp-stream schemas --check

fmt: install
	$(BIN)/ruff format src tests benchmarks sdk
	$(BIN)/ruff check --fix src tests benchmarks sdk

schemas: install
	$(BIN)/cdp-stream schemas

## bench: the printed benchmarks against the real broker and server (wrk: Debian's, the HTTP load)
## bench: every benchmark, on a broker of its own started new (port $(BENCH_KAFKA_PORT)): one
## that kept the thousands of topics test runs leave spends about twice the CPU per event; with
## Kafka's default initial rebalance delay, so that consumers started together form one group
BENCH_KAFKA_PORT ?= 19492
BENCH_KAFKA := CDP_KAFKA_PORT=$(BENCH_KAFKA_PORT) CDP_KAFKA_CONTROLLER_PORT=$$(($(BENCH_KAFKA_PORT) + 1)) \
	CDP_KAFKA_INITIAL_REBALANCE_DELAY_MS=3000 bash $(KAFKA)
bench: install
	command -v wrk >/dev/null || $(SUDO) apt-get install -y -q wrk || \
		{ $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q wrk; }
	bash $(POSTGRES) start
	$(BENCH_KAFKA) reset && $(BENCH_KAFKA) start
	@trap '$(BENCH_KAFKA) stop' EXIT; set -e; \
	export CDP_KAFKA_BOOTSTRAP=127.0.0.1:$(BENCH_KAFKA_PORT) CDP_TEST_DATABASE_URL=$$(bash $(POSTGRES) url); \
	for b in collect resolve embedded pipeline lookup; do $(BIN)/python benchmarks/$$b.py; done

clean:
	rm -rf $(VENV) .cdp .pytest_cache .mypy_cache .ruff_cache .import_linter_cache
