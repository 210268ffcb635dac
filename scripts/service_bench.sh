#!/usr/bin/env bash
# Service benchmarks on loopback: starts `bdscan serve` (API only, SQLite in a temp dir),
# runs examples/service_bench.rs against it for each upload size, stops the server, and
# prints a Markdown section (append it to BENCHMARKS.md by hand or via `make bench`).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --bin bdscan --example service_bench >&2
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
echo "## Service (bdscan serve, SQLite, API only, loopback)"
echo
echo "8 clients upload at once (raw body, streamed); the server's RSS is sampled every 20 ms."
echo "Then 5,000 GET /v1/jobs/{id} with 16 in flight. Command: scripts/service_bench.sh."
echo
echo "| upload each | upload MiB/s (all clients) | server RSS before | server peak RSS | status req/s | p50 ms | p99 ms |"
echo "|---|---|---|---|---|---|---|"
for mb in 20 200; do
    data=$(mktemp -d)
    ./target/debug/bdscan serve --listen "127.0.0.1:$PORT" --data-dir "$data" --workers 0 --max-blob-bytes $((1 << 30)) >"$data/server.log" 2>&1 &
    pid=$!
    for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null && break; sleep 0.1; done
    out=$(./target/debug/examples/service_bench "http://127.0.0.1:$PORT" "$pid" 8 "$mb" 5000 16)
    kill "$pid"; wait "$pid" || true
    rm -rf "$data"
    python3 - "$out" "$mb" <<'PYEOF'
import json, sys
r = json.loads(sys.argv[1])
print(f"| {sys.argv[2]} MiB | {r['upload_mib_per_second']} | {r['server_rss_before_mib']} MiB | {r['server_peak_rss_mib']} MiB | {r['status_rps']:.0f} | {r['status_p50_ms']} | {r['status_p99_ms']} |")
PYEOF
done
