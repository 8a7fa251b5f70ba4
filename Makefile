# WebMACS-TS — `make help` lists the targets.
SHELL := bash
.DEFAULT_GOAL := help

VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(VENV)/bin/pip
PYTHON  ?= python3
STAMP   := $(VENV)/.deps-stamp
CORE_SRC := $(shell find core-rs/src -name '*.rs') core-rs/Cargo.toml Cargo.toml
CORE_SO := py/webmacs/_core.abi3.so

.PHONY: help
help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk -F':.*?## ' '{printf "  make %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# Everything pyproject names, plus test extras; the package itself is built by `make build`.
	$(PY) -c 'import tomllib;d=tomllib.load(open("pyproject.toml","rb"))["project"];print("\n".join(d["dependencies"]+d["optional-dependencies"]["test"]+["maturin>=1.7,<2"]))' > $(VENV)/requirements.txt
	$(PIP) install -q -r $(VENV)/requirements.txt
	touch $@

.PHONY: deps
deps: $(STAMP) ## create .venv with the Python dependencies

$(CORE_SO): $(STAMP) $(CORE_SRC) pyproject.toml
	VIRTUAL_ENV=$(abspath $(VENV)) $(VENV)/bin/maturin develop --release -q
	touch $(CORE_SO)

.PHONY: build
build: $(CORE_SO) ## build the Rust engine into the package (release)

# sql/ stays the schema's one source; a copy goes into the package (webmacs/sql) for the build only.
STAGE_SQL := trap 'rm -rf py/webmacs/sql' EXIT; rm -rf py/webmacs/sql && mkdir py/webmacs/sql && cp sql/*.sql py/webmacs/sql/
MATURIN := VIRTUAL_ENV=$(abspath $(VENV)) $(VENV)/bin/maturin

.PHONY: dist dist-quick
dist: $(STAMP) ## build the sdist and, from it, the wheel (abi3, CPython >= 3.11) into dist/
	$(STAGE_SQL) && $(MATURIN) build --release --sdist --out dist
dist-quick: $(STAMP) ## the same sdist and wheel, the wheel built in the checkout (reuses the build cache; tests/dist)
	$(STAGE_SQL) && $(MATURIN) sdist --out dist && $(MATURIN) build --release --out dist

.PHONY: timescaledb
timescaledb: ## install the timescaledb extension if missing (builds it on Debian/Ubuntu)
	bash py/webmacs/db/provision-timescaledb.sh

.PHONY: run
run: build timescaledb ## start the server on http://127.0.0.1:8000 with the local TimescaleDB
	$(VENV)/bin/webmacs serve

.PHONY: test
test: build timescaledb ## run every test: cargo (core) and pytest (API, WebSocket, engine) on a real TimescaleDB
	cargo test -q -p webmacs-core
	$(VENV)/bin/pytest -q

.PHONY: lint
lint: build ## clippy, rustfmt, stubtest of the extension, ruff (format + lint), mypy (strict on the package)
	cargo clippy -p webmacs-core --all-targets -- -D warnings
	cargo clippy -p webmacs-core --features python -- -D warnings
	cargo fmt --check
	$(PY) -m mypy.stubtest webmacs._core
	$(VENV)/bin/ruff format --check py tests benches
	$(VENV)/bin/ruff check py tests benches
	# Targets and strictness come from [tool.mypy] in pyproject.toml: strict on py/webmacs, lighter on tests/benches.
	$(VENV)/bin/mypy

.PHONY: db-up db-down db-status
db-up: build timescaledb ## start the local cluster (./.webmacs, port 55432)
	$(VENV)/bin/webmacs db up
db-down: ## stop the local cluster
	$(VENV)/bin/webmacs db down
db-status: ## show the local cluster's state
	$(VENV)/bin/webmacs db status

.PHONY: bench bench-ingest bench-query bench-import bench-scaleout bench-mqtt
bench: bench-ingest bench-query bench-import bench-mqtt ## run all benchmarks (results: BENCHMARKS.md)
bench-ingest: build timescaledb ## ingest benchmark: engine vs COPY limit vs pure Python
	$(PY) benches/ingest.py
bench-query: build timescaledb ## analyst benchmark: series and exports vs direct SQL/COPY
	$(PY) benches/query.py
bench-scaleout: build timescaledb ## 1 vs 2 server workers side by side, and the capacity model (BENCHMARKS.md)
	$(PY) benches/scaleout.py
bench-import: build timescaledb ## WebMACS import benchmark: rows/s vs a plain COPY of the same rows
	$(PY) benches/import_bench.py
bench-mqtt: build timescaledb ## MQTT ingest (private Mosquitto, QoS 1) vs the WebSocket path of the same engine
	$(PY) benches/mqtt_bench.py

# Cases over all fuzz targets (split by fixed shares); FUZZ_SEED replays a run, FUZZ_TARGETS=http,jwt.mutated picks.
FUZZ_CASES ?= 1000000
.PHONY: soak
soak: build timescaledb ## ingest at 80 % of the maximum for SOAK_SECONDS (600) with subscribers, exports, webhooks
	$(PY) benches/soak.py

.PHONY: fuzz-api
FUZZ_API_EXAMPLES ?= 100
FUZZ_API_CHECKS ?= not_a_server_error
fuzz-api: build timescaledb ## schemathesis over /openapi.json as admin, operator, viewer, anonymous: no 5xx (FUZZ_API_EXAMPLES=100; FUZZ_API_CHECKS=all: every check)
	FUZZ_API_EXAMPLES=$(FUZZ_API_EXAMPLES) FUZZ_API_CHECKS=$(FUZZ_API_CHECKS) $(PY) tests/schema_fuzz.py

.PHONY: fuzz
fuzz: ## fuzz the frame parser, JWT check, WebSocket request handling, COPY decoder, line protocol (FUZZ_CASES=1000000)
	FUZZ_CASES=$(FUZZ_CASES) cargo test -q --profile fuzz -p webmacs-core --test fuzz -- --ignored --exact fuzz --nocapture

.PHONY: clean
clean: ## remove build outputs (keeps the local cluster)
	rm -rf target dist $(VENV) $(CORE_SO)
