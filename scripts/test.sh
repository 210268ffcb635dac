#!/usr/bin/env bash
# The whole test suite: unit and integration tests against real libtorch, real files,
# and (for the service) a real PostgreSQL started here for the run.
set -euo pipefail
cd "$(dirname "$0")/.."
export BDSCAN_PYTHON="$PWD/.venv/bin/python"
cargo build --all-targets
cargo test --all-targets -- --test-threads=2
