#!/usr/bin/env bash
# The membership game of issue 18, run against a real server (not a test): how sure can a
# partner become that one given company is in another partner's list?
#   acme's list: 40 groups of KNOWN companies globex knows are in it, plus the members among
#   40 targets (TARGETS/2 in, TARGETS/2 out, drawn by a seeded shuffle).
#   globex (the attacker) uploads its own list with one segment per target: the KNOWN
#   companies of one group + that target, and asks, until its budget on acme is spent,
#   "entities per segment of my list that are in acme's list" for all segments at once
#   (each company is in one segment, so one question covers every target). Before each
#   question it re-uploads its list, so every question gets fresh noise.
#   Guess per target: the sign of the summed log-likelihood ratio of "count = KNOWN + 1"
#   against "count = KNOWN" under the discrete Gaussian noise of the released standard
#   deviation (answers report it as noise_sd; the optimal test for that noise); a segment
#   withheld counts as no evidence.
# Prints the attacker's accuracy over the targets with a 95% Wilson interval. Target: <= 0.6.
# Settings are the defaults unless EPSILON / BUDGET are set (acme sets them on its list).
# Usage: bench/privacy.sh [TARGETS] [KNOWN] [SEED]   (defaults 40, 100, 1). KNOWN must clear the
# release threshold (the attacker knows it: answers report it), or every segment is withheld.
# ESCROW_BIN=path uses that binary instead of a release build (e.g. target/debug/escrow).
set -euo pipefail
cd "$(dirname "$0")/.."
TARGETS="${1:-40}"
KNOWN="${2:-100}"
SEED="${3:-1}"
OUT="bench/out"
mkdir -p "$OUT"
source bench/serve.sh
start_escrow privacy

python3 - "$WORK" "$TARGETS" "$KNOWN" "$SEED" <<'PY'
import json, random, sys
work, targets, known, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rng = random.Random(seed)
members = set(rng.sample(range(targets), targets // 2))
with open(f"{work}/acme.csv", "w") as f:
    f.write("website,industry\n")
    for s in range(targets):
        for j in range(known):
            f.write(f"known{s}x{j}.example,retail\n")
        if s in members:
            f.write(f"target{s}.example,retail\n")
    for j in range(500):  # companies of acme's that globex knows nothing about
        f.write(f"other{j}.example,energy\n")
with open(f"{work}/mine.csv", "w") as f:
    f.write("website,segment\n")
    for s in range(targets):
        for j in range(known):
            f.write(f"known{s}x{j}.example,s{s}\n")
        f.write(f"target{s}.example,s{s}\n")
json.dump(sorted(members), open(f"{work}/truth.json", "w"))
PY
"$BIN" upload "$WORK/acme.csv" --dataset accounts --key-column website --identity "$A" > /dev/null
for u in join count; do
  "$BIN" policy grant accounts --to globex --usage "$u" --identity "$A" > /dev/null
done
if [ -n "${EPSILON:-}" ]; then "$BIN" policy set accounts --epsilon "$EPSILON" --identity "$A" > /dev/null; fi
if [ -n "${BUDGET:-}" ]; then "$BIN" policy set accounts --budget "$BUDGET" --identity "$A" > /dev/null; fi
"$BIN" policy set accounts --identity "$A" | sed 's/^/acme settings: /'

SEGMENTS="$(python3 -c "print(', '.join(f\"'s{s}'\" for s in range($TARGETS)))")"
SQL="SELECT g.segment, COUNT(DISTINCT a.website) AS n FROM globex.mine g JOIN acme.accounts a ON g.website = a.website WHERE g.segment IN ($SEGMENTS) GROUP BY g.segment"
: > "$OUT/privacy-answers.jsonl"
asked=0
while true; do
  "$BIN" upload "$WORK/mine.csv" --dataset mine --key-column website --identity "$G" > /dev/null
  if ! "$BIN" query "$SQL" --format json --identity "$G" > "$WORK/answer.json" 2> "$WORK/err"; then
    grep -q budget_exhausted "$WORK/err" || { cat "$WORK/err"; exit 1; }
    break
  fi
  python3 -c 'import json, sys; print(json.dumps(json.load(open(sys.argv[1]))))' \
    "$WORK/answer.json" >> "$OUT/privacy-answers.jsonl"
  asked=$((asked + 1))
  [ "$asked" -lt 10000 ] || break
done
echo "== globex asked $asked questions before its budget on acme ran out"

python3 - "$WORK/truth.json" "$OUT/privacy-answers.jsonl" "$TARGETS" "$KNOWN" <<'PY'
import json, math, sys
truth = set(json.load(open(sys.argv[1])))
targets, known = int(sys.argv[3]), int(sys.argv[4])
answers = [json.loads(l) for l in open(sys.argv[2]) if l.strip()]
llr = [0.0] * targets
for a in answers:
    p = a["protection"]
    # discrete Gaussian of variance sd^2: log P(x | in) - log P(x | out)
    var = p["noise_sd"] ** 2
    for row, withheld in zip(a["rows"], a["suppressed"]):
        if withheld or row[1] is None:
            continue
        s = int(row[0][1:])
        x = row[1]
        llr[s] += ((x - known) ** 2 - (x - known - 1) ** 2) / (2 * var)
guesses = [l > 0 for l in llr]
correct = sum(g == (s in truth) for s, g in enumerate(guesses))
n = targets
phat = correct / n
z = 1.96
centre = (phat + z * z / (2 * n)) / (1 + z * z / n)
half = z * math.sqrt(phat * (1 - phat) / n + z * z / (4 * n * n)) / (1 + z * z / n)
eps = answers[0]["protection"]["epsilon"] if answers else float("nan")
print(f"questions {len(answers)} at epsilon {eps} each; targets {n} (half in acme's list)")
print(f"attacker accuracy {phat:.3f}  (95% Wilson interval {centre - half:.3f} .. {centre + half:.3f}); target <= 0.6")
PY
