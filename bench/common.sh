# Shared preamble of the bench scripts (sourced): repo root, ROWS, OUT, SHARED, Python deps,
# release build (unless ESCROW_BIN is set), BIN.
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS="${1:-1000000}"
OUT="bench/out"
SHARED="${ESCROW_SHARED_DIR:-../shared}"
mkdir -p "$OUT"
python3 -c "import pyarrow, duckdb" 2>/dev/null || python3 -m pip install --quiet pyarrow duckdb

# ESCROW_BIN=path skips the build (a release binary built with other targets has other
# features unified, and `cargo build --bin escrow` would rebuild everything to match).
if [ -z "${ESCROW_BIN:-}" ]; then cargo build --release --bin escrow --quiet; fi
BIN="${ESCROW_BIN:-${CARGO_TARGET_DIR:-target}/release/escrow}"

# The generator's two lists of ROWS rows each in $OUT/gen-$ROWS (made once); sets GEN.
generate_lists() {
  GEN="$OUT/gen-$ROWS"
  if [ ! -f "$GEN/acme.arrow" ]; then
    echo "== generating $ROWS rows per partner"
    python3 "$SHARED/bench/gen_accounts.py" --out "$GEN" --rows "$ROWS" > /dev/null
  fi
}

# Partner IDENTITY's dataset `accounts` ready for the overlap matrix with OTHER: populations by
# status (customer, opportunity, prospect), an overlap grant, a budget that never runs out.
share_for_overlap() {
  for s in customer opportunity prospect; do
    "$BIN" population add accounts "$s" --filter "status = '$s'" --identity "$1" > /dev/null
  done
  "$BIN" policy grant accounts --to "$2" --usage overlap --identity "$1" > /dev/null
  "$BIN" policy set accounts --budget 1000000 --identity "$1" > /dev/null
}
