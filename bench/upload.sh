#!/usr/bin/env bash
# Upload benchmark, side by side with DuckDB (the issue's reference):
#   1. 1M-row partner list from ../shared/bench/gen_accounts.py (Arrow IPC file)
#   2. `escrow upload acme.arrow` end to end over mTLS: wall time, MB/s, peak server RSS
#   3. DuckDB (Python) loading the same Arrow file into an on-disk table: wall time; and
#      loading it with website and name keys computed in SQL (the normalising load)
#   4. a ~1 GB Arrow file (the 1M list repeated) uploaded: peak server RSS (target < 256 MB)
#   5. the same list as Parquet (pyarrow's defaults, and with 16 KiB pages): escrow upload
#      beside DuckDB loading the same file
#   6. the sealing micro-benchmark (cargo bench --bench seal)
# Usage: bench/upload.sh [ROWS]   (default 1000000). Needs: pip install pyarrow duckdb
#        UPLOAD_BENCH_ONLY=parquet bench/upload.sh   runs step 5 alone
source "$(dirname "$0")/common.sh"

generate_lists
ARROW="$OUT/gen-$ROWS/acme.arrow"
BIG="$OUT/gen-$ROWS/acme-1gb.arrow"
PARQUET="$OUT/gen-$ROWS/acme.parquet"
PARQUET_16K="$OUT/gen-$ROWS/acme-16k-pages.parquet"
if [ ! -f "$PARQUET_16K" ]; then
  python3 - "$ARROW" "$PARQUET" "$PARQUET_16K" <<'PY'
import sys, pyarrow.ipc as ipc, pyarrow.parquet as pq
t = ipc.open_file(sys.argv[1]).read_all()
pq.write_table(t, sys.argv[2])
pq.write_table(t, sys.argv[3], data_page_size=16384)
PY
fi
if [ ! -f "$BIG" ]; then
  python3 - "$ARROW" "$BIG" <<'PY'
