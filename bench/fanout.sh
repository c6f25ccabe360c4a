#!/usr/bin/env bash
# The fan-out attack of issue 18 as a benchmark (not a test): can the time of a question tell
# whether one target company is in another partner's list?
#   acme uploads 2,000 companies; co7 is in its list, co8 is not.
#   globex uploads two pairs of its own tables, each with the 2,000 companies once plus
#   COPIES extra rows of one target: (m1, m2) for the member co7, (n1, n2) for the
#   non-member co8, and asks SUM over its own column across own x acme x own joins.
#   RUNS questions per target, interleaved, each a new question (a literal changes, so no
#   kept answer serves it), timed at the client (what the attacker sees).
# Prints both latency distributions, every outcome, and two-sample tests (Mann-Whitney U,
# Welch's t). No significant difference and no refusal on one side only is the target.
# Usage: bench/fanout.sh [RUNS] [COPIES]   (defaults 30, 20000)
# ESCROW_BIN=path uses that binary instead of a release build (e.g. target/debug/escrow).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${1:-30}"
COPIES="${2:-20000}"
OUT="bench/out"
mkdir -p "$OUT"
python3 -c "import scipy" 2>/dev/null || python3 -m pip install --quiet scipy
source bench/serve.sh
start_escrow fanout --query-timeout-secs 10

python3 - "$WORK" "$COPIES" <<'PY'
import sys
work, copies = sys.argv[1], int(sys.argv[2])
with open(f"{work}/acme.csv", "w") as f:
    f.write("website,industry\n")
    for i in range(2000):
        if i != 8:
            f.write(f"co{i}.example,retail\n")
for name, target in [("m", 7), ("n", 8)]:
    with open(f"{work}/{name}.csv", "w") as f:
        f.write("website,v\n")
        for i in range(2000):
            f.write(f"co{i}.example,1\n")
        for _ in range(copies):
            f.write(f"co{target}.example,1\n")
PY
"$BIN" upload "$WORK/acme.csv" --dataset accounts --key-column website --identity "$A" > /dev/null
for u in join count; do
  "$BIN" policy grant accounts --to globex --usage "$u" --identity "$A" > /dev/null
done
"$BIN" policy set accounts --budget 1000 --identity "$A" > /dev/null
for t in m1 m2 n1 n2; do
  "$BIN" upload "$WORK/${t:0:1}.csv" --dataset "$t" --key-column website --identity "$G" > /dev/null
  "$BIN" policy set "$t" --bounds v=0:1000000 --identity "$G" > /dev/null
done

echo "== $RUNS questions per target, $COPIES extra rows of the target in each own table"
: > "$OUT/fanout.tsv"
for i in $(seq "$RUNS"); do
  for side in m n; do
    sql="SELECT SUM(y.v) FROM globex.${side}1 x JOIN acme.accounts a ON x.website = a.website JOIN globex.${side}2 y ON y.website = a.website WHERE x.v IN (1, $((i + 1)))"
    timed "$side" "$sql" "$G" "$OUT/fanout.tsv"
  done
done

python3 - "$OUT/fanout.tsv" <<'PY'
import statistics, sys
from collections import Counter
from scipy import stats
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
side = {"m": "member (co7 in acme's list)", "n": "non-member (co8 not in it)"}
times = {s: [float(t) for x, t, _ in rows if x == s] for s in side}
for s, label in side.items():
    xs = sorted(times[s])
    q = statistics.quantiles(xs, n=4)
    outcomes = Counter(o for x, _, o in rows if x == s)
    print(f"{label:30s} n={len(xs)}  min {xs[0]*1000:7.1f} ms  p25 {q[0]*1000:7.1f}  median "
          f"{statistics.median(xs)*1000:7.1f}  p75 {q[2]*1000:7.1f}  max {xs[-1]*1000:7.1f}  "
          f"outcomes {dict(outcomes)}")
u = stats.mannwhitneyu(times["m"], times["n"], alternative="two-sided")
t = stats.ttest_ind(times["m"], times["n"], equal_var=False)
ratio = statistics.median(times["m"]) / statistics.median(times["n"])
print(f"median ratio member/non-member {ratio:.3f}")
print(f"Mann-Whitney U p = {u.pvalue:.3g}; Welch t p = {t.pvalue:.3g} "
      f"({'no significant difference' if min(u.pvalue, t.pvalue) >= 0.05 else 'SIGNIFICANT difference'} at 0.05)")
PY
