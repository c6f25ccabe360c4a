# Shared preamble of the bench scripts (sourced): repo root, ROWS, OUT, SHARED, Python deps,
# release build, BIN.
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS="${1:-1000000}"
OUT="bench/out"
SHARED="${ESCROW_SHARED_DIR:-../shared}"
mkdir -p "$OUT"
python3 -c "import pyarrow, duckdb" 2>/dev/null || python3 -m pip install --quiet pyarrow duckdb

cargo build --release --bin escrow --quiet
BIN="${CARGO_TARGET_DIR:-target}/release/escrow"
