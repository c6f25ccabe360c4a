#!/usr/bin/env bash
# Storage backends side by side (issue 20): the overlap matrix of two lists (default 1M rows
# each, from ../shared/bench/gen_accounts.py) on the single-node default (SQLite catalog,
# sealed files in the data directory) and on PostgreSQL + S3 (a fresh database on
# ESCROW_BENCH_POSTGRES, default postgres://postgres@127.0.0.1:5432/postgres, and a bucket on
# moto's S3 server: bench/s3.sh), in one run, through the full service path as acme:
#   upload   both uploads with matching (CLI, wall time)
#   first    the first matrix after the uploads (decrypts both lists from the object store)
#   warm     median of 200 repeats a second after the first (the kept answer: catalog reads only)
#   restart  after a server restart, a new matrix (a population added): every list read
#            again from the object store, nothing cached
#   peak MB  the server's peak resident memory (VmHWM) over the uploads, first and warm
#            answers; and the restarted server's over its matrix
# and the ratios PostgreSQL+S3 / default. Usage: bench/storage.sh [ROWS] (past 1M rows, the
# lists are renamed copies of the 1M lists: bench/common.sh)
source "$(dirname "$0")/common.sh"
source bench/s3.sh
generate_lists
PG_SERVER="${ESCROW_BENCH_POSTGRES:-postgres://postgres@127.0.0.1:5432/postgres}"
DB="escrow_storage_$$"
WORK="$(mktemp -d)"
PID=""
cleanup() {
  [ -n "$PID" ] && kill "$PID" 2>/dev/null || true
  stop_s3
  wait 2>/dev/null || true
  psql -q "$PG_SERVER" -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

serve() {  # serve DATA NAME: start a node, export ESCROW_SERVER
  "$BIN" serve --data-dir "$1" --listen 127.0.0.1:0 > "$OUT/storage-$2.out" 2> "$OUT/storage-$2.log" &
  PID=$!
  for _ in $(seq 600); do grep -q listening "$OUT/storage-$2.out" 2>/dev/null && break; sleep 0.1; done
  export ESCROW_SERVER="$(sed -n 's/^escrow listening on //p' "$OUT/storage-$2.out")"
}

matrix() {  # matrix IDENTITY REPEATS: seconds of the first answer, then the median of REPEATS more
  python3 - "$ESCROW_SERVER" "$1" "$2" <<'PY'
import json, statistics, sys, time
sys.path.insert(0, "bench")
from mtls import connect
server, ident, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3])
conn = connect(server, ident)
def ask():
    t0 = time.perf_counter()
    conn.request("POST", "/v1/overlaps", body=json.dumps({"with": "globex"}),
                 headers={"content-type": "application/json"})
    r = conn.getresponse()
    body = r.read()
    assert r.status == 200, body
    return time.perf_counter() - t0
first = ask()
# The steady state: after what the first answer set going has settled, many asks.
time.sleep(1)
warm = [ask() for _ in range(repeats)]
print(f"{first:.6f} {statistics.median(warm) if warm else 0:.6f}")
PY
}

run() {  # run NAME: the whole sequence on the storage the environment names
  local name=$1 data="$WORK/$1/data"
  "$BIN" init --data-dir "$data" > /dev/null
  for p in acme globex; do "$BIN" partner add "$p" --data-dir "$data" > /dev/null; done
  serve "$data" "$name"
  local t0 t1
  t0=$(date +%s.%N)
  for p in acme globex; do
    I="$data/identities/$p/admin"
    "$BIN" upload "$GEN/$p.arrow" --dataset accounts --key-column website --name-column company_name \
      --name-context region --identity "$I" > /dev/null
  done
  t1=$(date +%s.%N)
  share_for_overlap "$data/identities/acme/admin" globex
  share_for_overlap "$data/identities/globex/admin" acme
  read -r first warm < <(matrix "$data/identities/acme/admin" 200)
  local peak
  peak=$(awk '/VmHWM/ {print $2 / 1024}' "/proc/$PID/status")
  kill "$PID"; wait "$PID" 2>/dev/null || true
  serve "$data" "$name-restarted"
  "$BIN" population add accounts everyone --filter "status IN ('customer', 'opportunity', 'prospect')" \
    --identity "$data/identities/acme/admin" > /dev/null
  read -r restart _ < <(matrix "$data/identities/acme/admin" 0)
  local peak_restart
  peak_restart=$(awk '/VmHWM/ {print $2 / 1024}' "/proc/$PID/status")
  kill "$PID"; wait "$PID" 2>/dev/null || true
  PID=""
  printf '%s %.2f %s %s %s %.0f %.0f\n' "$name" "$(python3 -c "print($t1 - $t0)")" "$first" "$warm" "$restart" "$peak" "$peak_restart"
}

echo "== $ROWS rows per list; default (SQLite + data directory), then PostgreSQL + S3 (moto)"
DEFAULT=$(env -u ESCROW_CATALOG -u ESCROW_OBJECTS bash -c "$(declare -f serve matrix run share_for_overlap); BIN=$BIN OUT=$OUT GEN=$GEN WORK=$WORK; run default")
echo "$DEFAULT"
psql -q "$PG_SERVER" -c "CREATE DATABASE $DB"
start_s3 storage
SHARED_RUN=$(ESCROW_CATALOG="${PG_SERVER%/*}/$DB" bash -c "$(declare -f serve matrix run share_for_overlap); BIN=$BIN OUT=$OUT GEN=$GEN WORK=$WORK; run pg+s3")
echo "$SHARED_RUN"
python3 - "$DEFAULT" "$SHARED_RUN" <<'PY' | tee "$OUT/storage-$ROWS.txt"
import sys
d, s = (line.split() for line in sys.argv[1:3])
print(f"{'':10} {'default':>10} {'pg+s3':>10} {'ratio':>7}")
for i, what in enumerate(["upload", "first", "warm", "restart"], start=1):
    a, b = float(d[i]), float(s[i])
    print(f"{what:10} {a:10.6f} {b:10.6f} {b / a:7.2f}x")
for i, what in ((5, "peak MB"), (6, "peak MB r")):
    a, b = float(d[i]), float(s[i])
    print(f"{what:10} {a:10.0f} {b:10.0f} {b / a:7.2f}x")
PY
