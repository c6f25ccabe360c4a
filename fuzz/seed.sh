#!/usr/bin/env bash
# Seed corpora for the fuzz targets, written to OUT/TARGET (default fuzz/corpus, which cargo
# fuzz uses and .gitignore keeps out of the repo): the crash-regression corpus of
# tests/corpus/fuzz, small realistic account lists from ../shared/bench/gen_accounts.py as CSV,
# Arrow IPC (file and stream) and Parquet, Apache Arrow's malformed IPC files from
# ../shared/vectors, and every SQL statement the gate tests and black-box tests ask.
# Ingest seeds carry the targets' selector bytes (see tests/corpus/fuzz/README.md).
# Needs python3 with pyarrow.
#
#   fuzz/seed.sh [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-fuzz/corpus}"
SHARED="${ESCROW_SHARED_DIR:-../shared}"
mkdir -p "$OUT"/{ingest_csv,ingest_arrow,ingest_parquet,sql_gate}
for t in ingest_csv ingest_arrow ingest_parquet sql_gate; do
  cp tests/corpus/fuzz/$t/* "$OUT/$t/"
done
GEN="$(mktemp -d)"
trap 'rm -rf "$GEN"' EXIT
python3 "$SHARED/bench/gen_accounts.py" --out "$GEN" --rows 40 --seed 11 > /dev/null
python3 - "$GEN" "$OUT" "$SHARED/vectors/arrow-ipc-malformed" <<'PY'
import glob, os, sys
import pyarrow as pa, pyarrow.csv as pcsv, pyarrow.ipc as ipc, pyarrow.parquet as pq
gen, out, vectors = sys.argv[1:4]

def put(target, name, body, selectors):
    for s in selectors:
        with open(os.path.join(out, target, f"{name}-{s.hex()}"), "wb") as f:
            f.write(s + body)

keys = [bytes([k]) for k in range(3)]
for path in sorted(glob.glob(os.path.join(gen, "*.csv"))):
    name = os.path.basename(path)[:-4]
    body = open(path, "rb").read()
    put("ingest_csv", name, body, keys)
    table = pcsv.read_csv(path)
    sink = pa.BufferOutputStream()
    with ipc.new_file(sink, table.schema) as w:
        w.write_table(table, max_chunksize=16)
    put("ingest_arrow", name + "-file", sink.getvalue().to_pybytes(), [k + b"\0" for k in keys])
    sink = pa.BufferOutputStream()
    with ipc.new_stream(sink, table.schema) as w:
        w.write_table(table, max_chunksize=16)
    put("ingest_arrow", name + "-stream", sink.getvalue().to_pybytes(), [k + b"\1" for k in keys])
    for codec in ["snappy", "zstd", "none"]:
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression=codec, row_group_size=16)
        put("ingest_parquet", f"{name}-{codec}", sink.getvalue().to_pybytes(), keys)
for kind, sel in [("file", b"\1\0"), ("stream", b"\1\1")]:
    for path in sorted(glob.glob(os.path.join(vectors, kind, "*"))):
        put("ingest_arrow", "arrow-" + os.path.basename(path), open(path, "rb").read(), [sel])
PY
# SQL: every literal statement in the gate and black-box tests
grep -rhoE '"(SELECT|WITH|select|with|EXPLAIN|INSERT|CREATE|COPY)[^"]{4,600}"' query/tests/*.rs tests/*.rs |
  sed -e 's/^"//' -e 's/"$//' -e 's/\\$//' | sort -u |
  awk -v d="$OUT/sql_gate" '{ f = sprintf("%s/test-%04d", d, NR); printf "%s", $0 > f; close(f) }'
for t in ingest_csv ingest_arrow ingest_parquet sql_gate; do
  echo "$t: $(ls "$OUT/$t" | wc -l) seeds"
done
