# yolodex developer commands. `make run` starts the app, `make test` is what CI runs (.ci/run).
SHELL := /bin/bash
.DEFAULT_GOAL := help

# Python used only to create the venv; everything else runs from the venv.
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV := .venv
VENV_BIN := $(VENV)/bin
VENV_PYTHON := $(VENV_BIN)/python
# Holds a hash of the files below: install again only when their content changes (not their mtimes,
# which are "now" in every fresh clone).
INSTALL_STAMP := $(VENV)/.yolodex-installed
INSTALL_INPUTS := requirements.txt requirements-dev.txt pyproject.toml
PIP_INSTALL := $(VENV_PYTHON) -m pip install --quiet --progress-bar off

# Label Studio gets its own venv (it pins many packages of its own, label-studio-sdk included), installed
# the same way from requirements-labelstudio.txt. backend/labeling/server.py runs its bin/label-studio.
LS_VENV := .venv-labelstudio
LS_VENV_PYTHON := $(LS_VENV)/bin/python
LS_INSTALL_STAMP := $(LS_VENV)/.yolodex-installed
LS_INSTALL_INPUTS := requirements-labelstudio.txt
LS_PIP_INSTALL := $(LS_VENV_PYTHON) -m pip install --quiet --progress-bar off
LS_CONTROL := $(VENV_BIN)/yolodex labelstudio

# The same variables as backend/settings.py; environment variables override these defaults.
YOLODEX_HOST ?= 127.0.0.1
YOLODEX_APP_PORT ?= 8501
# The address to open: a server bound to every interface answers on 127.0.0.1 (and only to the names in
# backend/settings.py's trusted_hosts, never to "0.0.0.0": docs/host_names.md).
OPEN_HOST := $(if $(filter 0.0.0.0 :: [::],$(YOLODEX_HOST)),127.0.0.1,$(YOLODEX_HOST))
PYTEST_ARGS ?=
CHROMIUM ?= /usr/bin/chromium

.PHONY: help setup run labelstudio labelstudio-stop test lint format bench clean

help:
	@echo "make setup   create .venv and .venv-labelstudio and install their requirements (only when they changed)"
	@echo "make run     start Label Studio and the app on http://$(OPEN_HOST):$(YOLODEX_APP_PORT)"
	@echo "make labelstudio        start Label Studio alone (make labelstudio-stop stops it)"
	@echo "make test    make lint's checks, then pytest (PYTEST_ARGS=... passes through)"
	@echo "make bench   run every bench/*.py"
	@echo "make lint    ruff check + ruff format --check + deptry (requirements.txt against the imports) + mypy on backend/ + import-linter (layers, no cycles)"
	@echo "make format  ruff format + ruff check --fix"
	@echo "make clean   remove .venv, .venv-labelstudio and caches (never storage/)"

setup:
	@set -euo pipefail; \
	if ! "$(VENV_PYTHON)" -c "import sys" >/dev/null 2>&1; then \
		if [ -z "$(PYTHON)" ]; then echo "setup: neither python3.11 nor python3 is on PATH" >&2; exit 1; fi; \
		echo "setup: creating $(VENV) with $(PYTHON) ($$("$(PYTHON)" --version 2>&1))"; \
		rm -rf "$(VENV)"; \
		"$(PYTHON)" -m venv "$(VENV)"; \
	fi; \
	wanted=$$(sha256sum $(INSTALL_INPUTS) | sha256sum | cut -d' ' -f1); \
	if [ "$$(cat "$(INSTALL_STAMP)" 2>/dev/null)" = "$$wanted" ]; then \
		echo "setup: $(VENV) is up to date with $(INSTALL_INPUTS)"; \
		exit 0; \
	fi; \
	echo "setup: installing requirements.txt, requirements-dev.txt and yolodex into $(VENV)"; \
	$(PIP_INSTALL) -r requirements.txt -r requirements-dev.txt; \
	$(PIP_INSTALL) --no-deps -e .; \
	echo "$$wanted" > "$(INSTALL_STAMP)"; \
	echo "setup: done"
	@set -euo pipefail; \
	if ! "$(LS_VENV_PYTHON)" -c "import sys" >/dev/null 2>&1; then \
		if [ -z "$(PYTHON)" ]; then echo "setup: neither python3.11 nor python3 is on PATH" >&2; exit 1; fi; \
		echo "setup: creating $(LS_VENV) with $(PYTHON) ($$("$(PYTHON)" --version 2>&1))"; \
		rm -rf "$(LS_VENV)"; \
		"$(PYTHON)" -m venv "$(LS_VENV)"; \
	fi; \
	wanted=$$(sha256sum $(LS_INSTALL_INPUTS) | sha256sum | cut -d' ' -f1); \
	if [ "$$(cat "$(LS_INSTALL_STAMP)" 2>/dev/null)" = "$$wanted" ]; then \
		echo "setup: $(LS_VENV) is up to date with $(LS_INSTALL_INPUTS)"; \
		exit 0; \
	fi; \
	echo "setup: installing $(LS_INSTALL_INPUTS) into $(LS_VENV)"; \
	$(LS_PIP_INSTALL) -r $(LS_INSTALL_INPUTS); \
	echo "$$wanted" > "$(LS_INSTALL_STAMP)"; \
	echo "setup: $(LS_VENV) done"
	@# Debian packages the tests start for real: chromium (the browser tests; Playwright's own browser download is
	@# not used), redis-server (the Redis queue), postgresql (metadata and Label Studio on PostgreSQL), shellcheck
	@# and docker-compose (lint and validate the container files; no Docker engine is needed). Installed with apt
	@# when we may (root, as in CI); otherwise those tests skip and say how to install them. `make run` needs none.
	@missing=""; \
	[ -x "$(CHROMIUM)" ] || missing="$$missing chromium"; \
	command -v redis-server >/dev/null 2>&1 || missing="$$missing redis-server"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	command -v shellcheck >/dev/null 2>&1 || missing="$$missing shellcheck"; \
	command -v docker-compose >/dev/null 2>&1 || missing="$$missing docker-compose"; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "setup: installing$$missing with apt-get (for the tests)"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing \
				|| echo "setup: could not install$$missing; the tests that need them will skip" >&2; \
		else \
			echo "setup: missing$$missing: the tests that need them skip (install: sudo apt-get install$$missing)"; \
		fi; \
	fi