import sys, pyarrow as pa, pyarrow.ipc as ipc
src, dst = sys.argv[1], sys.argv[2]
t = ipc.open_file(src).read_all()
reps = max(1, int(1_000_000_000 // t.nbytes) + 1)
with ipc.new_file(dst, t.schema) as w:
    for _ in range(reps):
        w.write_table(t, max_chunksize=65536)
PY
fi

DATA="$(mktemp -d)/data"
"$BIN" init --data-dir "$DATA" > /dev/null
"$BIN" partner add acme --data-dir "$DATA" > /dev/null
"$BIN" serve --data-dir "$DATA" --listen 127.0.0.1:0 --max-upload-bytes 4000000000 > "$OUT/serve.out" 2> "$OUT/serve.log" &
PID=$!
trap 'kill $PID 2>/dev/null || true; rm -rf "$(dirname "$DATA")"' EXIT
for _ in $(seq 100); do grep -q listening "$OUT/serve.out" 2>/dev/null && break; sleep 0.1; done
export ESCROW_SERVER="$(sed -n 's/^escrow listening on //p' "$OUT/serve.out")"
export ESCROW_IDENTITY="$DATA/identities/acme/admin"

now() { python3 -c 'import time; print(time.perf_counter())'; }
hwm_mb() { awk '/VmHWM/ {printf "%.0f", $2/1024}' "/proc/$PID/status"; }

# best_upload FILE DATASET: the best of 3 uploads of FILE (as DATASET1..3), in seconds
best_upload() {
  local best="" t0 t1
  for i in 1 2 3; do
    t0=$(now)
    "$BIN" upload "$1" --dataset "$2$i" --key-column website --name-column company_name > /dev/null
    t1=$(now)
    best=$(python3 -c "print(f'{min($t1 - $t0, float(\"${best:-1e9}\")):.3f}')")
  done
  echo "$best"
}

ONLY="${UPLOAD_BENCH_ONLY:-}"
if [ "$ONLY" != parquet ]; then
SIZE=$(stat -c %s "$ARROW")
best_escrow=$(best_upload "$ARROW" accounts)
RSS_1M=$(hwm_mb)

# duck_load ARROW SETTING CREATE: the best of 3 DuckDB loads of the Arrow file into an on-disk
# table, in seconds: the file read into `tbl` by pyarrow, then SETTING (if any), CREATE and a
# CHECKPOINT.
duck_load() {
  python3 - "$@" <<'PY'
import sys, time, os, tempfile, duckdb, pyarrow.ipc as ipc
best = 1e9
for i in range(3):
    d = tempfile.mkdtemp()
    t0 = time.perf_counter()
    tbl = ipc.open_file(sys.argv[1]).read_all()
    con = duckdb.connect(os.path.join(d, "db.duckdb"))
    if sys.argv[2]:
        con.execute(sys.argv[2])
    con.execute(sys.argv[3])
    con.execute("CHECKPOINT")
    con.close()
    best = min(best, time.perf_counter() - t0)
print(f"{best:.3f}")
PY
}

best_duck=$(duck_load "$ARROW" "" "CREATE TABLE accounts AS SELECT * FROM tbl")

# Issue 21's reference for an upload with matching: DuckDB loading the same file and
# normalising the same two columns in SQL (a website to its host without scheme, www, port
# or path; a name lowercased, accents and punctuation dropped, a trailing legal form cut),
# 2 threads. Simpler than escrow's keys (no Public Suffix List, no IDNA, no keyed ids).
best_duck_norm=$(duck_load "$ARROW" "SET threads = 2" "
    CREATE TABLE accounts AS SELECT *,
      regexp_replace(regexp_replace(lower(trim(website)), '^([a-z]+://)?(www[.])?', ''),
                     '[/:?#].*\$', '') AS company_key,
      trim(regexp_replace(regexp_replace(lower(strip_accents(company_name)), '[^a-z0-9]+', ' ', 'g'),
                          ' (inc|llc|ltd|limited|gmbh|ag|sa|corp|co|plc|bv|pty)\$', '')) AS name_key
    FROM tbl")

BIG_SIZE=$(stat -c %s "$BIG")
t0=$(now)
"$BIN" upload "$BIG" --dataset big --key-column website > /dev/null
t1=$(now)
big_s=$(python3 -c "print(f'{$t1-$t0:.3f}')")
RSS_1G=$(hwm_mb)

echo
echo "== upload of $ROWS-row Arrow file ($((SIZE / 1000000)) MB), best of 3"
python3 - <<PY
size=$SIZE; e=float("$best_escrow"); d=float("$best_duck")
print(f"escrow upload (mTLS, parse+validate, seal, fsync, commit): {e:.3f} s  {size/e/1e6:.0f} MB/s")
print(f"duckdb load (pyarrow read + CREATE TABLE AS + CHECKPOINT): {d:.3f} s  {size/d/1e6:.0f} MB/s")
print(f"ratio escrow/duckdb: {e/d:.2f}x  (target <= 1.5x)")
n=float("$best_duck_norm")
print(f"duckdb normalising load (the same, plus website and name keys in SQL, 2 threads): {n:.3f} s")
print(f"ratio escrow (upload with matching)/duckdb normalising load: {e/n:.2f}x  (issue 21 target <= 1.0x)")
PY
echo "server peak RSS after the 1M uploads: ${RSS_1M} MB"
echo
echo "== upload of a $((BIG_SIZE / 1000000)) MB Arrow file"
python3 -c "print(f'escrow upload: {float(\"$big_s\"):.2f} s  {$BIG_SIZE/float(\"$big_s\")/1e6:.0f} MB/s')"
echo "server peak RSS (VmHWM, whole run): ${RSS_1G} MB  (target < 256 MB)"
echo
fi
for f in "$PARQUET" "$PARQUET_16K"; do
  best_e=$(best_upload "$f" "pq$(basename "$f" .parquet | tr -c 'a-z0-9\n' '_')")
  best_d=$(python3 - "$f" <<'PY'
import sys, time, os, tempfile, duckdb
best = 1e9
for i in range(3):
    d = tempfile.mkdtemp()
    t0 = time.perf_counter()
    con = duckdb.connect(os.path.join(d, "db.duckdb"))
    con.execute("SET threads = 2")
    con.execute(f"CREATE TABLE accounts AS SELECT * FROM read_parquet('{sys.argv[1]}')")
    con.execute("CHECKPOINT")
    con.close()
    best = min(best, time.perf_counter() - t0)
print(f"{best:.3f}")
PY
)
  echo "== upload of $(basename "$f") ($(($(stat -c %s "$f") / 1000000)) MB), best of 3"
  python3 -c "e=$best_e; d=$best_d; print(f'escrow {e:.3f} s, duckdb {d:.3f} s, ratio {e/d:.2f}x')"
done
echo "server peak RSS (VmHWM, whole run): $(hwm_mb) MB"
[ "$ONLY" = parquet ] && exit 0
echo
echo "== sealing micro-benchmark (one core)"
cargo bench -p escrow --bench seal --quiet 2>/dev/null | grep -E "seal|open|target"
