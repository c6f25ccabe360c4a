# Shared by the privacy bench scripts (sourced): BIN, start_escrow and timed.
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

# timed LABEL SQL IDENTITY TSV: ask one query as IDENTITY, timed at the client (what an
# attacker sees); appends "LABEL<TAB>seconds<TAB>outcome" to TSV (answered, or refused: and
# the rule or error code).
timed() {
  local start end outcome
  start=$EPOCHREALTIME
  if "$BIN" query "$2" --identity "$3" > /dev/null 2> "$WORK/err"; then outcome=answered; else
    outcome="refused:$(grep -o 'rule [a-z_]*\|(query_[a-z_]*)\|([a-z_]*)' "$WORK/err" | head -1 | tr ' ' '_')"; fi
  end=$EPOCHREALTIME
  printf '%s\t%s\t%s\n' "$1" "$(awk "BEGIN { print $end - $start }")" "$outcome" >> "$4"
}
