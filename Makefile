# cleave: the two commands a newcomer needs are `make run` and `make test`.
# Everything they need is installed by scripts/install-deps.sh (idempotent).

SHELL := /bin/bash
CARGO ?= cargo
TRIPLE := x86_64-unknown-linux-gnu
GUEST_BIN := target/guest/$(TRIPLE)/release/cleave-guest
CLEAVE := target/debug/cleave

.PHONY: run test deps guest image rig build lint unit bench bench-boot bench-net bench-image entropy clean-cache manifests fuzz

## make run: install what is missing, build images and agent, run the main job
## (boot the default image and time the guest agent's readiness, then run commands in a
## guest over vsock: scripts/demo.sh), inside the rig where this host's KVM cannot run a
## Linux guest.
run: deps image rig build
	@scripts/kvm-or-rig scripts/demo.sh

## make test: the whole suite (formatting, lints, unit, KVM-ioctl, namespace and rig tests).
test: deps image rig manifests
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) build --workspace --all-targets
	$(CARGO) test --workspace --no-fail-fast
	@scripts/fuzz.sh $(FUZZ_SECS)

## Fuzz every parser a guest or the network reaches (tests/fuzz), FUZZ_SECS per target:
## `make fuzz FUZZ_SECS=3600` for a long run.
FUZZ_SECS ?= 15
fuzz: deps
	@scripts/fuzz.sh $(FUZZ_SECS)

deps:
	@scripts/install-deps.sh

## The Kubernetes manifests, checked offline: strict API schemas (kubernetes-validate from
## PyPI, in a venv under the cache), the daemon's TOML config, images pinned by digest.
manifests: deps
	@scripts/validate-manifests.sh

# The guest agent is PID 1 in an initramfs with no libc: link it statically, and without
# symbols or debug info (it is in every image and every template's memory: 16 MiB with
# them, 3 MiB without). Its own target dir keeps these flags from invalidating the host
# build.
guest:
	RUSTFLAGS="-C target-feature=+crt-static -C strip=symbols" $(CARGO) build --release -p cleave-guest \
	  --target $(TRIPLE) --target-dir target/guest

image: guest
	@images/build-image.sh $(GUEST_BIN)

rig:
	@images/rig/build-rig.sh

build:
	$(CARGO) build --workspace

## Every benchmark of docs/PERFORMANCE.md in one run, each beside its peer or baseline,
## written to docs/bench/DATE-KVM.md with the date and environment (scripts/bench.sh):
## host rows here, guest rows on hardware KVM or in the rig. `make bench BENCH="fork churn"`
## runs only those sections (`scripts/bench.sh --help` lists them).
BENCH ?=
bench: deps image rig
	$(CARGO) build --release -p cleave-agent -p cleave-tests -p cleave-netfilter \
	  -p cleave-dnsproxy -p cleave-guest --bins --examples
	@scripts/bench.sh $(BENCH)

## Boot-time benchmark: cleave vs QEMU -M microvm on the same kernel and initramfs.
bench-boot: deps image rig
	$(CARGO) build --release -p cleave-agent
	@CLEAVE_BIN=target/release/cleave scripts/kvm-or-rig python3 scripts/bench-boot.py --cleave $(CURDIR)/target/release/cleave

## Networking benchmark: fork -> ready with vs without a network, connect time and
## throughput from a guest, on the test lab (no traffic leaves the machine).
bench-net: deps image rig
	$(CARGO) build --release -p cleave-agent
	@CLEAVE_BIN=target/release/cleave scripts/kvm-or-rig python3 scripts/bench-net.py --cleave $(CURDIR)/target/release/cleave

## Images users bring: build time and size (host), template creation, fork -> ready, cold
## boot and idle memory per fork for the busybox, Python, 10 MiB and 500 MiB images (rig).
BENCH_IMAGES := $${CLEAVE_CACHE:-$$HOME/.cache/cleave}/bench-image/images
bench-image: deps image rig
	$(CARGO) build --release -p cleave-agent -p cleave-tests
	python3 scripts/bench-image.py prepare $(BENCH_IMAGES)
	@CLEAVE_BIN=target/release/cleave CLEAVE_RIG_MEM_MIB=$${CLEAVE_RIG_MEM_MIB:-8192} \
	  scripts/kvm-or-rig python3 scripts/bench-image.py measure $(BENCH_IMAGES)

## Entropy at scale: FORKS Linux guests of one template (BATCH alive at a time), every
## fork's first getrandom block distinct from all others and from the template's.
FORKS ?= 2000
BATCH ?= 25
entropy: deps image rig
	$(CARGO) build --release -p cleave-agent
	@CLEAVE_BIN=target/release/cleave CLEAVE_RIG_TIMEOUT_SECS=$${CLEAVE_RIG_TIMEOUT_SECS:-7200} \
	  scripts/kvm-or-rig sh scripts/entropy-at-scale.sh $(FORKS) $(BATCH)

clean-cache:
	rm -rf "$${CLEAVE_CACHE:-$$HOME/.cache/cleave}"
