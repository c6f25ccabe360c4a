# Shared by the privacy bench scripts (sourced): BIN, and start_escrow.
#   BIN: $ESCROW_BIN if set (e.g. target/debug/escrow), else a release build.
#   start_escrow NAME [SERVE FLAGS...]: a fresh data directory with partners acme and globex,
#   `escrow serve` on a free loopback port (output in $OUT/NAME-serve.{out,log}), stopped and
#   removed on exit. Sets WORK (a scratch directory), DATA, A and G (acme's and globex's
#   admin identities) and exports ESCROW_SERVER.
# Needs OUT set and the repo root as the working directory.
if [ -z "${ESCROW_BIN:-}" ]; then
  cargo build --release --bin escrow --quiet
  ESCROW_BIN="${CARGO_TARGET_DIR:-target}/release/escrow"
fi
BIN="$ESCROW_BIN"

start_escrow() {
  local name="$1"
  shift
  WORK="$(mktemp -d)"
  DATA="$WORK/data"
  "$BIN" init --data-dir "$DATA" > /dev/null
  "$BIN" partner add acme --data-dir "$DATA" > /dev/null
  "$BIN" partner add globex --data-dir "$DATA" > /dev/null
  "$BIN" serve --data-dir "$DATA" --listen 127.0.0.1:0 "$@" \
    > "$OUT/$name-serve.out" 2> "$OUT/$name-serve.log" &
  ESCROW_PID=$!
  trap 'kill $ESCROW_PID 2>/dev/null || true; rm -rf "$WORK"' EXIT
  for _ in $(seq 100); do grep -q listening "$OUT/$name-serve.out" 2>/dev/null && break; sleep 0.1; done
  ESCROW_SERVER="$(sed -n 's/^escrow listening on //p' "$OUT/$name-serve.out")"
  export ESCROW_SERVER
  A="$DATA/identities/acme/admin"
  G="$DATA/identities/globex/admin"
}
