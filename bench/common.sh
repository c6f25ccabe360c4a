# Shared preamble of the bench scripts (sourced): repo root, ROWS, OUT, SHARED, Python deps,
# release build (unless ESCROW_BIN is set), BIN.
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS="${1:-1000000}"
OUT="bench/out"
SHARED="${ESCROW_SHARED_DIR:-../shared}"
mkdir -p "$OUT"
python3 -c "import pyarrow, duckdb" 2>/dev/null || python3 -m pip install --quiet pyarrow duckdb

# The one target dir the project keeps outside the clone (as .ci/run does), so that a bench's
# cargo build or bench is incremental rather than a cold build inside the clone.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/escrow-ci-target}"

# ESCROW_BIN=path skips the build (a release binary built with other targets has other
# features unified, and `cargo build --bin escrow` would rebuild everything to match).
if [ -z "${ESCROW_BIN:-}" ]; then cargo build --release --bin escrow --quiet; fi
BIN="${ESCROW_BIN:-$CARGO_TARGET_DIR/release/escrow}"

# The generator's two lists of ROWS rows each in $OUT/gen-$ROWS (made once); sets GEN.
# Past one million rows, a multiple of a million is made from the 1M lists by
# bench/scale_lists.py (copies whose companies are renamed alike in both partners' lists: the
# generator takes minutes per million rows); GENERATE=1 runs the generator instead.
generate_lists() {
  GEN="$OUT/gen-$ROWS"
  if [ -f "$GEN/acme.arrow" ]; then return; fi
  if [ "$ROWS" -gt 1000000 ] && [ $((ROWS % 1000000)) -eq 0 ] && [ -z "${GENERATE:-}" ]; then
    local target="$GEN"
    ROWS=1000000 generate_lists
    GEN="$target"
    echo "== $ROWS rows per partner: $((ROWS / 1000000)) renamed copies of the 1M lists"
    python3 bench/scale_lists.py "$OUT/gen-1000000" "$GEN" $((ROWS / 1000000))
    return
  fi
  echo "== generating $ROWS rows per partner"
  python3 "$SHARED/bench/gen_accounts.py" --out "$GEN" --rows "$ROWS" > /dev/null
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
