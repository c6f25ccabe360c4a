#!/usr/bin/env bash
# Storage backends side by side (issue 20): the overlap matrix of two lists (default 1M rows
# each, from ../shared/bench/gen_accounts.py) on the single-node default (SQLite catalog,
# sealed files in the data directory) and on PostgreSQL + S3 (a fresh database on
# ESCROW_BENCH_POSTGRES, default postgres://postgres@127.0.0.1:5432/postgres, and a bucket on
# moto's S3 server: bench/s3.sh), in one run, through the full service path as acme:
#   upload   both uploads with matching (CLI, wall time)
#   first    the first matrix after the uploads (decrypts both lists from the object store)
#   warm     the kept answer (catalog reads only): both restarted servers stay up, and a
#            repeated matrix is asked of each in turn, 400 times each (which goes first
#            alternates), so both medians come from the same minutes of the machine
#   restart  after a server restart, a new matrix (a population added): every list read
#            again from the object store, nothing cached
#   peak MB  the server's peak resident memory (VmHWM) over the uploads and the first
#            answer; and the restarted server's over its matrix
# and the ratios PostgreSQL+S3 / default. Usage: bench/storage.sh [ROWS] (past 1M rows, the
# lists are renamed copies of the 1M lists: bench/common.sh)
source "$(dirname "$0")/common.sh"
source bench/s3.sh
generate_lists
PG_SERVER="${ESCROW_BENCH_POSTGRES:-postgres://postgres@127.0.0.1:5432/postgres}"
DB="escrow_storage_$$"
WORK="$(mktemp -d)"
PID=""
LIVE=()  # the restarted servers kept up for the warm answers
cleanup() {
  [ -n "$PID" ] && kill "$PID" 2>/dev/null || true
  for p in "${LIVE[@]}"; do kill "$p" 2>/dev/null || true; done
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
import statistics, sys, time
sys.path.insert(0, "bench")
from mtls import connect, timed_overlap
server, ident, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3])
conn = connect(server, ident)
def ask():
    return timed_overlap(conn)
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
  read -r first _ < <(matrix "$data/identities/acme/admin" 0)
  local peak
  peak=$(awk '/VmHWM/ {print $2 / 1024}' "/proc/$PID/status")
  kill "$PID"; wait "$PID" 2>/dev/null || true
  serve "$data" "$name-restarted"
  "$BIN" population add accounts everyone --filter "status IN ('customer', 'opportunity', 'prospect')" \
    --identity "$data/identities/acme/admin" > /dev/null
  read -r restart _ < <(matrix "$data/identities/acme/admin" 0)
  local peak_restart
  peak_restart=$(awk '/VmHWM/ {print $2 / 1024}' "/proc/$PID/status")
  # Left up (its output names it) for the warm answers of both backends, asked in turn.
  printf '%s %.2f %s %s %.0f %.0f %s %s %s\n' "$name" "$(python3 -c "print($t1 - $t0)")" "$first" "$restart" "$peak" "$peak_restart" "$PID" "$ESCROW_SERVER" "$data/identities/acme/admin"
}

warm() {  # warm SERVER_A IDENT_A SERVER_B IDENT_B REPEATS: median seconds of each's kept answer
  python3 - "$@" <<'PY'
import statistics, sys, time
sys.path.insert(0, "bench")
from mtls import connect, timed_overlap as ask
a, b = (connect(sys.argv[1], sys.argv[2]), connect(sys.argv[3], sys.argv[4]))
repeats = int(sys.argv[5])
for conn in (a, b):  # settle: connections up, anything the restart left to do done
    for _ in range(20):
        ask(conn)
time.sleep(1)
ta, tb = [], []
for i in range(repeats):
    if i % 2:
        tb.append(ask(b)); ta.append(ask(a))
    else:
        ta.append(ask(a)); tb.append(ask(b))
print(f"{statistics.median(ta):.6f} {statistics.median(tb):.6f}")
PY
}

echo "== $ROWS rows per list; default (SQLite + data directory), then PostgreSQL + S3 (moto)"
DEFAULT=$(env -u ESCROW_CATALOG -u ESCROW_OBJECTS bash -c "$(declare -f serve matrix run share_for_overlap); BIN=$BIN OUT=$OUT GEN=$GEN WORK=$WORK; run default")
read -r _ _ _ _ _ _ pid_d server_d ident_d <<< "$DEFAULT"
LIVE+=("$pid_d")
echo "$DEFAULT"
psql -q "$PG_SERVER" -c "CREATE DATABASE $DB"
start_s3 storage
SHARED_RUN=$(ESCROW_CATALOG="${PG_SERVER%/*}/$DB" bash -c "$(declare -f serve matrix run share_for_overlap); BIN=$BIN OUT=$OUT GEN=$GEN WORK=$WORK; run pg+s3")
read -r _ _ _ _ _ _ pid_s server_s ident_s <<< "$SHARED_RUN"
LIVE+=("$pid_s")
echo "$SHARED_RUN"
read -r warm_d warm_s < <(warm "$server_d" "$ident_d" "$server_s" "$ident_s" 400)
python3 - "$DEFAULT" "$SHARED_RUN" "$warm_d" "$warm_s" <<'PY' | tee "$OUT/storage-$ROWS.txt"
import sys
d, s = (line.split() for line in sys.argv[1:3])
warm = (float(sys.argv[3]), float(sys.argv[4]))
print(f"{'':10} {'default':>10} {'pg+s3':>10} {'ratio':>7}")
rows = [("upload", float(d[1]), float(s[1])), ("first", float(d[2]), float(s[2])),
        ("warm", *warm), ("restart", float(d[3]), float(s[3]))]
for what, a, b in rows:
    print(f"{what:10} {a:10.6f} {b:10.6f} {b / a:7.2f}x")
for i, what in ((4, "peak MB"), (5, "peak MB r")):
    a, b = float(d[i]), float(s[i])
    print(f"{what:10} {a:10.0f} {b:10.0f} {b / a:7.2f}x")
PY