# Label Studio starts in the background (its first start takes about two minutes; the app shows its state)
# and is stopped when the app exits, unless it was already running before `make run`.
# `streamlit run app/main.py` serves the st.App defined there: every request's Host/Origin is checked against the
# app's names first (app/host_guard.py, docs/host_names.md).
run: setup
	@$(VENV_BIN)/yolodex dataset starter >/dev/null && echo "yolodex: the Starter Pokédex project is ready"
	@set -uo pipefail; \
	stop_ls=0; worker=""; \
	cleanup() { \
		if [ -n "$$worker" ]; then kill -INT "$$worker" 2>/dev/null; wait "$$worker" 2>/dev/null; fi; \
		if [ "$$stop_ls" = 1 ]; then $(LS_CONTROL) stop; fi; \
	}; \
	trap cleanup EXIT; \
	trap 'exit 130' INT TERM; \
	if $(LS_CONTROL) status --quiet; then \
		echo "yolodex: Label Studio is already running; it stays up after the app exits"; \
	else \
		$(LS_CONTROL) start --no-wait || exit 1; \
		stop_ls=1; \
	fi; \
	logs="$$($(VENV_PYTHON) -c 'from backend.settings import get_settings; print(get_settings().logs_dir)')"; \
	mkdir -p "$$logs"; \
	$(VENV_BIN)/huey_consumer backend.jobs.tasks.huey -k process -w 1 -m 1 >>"$$logs/worker.log" 2>&1 & worker=$$!; \
	echo "yolodex: the worker runs the background jobs (log: $$logs/worker.log)"; \
	echo "yolodex: open http://$(OPEN_HOST):$(YOLODEX_APP_PORT) (Ctrl-C stops it)"; \
	$(VENV_BIN)/streamlit run app/main.py --server.address $(YOLODEX_HOST) --server.port $(YOLODEX_APP_PORT) \
		--server.headless true --browser.gatherUsageStats false

labelstudio: setup
	@$(LS_CONTROL) start

labelstudio-stop:
	@$(LS_CONTROL) stop

# Runs every step even when an early one fails, so one CI log shows every problem. All but pytest are `make lint`.
test: setup
	@failed=""; \
	$(VENV_BIN)/ruff check . || failed="$$failed ruff-check"; \
	$(VENV_BIN)/ruff format --check . || failed="$$failed ruff-format"; \
	$(VENV_BIN)/deptry . || failed="$$failed deptry"; \
	$(VENV_BIN)/mypy || failed="$$failed mypy"; \
	$(VENV_BIN)/lint-imports || failed="$$failed import-linter"; \
	$(VENV_BIN)/pytest $(PYTEST_ARGS) || failed="$$failed pytest"; \
	if [ -n "$$failed" ]; then echo "make test: failed:$$failed" >&2; exit 1; fi

# deptry (configured in pyproject.toml) fails on a third-party import that requirements.txt does not pin, and on a
# pin there that nothing imports and that is not in its "needed at run time" or "reproducibility" sections.
lint: setup
	$(VENV_BIN)/ruff check .
	$(VENV_BIN)/ruff format --check .
	$(VENV_BIN)/deptry .
	$(VENV_BIN)/mypy
	$(VENV_BIN)/lint-imports

format: setup
	$(VENV_BIN)/ruff format .
	$(VENV_BIN)/ruff check --fix .

bench: setup
	@shopt -s nullglob; scripts=(bench/*.py); failed=""; \
	if [ $${#scripts[@]} -eq 0 ]; then echo "bench: no bench/*.py scripts yet"; exit 0; fi; \
	for script in "$${scripts[@]}"; do \
		echo "== $$script"; \
		$(VENV_PYTHON) "$$script" || failed="$$failed $$script"; \
	done; \
	if [ -n "$$failed" ]; then echo "make bench: failed:$$failed" >&2; exit 1; fi

# storage/ holds the user's images, labels and models: clean never touches it.
clean:
	rm -rf $(VENV) $(LS_VENV) .pytest_cache .ruff_cache .mypy_cache .import_linter_cache build dist *.egg-info
	find . -path ./storage -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
