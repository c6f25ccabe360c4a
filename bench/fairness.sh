#!/usr/bin/env bash
# The shared-memory denial of service of issue 18 as a benchmark (not a test): can one
# partner's questions make another partner's questions wait?
#   acme uploads LIST companies and lets globex and initech join and count on them.
#   initech (the attacker) runs 4 question loops at once (its per-partner limit), each
#   question its own list of LIST companies joined with acme's: the most it could hold is
#   more than half of the 128 MiB shared memory (one partner's share). Before, each such
#   question reserved the whole pool and ran alone; now it is refused before admission.
#   globex (the victim) asks RUNS small questions (its 100 companies joined with acme's),
#   first alone, then while initech's loops run; timed at the client.
# Prints the victim's latency alone and under attack, the ratio of medians, and the
# attacker's outcomes. Before the fix (pool first come, first served; a question larger than
# the pool ran alone) the victim's question went from 0.06 s to 6.3 s and some got 429.
# Usage: bench/fairness.sh [RUNS] [LIST]   (defaults 20, 200000)
# ESCROW_BIN=path uses that binary instead of a release build (e.g. target/debug/escrow).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${1:-20}"
LIST="${2:-200000}"
OUT="bench/out"
mkdir -p "$OUT"
source bench/serve.sh
start_escrow fairness --admitted-memory-mb 128 --query-timeout-secs 120
"$BIN" partner add initech --data-dir "$DATA" > /dev/null
I="$DATA/identities/initech/admin"

python3 - "$WORK" "$LIST" <<'PY'
import sys
work, n = sys.argv[1], int(sys.argv[2])
for name, rows in [("acme", range(n)), ("initech", range(n // 2, n + n // 2)), ("globex", range(100))]:
    with open(f"{work}/{name}.csv", "w") as f:
        f.write("website,industry\n")
        for i in rows:
            f.write(f"co{i}.example,retail\n")
PY
"$BIN" upload "$WORK/acme.csv" --dataset accounts --key-column website --identity "$A" > /dev/null
for who in globex initech; do
  for u in join count; do
    "$BIN" policy grant accounts --to "$who" --usage "$u" --identity "$A" > /dev/null
  done
  "$BIN" policy grant accounts --to "$who" --usage filter --column industry --identity "$A" > /dev/null
done
"$BIN" policy set accounts --budget 1000 --epsilon 0.5 --identity "$A" > /dev/null
"$BIN" upload "$WORK/globex.csv" --dataset mine --key-column website --identity "$G" > /dev/null
"$BIN" upload "$WORK/initech.csv" --dataset mine --key-column website --identity "$I" > /dev/null

victim() {  # victim LABEL: RUNS timed questions of globex's, each new (a literal changes)
  for i in $(seq "$RUNS"); do
    sql="SELECT COUNT(DISTINCT g.website) FROM globex.mine g JOIN acme.accounts a ON g.website = a.website WHERE a.industry IN ('retail', '$1$i')"
    timed "$1" "$sql" "$G" "$OUT/fairness.tsv"
  done
}
attacker() {  # attacker N: initech's questions in a loop until killed
  local i=0
  while :; do
    i=$((i + 1))
    sql="SELECT COUNT(DISTINCT x.website) FROM initech.mine x JOIN acme.accounts a ON x.website = a.website WHERE a.industry IN ('retail', 'x$1-$i')"
    if "$BIN" query "$sql" --identity "$I" > /dev/null 2> "$WORK/attack-$1-$i.err"; then
      echo answered >> "$OUT/fairness-attack.txt"
    else
      echo "refused:$(grep -o 'rule [a-z_]*\|([a-z_]*)' "$WORK/attack-$1-$i.err" | head -1 | tr ' ' '_')" >> "$OUT/fairness-attack.txt"
    fi
  done
}

: > "$OUT/fairness.tsv"
: > "$OUT/fairness-attack.txt"
echo "== globex alone: $RUNS questions"
victim alone
echo "== globex while initech runs 4 question loops, each question as large as the pool"
pids=()
for n in 1 2 3 4; do attacker "$n" & pids+=($!); done
sleep 3
victim attacked
kill "${pids[@]}" 2> /dev/null || true
wait "${pids[@]}" 2> /dev/null || true
grep -o 'MiB[^"]*share[^"]*' "$OUT/fairness-serve.log" | head -1 || true

python3 - "$OUT/fairness.tsv" "$OUT/fairness-attack.txt" <<'PY'
import statistics, sys
from collections import Counter
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
times = {s: sorted(float(t) for x, t, _ in rows if x == s) for s in ("alone", "attacked")}
for s, xs in times.items():
    outcomes = Counter(o for x, _, o in rows if x == s)
    print(f"globex {s:9s} n={len(xs)}  median {statistics.median(xs)*1000:7.1f} ms  "
          f"max {xs[-1]*1000:7.1f} ms  outcomes {dict(outcomes)}")
print(f"median ratio attacked/alone {statistics.median(times['attacked']) / statistics.median(times['alone']):.2f}")
print(f"initech's questions meanwhile: {dict(Counter(l.strip() for l in open(sys.argv[2])))}")
PY
