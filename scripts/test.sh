#!/usr/bin/env bash
# The whole test suite: unit and integration tests against real libtorch, real files,
# real HTTP on 127.0.0.1, and a real PostgreSQL started here for the run (and stopped).
set -euo pipefail
cd "$(dirname "$0")/.."
export BDSCAN_PYTHON="$PWD/.venv/bin/python"

if [[ -z ${BDSCAN_TEST_POSTGRES_URL:-} ]]; then
    if [[ ! -x /usr/lib/postgresql/15/bin/initdb ]] && ! command -v initdb >/dev/null; then
        echo "test: installing PostgreSQL (Debian package)" >&2
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    fi
    BDSCAN_TEST_POSTGRES_URL=$(scripts/start-postgres.sh)
    export BDSCAN_TEST_POSTGRES_URL
    trap 'scripts/start-postgres.sh --stop "$BDSCAN_TEST_POSTGRES_URL" || true' EXIT
    echo "test: PostgreSQL at $BDSCAN_TEST_POSTGRES_URL" >&2
fi

cargo build --all-targets
cargo test --all-targets -- --test-threads=2
