# m365-sensor: the targets a person and CI use. See README.md.
CARGO ?= cargo
DEMO_RECORDS ?= 5000

.PHONY: all build demo test test-packaging dist test-dist lint fmt bench fuzz clean

all: build

## Build every binary of the workspace (the agent, the simulator, the receiver).
build:
	$(CARGO) build --workspace --bins

## Run the main job on the embedded default: a simulated tenant and backend on loopback, with live progress.
demo:
	$(CARGO) run -q -p m365-sensor -- demo --records $(DEMO_RECORDS)

## Unit, property and black-box tests (the black-box suites start the real binaries), then packaging, the
## static binaries (the aarch64 one under qemu-user) and the x86_64 appliance image booted under QEMU
## (image/image.mk; needs root and image/host-deps.sh).
test: build
	$(CARGO) test --workspace --no-fail-fast
	$(MAKE) test-packaging
	$(MAKE) test-dist
	$(MAKE) test-image

## The systemd unit's exposure score and the .deb installed into a scratch root (needs root, systemd-analyze).
test-packaging: build
	tests/packaging/run.sh target/debug/m365-sensor

## Static appliance binaries (musl) for x86_64 and aarch64 in dist/bin (see scripts/dist.sh for what it needs).
dist:
	scripts/dist.sh

## Runs the static binaries: x86_64 natively, aarch64 under qemu-aarch64-static.
test-dist: dist
	scripts/check-dist.sh

## Formatting, lints and the dependency policy (deny.toml) are policy (also for the appliance build).
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy -p m365-sensor --no-default-features -- -D warnings
	scripts/deny.sh

fmt:
	$(CARGO) fmt --all

## Coverage-guided fuzzing of the hostile-input parsers (cargo-fuzz, installed when missing): FUZZ_SECONDS
## per target, run counts printed; fails on a crash. CI runs it briefly.
FUZZ_SECONDS ?= 60
fuzz:
	scripts/fuzz.sh $(FUZZ_SECONDS)

include image/image.mk

## Benchmarks print figures; no test asserts a time (docs/BENCHMARKS.md). spool-bench measures the
## physical-limit baselines (plain-file append + fdatasync, sled, codecs, JSON) on the same disk (BENCH_DIR,
## default target/bench-tmp) and prints every spool figure as a ratio to them, the lone writer also paired
## with its baseline round by round (ROUNDS, default 5); dedup-bench loads a dedup
## window of 10 million record Ids (DEDUP_IDS=n); the criterion microbenchmarks time each stage briefly
## (BENCH_SECS each). The end-to-end runs start the release binaries (simulator, sensor, receiver): the
## multi-tenant run with 5, then TENANTS (default 200) tenants; the drain run collects a backlog of
## BACKLOG_MB (default 256; the issue's figure is 4096) during a backend outage, then drains it.
BENCH_SECS ?= 2
TENANTS ?= 200
BACKLOG_MB ?= 256
bench:
	$(CARGO) build -q --release --workspace --bins
	$(CARGO) run -q --release -p sensor-bench --bin spool-bench
	$(CARGO) run -q --release -p sensor-bench --bin dedup-bench
	$(CARGO) bench -q -p sensor-bench --bench stages -- --warm-up-time 1 --measurement-time $(BENCH_SECS)
	TENANTS=5 $(CARGO) run -q --release -p sensor-blackbox --bin multi-tenant-bench
	TENANTS=$(TENANTS) $(CARGO) run -q --release -p sensor-blackbox --bin multi-tenant-bench
	BACKLOG_MB=$(BACKLOG_MB) $(CARGO) run -q --release -p sensor-blackbox --bin drain-bench

clean:
	$(CARGO) clean
