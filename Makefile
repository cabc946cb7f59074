# The two commands a new user needs: `make run` and `make test`.
# Everything they need (the pinned toolchain and the guest target) is
# installed on first use from rust-toolchain.toml.

CARGO ?= cargo
VMM := target/x86_64-unknown-linux-gnu/release/vmm

.PHONY: all setup build run test test-unit test-guest test-schemathesis lint bench fuzz clean

all: build

# rustup reads rust-toolchain.toml (channel 1.95.0 + x86_64-unknown-none).
setup:
	@command -v rustup >/dev/null || { echo "rustup is required: https://rustup.rs"; exit 1; }
	@rustup toolchain install >/dev/null 2>&1 || rustup toolchain install
	@rustup target list --installed | grep -qx x86_64-unknown-none || rustup target add x86_64-unknown-none

build: setup
	$(CARGO) build --release --locked

# The main job on the embedded default guest: boot a 2 GiB microVM (boot log
# and timings), then the four memmap strategies side by side.
run: build
	$(VMM) run --mem-mib 2048 --cmdline workload=exit
	@echo
	$(VMM) compare --mem-mib 2048 --alloc-mib 256

# Every test: contract, API types, the monitor's unit tests, the client, the
# lab, the binary, integration tests that boot real VMs (tests/), and the
# guest memory manager's host tests.
test: setup test-guest test-schemathesis
	$(CARGO) test --release --locked --workspace

# schemathesis (every check) against a `vmm serve` and a `vmm run`, over
# their Unix sockets (tests/schemathesis/run.sh; about a minute). Installed
# into .venv (git-ignored) from tests/schemathesis/requirements.txt.
VENV := .venv
SCHEMATHESIS_STAMP := $(VENV)/.installed
SCHEMATHESIS_MAX_EXAMPLES ?= 25
$(SCHEMATHESIS_STAMP): tests/schemathesis/requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r tests/schemathesis/requirements.txt
	touch $@

test-schemathesis: build $(SCHEMATHESIS_STAMP)
	MAX_EXAMPLES=$(SCHEMATHESIS_MAX_EXAMPLES) tests/schemathesis/run.sh $(VENV) $(VMM)

# The guest library's host tests twice: release (as the kernel is built) and
# the dev/test profile (opt-level 1, debug assertions and overflow checks on,
# so the checks the release build compiles out run too).
test-guest: setup
	cd guest-kernel && $(CARGO) test --release --locked
	cd guest-kernel && $(CARGO) test --locked

# Clippy (warnings are errors, every unsafe block documented) and rustdoc
# (broken links and missing docs are errors) for the host workspace and the
# guest kernel. CI runs it after `make test`.
lint: setup
	$(CARGO) clippy --release --locked --workspace --all-targets -- -D warnings
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --release --locked --workspace --no-deps
	cd guest-kernel && $(CARGO) clippy --release --locked --all-targets -- -D warnings
	cd guest-kernel && $(CARGO) clippy --release --locked --target x86_64-unknown-none --bin guest-kernel -- -D warnings
	cd guest-kernel && RUSTDOCFLAGS="-D warnings" $(CARGO) doc --release --locked --no-deps

# Benchmarks (not tests; no time is asserted): boot per strategy, allocator
# fast path, memmap init cost per struct page, reclaim (full/data/off, churn).
# Takes several minutes; results in
# bench-results/bench.json, table on stdout. See docs/benchmarks.md.
BENCH_OUT ?= bench-results
bench: build
	$(VMM) bench --out $(BENCH_OUT) $(BENCH_ARGS)

# The cargo-fuzz targets (fuzz/), each for FUZZ_SECONDS. They need nightly
# (installed here if missing, with the guest target the build script needs)
# and cargo-fuzz; `make test` does not. Corpora and crashes stay in
# fuzz/corpus and fuzz/artifacts. See docs/security.md.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := api_request stats_block port_io kernel_image reclaim_report
fuzz: setup
	@rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
	@rustup target list --installed --toolchain nightly | grep -qx x86_64-unknown-none || rustup target add x86_64-unknown-none --toolchain nightly
	@command -v cargo-fuzz >/dev/null || $(CARGO) +nightly install cargo-fuzz --locked
	cd fuzz && for t in $(FUZZ_TARGETS); do \
		$(CARGO) +nightly fuzz run $$t -- -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 || exit 1; \
	done

clean:
	$(CARGO) clean
	cd guest-kernel && $(CARGO) clean
