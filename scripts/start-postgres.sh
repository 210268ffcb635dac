#!/usr/bin/env bash
# Starts a throwaway PostgreSQL 15 on 127.0.0.1 for the API tests and prints its URL.
#
#   export BDSCAN_TEST_POSTGRES_URL=$(scripts/start-postgres.sh)
#   ...
#   scripts/start-postgres.sh --stop "$BDSCAN_TEST_POSTGRES_URL"   # or: pg_ctl -D <dir> stop
#
# Runs the server as the `postgres` user when started as root (initdb refuses root).
# PORT (default: a free one) and PGDATA_DIR (default: a new temp dir) can be set.
set -euo pipefail

pg_bin() {
    for dir in /usr/lib/postgresql/15/bin /usr/local/bin; do
        if [[ -x "$dir/$1" ]]; then echo "$dir/$1"; return; fi
    done
    command -v "$1" || { echo "start-postgres: $1 not found" >&2; exit 1; }
}
INITDB=$(pg_bin initdb)
PG_CTL=$(pg_bin pg_ctl)

as_pg() {
    if [[ $(id -u) -eq 0 ]]; then su postgres -s /bin/bash -c "$1"; else bash -c "$1"; fi
}

if [[ ${1:-} == --stop ]]; then
    dir_file="/tmp/bdscan-pg-$(echo "${2:?URL}" | sed -E 's#.*:([0-9]+)/.*#\1#').dir"
    as_pg "$PG_CTL -D $(cat "$dir_file") -m fast stop" >&2
    rm -rf "$(cat "$dir_file")" "$dir_file"
    exit 0
fi

PORT=${PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
DIR=${PGDATA_DIR:-$(mktemp -d /tmp/bdscan-pg.XXXXXX)}
if [[ $(id -u) -eq 0 ]]; then chown postgres: "$DIR"; fi
as_pg "$INITDB -D $DIR -U postgres --auth=trust -E UTF8 >/dev/null"
as_pg "$PG_CTL -D $DIR -l $DIR/server.log -w -o '-p $PORT -k /tmp -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200' start >/dev/null"
echo "$DIR" > "/tmp/bdscan-pg-$PORT.dir"
echo "postgres://postgres@127.0.0.1:$PORT/postgres"
