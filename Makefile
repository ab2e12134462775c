# poise — developer entry points. Every target creates/uses .venv.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: run test bench lint install test-deps clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# The HTTP hot path is compiled with mypyc at install (setup.py): editing one of its
# modules (or the C head parser) reinstalls, so the compiled modules never lag behind
# their sources.
HOT_PATH_SOURCES := $(wildcard poise/proxy/http/*.py poise/proxy/http/*.c) poise/proxy/deadline.py \
                    poise/observability/access_format.py poise/core/ratelimit.py \
                    poise/core/policies/rotation.py poise/core/backend_stats.py

$(STAMP): $(BIN)/python pyproject.toml setup.py $(HOT_PATH_SOURCES)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## make run: create .venv, install poise, start the demo (balancer on 127.0.0.1:8080)
run: install
	$(BIN)/poise demo

## make test: install test dependencies (Debian packages too) and run pytest, over the
## compiled hot path and then over the interpreted one (the fallback without a compiler)
test: install test-deps
	$(BIN)/pytest -q $(PYTEST_ARGS)
	POISE_INTERPRETED=1 $(BIN)/pytest -q $(PYTEST_ARGS)

test-deps:
	@bash .ci/apt-deps

## make bench: wrk against poise, HAProxy and nginx side by side (see bench/README.md)
bench: install
	@bash .ci/apt-deps bench
	$(BIN)/python bench/run.py $(BENCH_ARGS)
	$(BIN)/python bench/policies.py
	$(BIN)/python bench/checks.py
	$(BIN)/python bench/reload.py
	$(BIN)/python bench/global_limit.py
	$(BIN)/python bench/ratelimit_memory.py
	$(BIN)/python bench/tcp.py
	$(BIN)/python bench/websocket.py
	$(BIN)/python bench/http2.py
	$(BIN)/python bench/latency.py
	$(BIN)/python bench/scale.py
	$(BIN)/python bench/memory.py

lint: install
	$(BIN)/ruff check poise tests bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
	find . -name '*.so' -not -path './.venv/*' -delete
