#!/usr/bin/env bash
# Load: PARTNERS partners (default 20) upload and ask questions concurrently on loopback for
# SECONDS (default 300) against one release server on a fresh data directory. Each partner is
# one client thread over its own mutually authenticated TLS connection, looping: upload a new
# version of its account list (2,000 rows, ~150 KB) every 10th step, otherwise ask a question
# (its own counts by region; the join with its neighbour's accounts, which granted it; the
# overlap matrix with its neighbour). A 429 is retried after its Retry-After (counted apart);
# any other non-2xx or transport error is a failure. Reports p50/p99 per kind (of the answered
# attempt, and from first attempt to answer with 429 waits), failures, 429s,
# and the server's peak RSS (sampled every 0.5 s from /proc).
#
#   bench/load.sh [SECONDS] [PARTNERS]      (ESCROW_BIN=path skips the release build)
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_TO_RUN="${1:-300}"
PARTNERS="${2:-20}"
OUT="bench/out"
mkdir -p "$OUT"
if [ -z "${ESCROW_BIN:-}" ]; then
  cargo build --release --bin escrow --quiet
fi
BIN="${ESCROW_BIN:-${CARGO_TARGET_DIR:-target}/release/escrow}"

DATA="$(mktemp -d)/data"
"$BIN" init --data-dir "$DATA" > /dev/null
for i in $(seq -w 1 "$PARTNERS"); do "$BIN" partner add "p$i" --data-dir "$DATA" > /dev/null; done
"$BIN" serve --data-dir "$DATA" --listen 127.0.0.1:0 > "$OUT/load-serve.out" 2> "$OUT/load-serve.log" &
PID=$!
trap 'kill $PID 2>/dev/null || true; rm -rf "$(dirname "$DATA")"' EXIT
for _ in $(seq 100); do grep -q listening "$OUT/load-serve.out" 2>/dev/null && break; sleep 0.1; done
export ESCROW_SERVER="$(sed -n 's/^escrow listening on //p' "$OUT/load-serve.out")"

python3 bench/load.py "$ESCROW_SERVER" "$DATA" "$PID" "$SECONDS_TO_RUN" "$PARTNERS" "$BIN" | tee "$OUT/load.txt"
