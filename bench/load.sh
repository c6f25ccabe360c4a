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
#
# CATALOG=postgres: the catalog in a fresh PostgreSQL database (created on ESCROW_BENCH_POSTGRES,
# default postgres://postgres@127.0.0.1:5432/postgres, with psql; dropped at the end), and
# NODES=N (default 1) escrow nodes on it and on one data directory, partner i talking to node
# i mod N. CATALOG=sqlite (the default) allows one node. OBJECTS=s3: the sealed datasets in a
# bucket of a real S3 server (moto's, started here: bench/s3.sh) instead of the data directory.
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

CATALOG="${CATALOG:-sqlite}"
NODES="${NODES:-1}"
OBJECTS="${OBJECTS:-local}"
source bench/s3.sh
DATA="$(mktemp -d)/data"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  stop_s3
  wait 2>/dev/null || true
  if [ -n "${DB:-}" ]; then psql -q "$PG_SERVER" -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" || true; fi
  rm -rf "$(dirname "$DATA")"
}
trap cleanup EXIT
case "$CATALOG" in
  sqlite) [ "$NODES" = 1 ] || { echo "NODES=$NODES needs CATALOG=postgres" >&2; exit 2; } ;;
  postgres)
    PG_SERVER="${ESCROW_BENCH_POSTGRES:-postgres://postgres@127.0.0.1:5432/postgres}"
    DB="escrow_bench_$$"
    psql -q "$PG_SERVER" -c "CREATE DATABASE $DB"
    export ESCROW_CATALOG="${PG_SERVER%/*}/$DB" ;;
  *) echo "CATALOG is sqlite or postgres" >&2; exit 2 ;;
esac
case "$OBJECTS" in
  local) ;;
  s3) start_s3 load ;;
  *) echo "OBJECTS is local or s3" >&2; exit 2 ;;
esac
"$BIN" init --data-dir "$DATA" > /dev/null
for i in $(seq -w 1 "$PARTNERS"); do "$BIN" partner add "p$i" --data-dir "$DATA" > /dev/null; done
URLS=()
for n in $(seq 1 "$NODES"); do
  "$BIN" serve --data-dir "$DATA" --listen 127.0.0.1:0 > "$OUT/load-serve-$n.out" 2> "$OUT/load-serve-$n.log" &
  PIDS+=($!)
  for _ in $(seq 100); do grep -q listening "$OUT/load-serve-$n.out" 2>/dev/null && break; sleep 0.1; done
  URLS+=("$(sed -n 's/^escrow listening on //p' "$OUT/load-serve-$n.out")")
done
echo "catalog: $CATALOG, objects: $OBJECTS, nodes: $NODES"

python3 bench/load.py "$(IFS=,; echo "${URLS[*]}")" "$DATA" "$(IFS=,; echo "${PIDS[*]}")" \
  "$SECONDS_TO_RUN" "$PARTNERS" "$BIN" | tee "$OUT/load-$CATALOG-$OBJECTS-$NODES.txt"
