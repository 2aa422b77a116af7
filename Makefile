# Two commands from a fresh clone: `make demo` and `make test`. Each installs what it
# needs: a Rust toolchain (rustup, if cargo is missing), a `.venv` with maturin, numpy,
# torch and the test tools, and the release build of the extension inside it.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := test

VENV := .venv
PY := $(VENV)/bin/python
# The interpreter that creates the venv; override with `make PYTHON=python3.12`.
PYTHON ?= python3
PIP_PACKAGES := maturin numpy pytest pytest-timeout hypothesis ruff mypy matplotlib torch gymnasium

# cargo lives in ~/.cargo/bin on our machines, which is not always on PATH (CI, sudo, IDEs).
# The venv's bin comes first so `maturin`, `ruff` and `python` are the venv's own.
export PATH := $(CURDIR)/$(VENV)/bin:$(HOME)/.cargo/bin:$(PATH)
# maturin installs into the environment VIRTUAL_ENV names; pyo3 builds against this python.
export VIRTUAL_ENV := $(CURDIR)/$(VENV)
export PYO3_PYTHON := $(CURDIR)/$(PY)

# Examples and benchmarks that exist; each is run in CI with `--smoke` when it takes it.
EXAMPLES := $(wildcard examples/*.py)
SMOKE_BENCHES := $(wildcard benches/compare.py benches/rl.py benches/executor.py \
	benches/asyncio_bench.py benches/small.py)
RUFF_PATHS := $(wildcard python tests benches examples)

.PHONY: venv bench-env rust build test lint cargo-test failpoints loom pytest examples demo \
	bench soak clean distclean

# --- set-up ---------------------------------------------------------------------------

venv: $(VENV)/.stamp

# Re-run only when the Makefile (and so the package list) changes.
$(VENV)/.stamp: Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIP_PACKAGES)
	touch $@

# The peers benches/small.py compares against: never runtime or test dependencies, so they
# live in a venv of their own that sees .venv's packages (numpy, torch, tensorslab) through a
# .pth, which runs `site.addsitedir` so .venv's own .pth files (an editable install) apply.
BENCH_VENV := .venv-bench
BENCH_PY := $(BENCH_VENV)/bin/python
BENCH_PEERS := iceoryx2 faster-fifo dejaq spdl py-sharedmemory InterProcessPyObjects

bench-env: $(BENCH_VENV)/.stamp

# A peer that fails to install is reported by small.py as "not installed", so each is
# installed on its own and a failure does not stop the others.
$(BENCH_VENV)/.stamp: $(VENV)/.stamp Makefile
	test -x $(BENCH_PY) || $(PY) -m venv $(BENCH_VENV)
	$(PY) -c 'import site; print("import site; site.addsitedir(%r)" % site.getsitepackages()[0])' \
		> "$$($(BENCH_PY) -c 'import site; print(site.getsitepackages()[0])')/main-venv.pth"
	for peer in $(BENCH_PEERS); do \
		$(BENCH_PY) -m pip install "$$peer" || echo "bench-env: $$peer did not install" >&2; \
	done
	touch $@

# A stable toolchain with rustfmt and clippy; installed with rustup only when missing.
rust:
	@if ! command -v cargo >/dev/null; then \
		echo "cargo not found: installing the stable Rust toolchain with rustup"; \
		curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs \
			| sh -s -- -y --profile minimal --component rustfmt,clippy; \
	fi
	@cargo --version
	@cargo fmt --version >/dev/null 2>&1 || rustup component add rustfmt
	@cargo clippy --version >/dev/null 2>&1 || rustup component add clippy

build: venv rust
	$(VENV)/bin/maturin develop --release

# --- checks ---------------------------------------------------------------------------

test: build lint cargo-test failpoints loom pytest examples

# The binding is behind the `python` feature, so clippy runs once more with it on.
lint: venv rust
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	cargo clippy --features python -- -D warnings
	cargo clippy --features failpoints --all-targets -- -D warnings
	ruff check $(RUFF_PATHS)

cargo-test: rust
	cargo test

# Crash consistency: SIGKILL at every failpoint in every role, invariants checked after
# (tests/failpoints.rs prints the matrix). The feature is never in wheels.
failpoints: rust
	cargo test --features failpoints --test failpoints --test failpoints_fanout --test failpoints_sweep

# The loom models (`cfg(loom)`: the ring, the lock word with dead-holder breaking, the
# alloc-buffer references), two preemptions deep (the smaller models go to three), in
# their own target dir so they do not invalidate the normal build. Optimised, since a model
# runs its code thousands of times; but compiling is most of the cost, so no LTO, parallel
# codegen, and the dependencies that only parse LOOM_LOG or generate test cases (regex,
# tracing-subscriber, proptest) unoptimised: 50 s instead of 80 s on two cores.
LOOM_PROFILE := lto=false codegen-units=16 debug=false package."*".opt-level=0 \
	package.loom.opt-level=3 package.generator.opt-level=3 package.tracing.opt-level=3 \
	package.tracing-core.opt-level=3

loom: rust
	RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom LOOM_MAX_PREEMPTIONS=2 cargo test \
		$(foreach setting,$(LOOM_PROFILE),--config 'profile.release.$(setting)') \
		--release --lib loom

pytest: build
	$(PY) -m pytest -q

# Every example runs; one that takes `--smoke` runs in its short mode.
examples: build
	@for script in $(EXAMPLES) $(SMOKE_BENCHES); do \
		if grep -q -- '--smoke' "$$script"; then \
			echo "+ python $$script --smoke"; $(PY) "$$script" --smoke; \
		else \
			echo "+ python $$script"; $(PY) "$$script"; \
		fi; \
	done

# --- running --------------------------------------------------------------------------

demo: build
	$(PY) examples/demo.py

bench: build bench-env
	$(BENCH_PY) benches/small.py
	$(PY) benches/compare.py
	$(PY) benches/dataloader.py
	$(PY) benches/executor.py
	$(PY) benches/asyncio_bench.py

# Long run with random kills (issue 4); not part of `make test`.
soak: build
	@if [ -f tests/soak.py ]; then \
		$(PY) tests/soak.py; \
	else \
		echo "tests/soak.py does not exist yet (issue 4)" >&2; exit 1; \
	fi

# --- cleaning -------------------------------------------------------------------------

# Build outputs and caches; keeps the venv (torch is a large download).
clean:
	-cargo clean
	rm -f python/tensorslab/*.so
	rm -rf .pytest_cache .hypothesis .ruff_cache .mypy_cache benches/results
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) $(BENCH_VENV)
