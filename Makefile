# Entry points for development and CI. `.ci/run` calls `make test` in a fresh clone, as root on
# a bare Debian machine, so `setup` installs everything it needs; it is a quick no-op when done.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
# Prerequisites such as `test: setup up migrate` must run in that order, even under `make -j`.
.NOTPARALLEL:

VENV := .venv
PYTHON := $(VENV)/bin/python
BORDERFLOW := $(VENV)/bin/borderflow
# pip runs again only when pyproject.toml changes (or the venv is recreated).
SETUP_STAMP := $(VENV)/.borderflow-setup.stamp
STACK_DIR := .stack

.PHONY: help setup system-packages up down status migrate test chaos demo bench lint clean

help: ## Show this list.
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 12

setup: system-packages $(SETUP_STAMP) ## Install Debian packages (as root) and the venv; starts nothing.

# Debian packages: redis-server and clickhouse-server run the local stack, clickhouse-client is
# for poking at it; python3-venv provides ensurepip, which bare Debian lacks for `-m venv`;
# chromium (headless) renders `borderflow report` in its test; openssl makes the throwaway TLS
# certificates of the Kafka TLS settings test.
system-packages:
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	[ -x /usr/sbin/clickhouse-server ] || missing="$$missing clickhouse-server"; \
	command -v clickhouse-client >/dev/null || missing="$$missing clickhouse-client"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v openssl >/dev/null || missing="$$missing openssl"; \
	if [ ! -x $(PYTHON) ] && ! python3 -c 'import ensurepip, venv' 2>/dev/null; then \
		missing="$$missing python3-venv"; \
	fi; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" != 0 ]; then \
			echo "missing Debian packages:$$missing; run: sudo apt-get update &&" \
				"sudo DEBIAN_FRONTEND=noninteractive apt-get install -y$$missing" >&2; \
			exit 1; \
		fi; \
		echo "installing Debian packages:$$missing"; \
		apt-get update; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y $$missing; \
	fi

$(SETUP_STAMP): pyproject.toml | system-packages
	@[ -x $(PYTHON) ] || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -e '.[local,dev]'
	@touch $@

up: setup ## Start Tansu, Redis and ClickHouse (idempotent).
	$(BORDERFLOW) stack up

# No setup here: in a fresh clone whose setup failed there is nothing to stop.
down: ## Stop the stack's own processes (data under .stack/ is kept).
	@if [ -x $(BORDERFLOW) ]; then $(BORDERFLOW) stack down; else echo "no venv: nothing to stop"; fi

status: setup ## Show what runs, pids, ports, logs and endpoints.
	$(BORDERFLOW) stack status

migrate: setup ## Apply ClickHouse migrations (to BORDERFLOW_CLICKHOUSE_*; no stack start).
	$(BORDERFLOW) migrate

test: setup up migrate ## Start the stack, migrate, run the whole test suite.
	$(PYTHON) -m pytest -q

# Faults against a real worker (tests marked `chaos`, which `make test` leaves out): hostile
# input, Redis and ClickHouse outages, worker SIGKILLs and takeover. Each prints one JSON line.
chaos: setup up migrate ## Start the stack, migrate, run the chaos tests (hostile input, outages, kills).
	$(PYTHON) -m pytest -q -s -m chaos tests/chaos

demo: setup up migrate ## Start the stack, migrate, run the demo.
	$(BORDERFLOW) demo

bench: setup up migrate ## Start the stack, migrate, write benchmarks/latest.json.
	@mkdir -p benchmarks
	$(BORDERFLOW) bench --out benchmarks/latest.json

lint: setup ## ruff check, ruff format --check, mypy.
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# Only the default .stack/: a BORDERFLOW_STACK_DIR override is never rm -rf'd on trust.
clean: down ## Stop the stack and delete its data, logs and config (.stack/).
	rm -rf $(STACK_DIR)
