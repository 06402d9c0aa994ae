# sdn-tunnel: the two commands of the README, and their parts.
#   make demo   installs what it needs, builds, brings up the two-cluster lab
#               and shows traffic in it (leaves it running: `make down`).
#   make test   fmt, clippy, unit tests and the lab end-to-end tests.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
CARGO ?= cargo
LAB := target/debug/lab

.PHONY: demo test deps build lint unit-and-e2e down crds

deps:
	bash scripts/install-deps.sh

build: deps
	$(CARGO) build --workspace --bins

# The lab, sdn-tunnel installed by its playbook, agents up, traffic shown
# (tests/e2e/src/bin/demo.rs). A lab left by an earlier demo is removed first.
demo: build
	$(LAB) down
	target/debug/demo

down:
	@if [ -x $(LAB) ]; then $(LAB) down; else echo "no lab binary: nothing to remove"; fi

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	shellcheck tests/e2e/kind/*.sh scripts/*.sh
	cd ansible && ansible-playbook --syntax-check -i inventory.example.yml site.yml uninstall.yml >/dev/null

unit-and-e2e:
	$(CARGO) build --workspace --bins
	$(CARGO) test --workspace --no-fail-fast

test: deps lint unit-and-e2e

# The data-path benchmark (not part of `make test`): ARGS="--quick" for a
# smoke run. See bench/run.sh.
.PHONY: bench
bench:
	bash bench/run.sh $(ARGS)

# The service proxy and DNS benchmark (not part of `make test`; needs root:
# it creates network namespaces). ARGS="--sizes 10,1000" for a shorter run.
.PHONY: bench-services
bench-services:
	cargo build --release -p sdn-tunnel-bench --bin sdn-bench-services
	./target/release/sdn-bench-services $(ARGS)

# The control-loop scale benchmark (issue 13; not part of `make test`; needs
# root: it brings up its own lab, scale70, underlay 10.70/16). One release
# agent against 10/100/1000 remote TunnelPeers; ARGS="--quick" for short
# windows, ARGS="--sizes 10,100 --agent <path>" to choose.
.PHONY: bench-scale
bench-scale:
	cargo build --release -p sdn-tunnel-agent --bin tunnel-agent -p sdn-tunnel-lab --bin lab -p sdn-tunnel-bench --bin sdn-bench-scale
	./target/release/sdn-bench-scale $(ARGS)

# sdn-tunnel's image without Docker or a registry (scripts/build-image.sh):
# OCI archives of localhost/sdn-tunnel:<version> and of the kubelet lab's
# pause and tools images. PROFILE=debug packs the `cargo build` binaries.
.PHONY: image e2e-kubelet demo-kubelet down-kubelet
image: deps
	bash scripts/build-image.sh

# The e2e on real kubelets (tests/e2e/tests/kubelet.rs; not in `make test`
# yet, see the README): ansible/site.yml into a two-cluster lab of real
# nodes, then real pods, DNS, delete-pod and rolling-update gaps, uninstall.
e2e-kubelet: deps
	$(CARGO) build --workspace --bins
	PROFILE=debug bash scripts/build-image.sh >/dev/null
	$(CARGO) test -p sdn-tunnel-e2e --test kubelet -- --ignored --nocapture

# `make demo` on real kubelets (slower: about 2 minutes to a Running
# DaemonSet). Leaves the lab running: `make down-kubelet`.
demo-kubelet: build
	PROFILE=debug bash scripts/build-image.sh >/dev/null
	bash scripts/demo-kubelet.sh

down-kubelet:
	@if [ -x $(LAB) ]; then $(LAB) down --name kdemo; else echo "no lab binary: nothing to remove"; fi
