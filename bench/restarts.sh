#!/usr/bin/env bash
# A restarted server's first question, two builds side by side: the SQL join of bench/query.sh
# and the overlap matrix of bench/overlap.sh, each asked of a new process (no plaintext held)
# as its first question, the two binaries alternating on one data directory, ROUNDS rounds of
# 3 restarts per binary and question. Per restart: seconds, the process's CPU time and minor
# page faults around the question (from /proc): a cold process's wall time moves by tens of
# percent with what the machine is doing, its CPU time and faults much less.
# Usage: bench/restarts.sh BIN_A BIN_B [ROUNDS]   (default 3). Lists: 1M rows, as the others.
set -euo pipefail
A_BIN="$1"; B_BIN="$2"; ROUNDS="${3:-3}"
ESCROW_BIN="$A_BIN"
source "$(dirname "$0")/common.sh" 1000000
generate_lists

DATA="$(mktemp -d)/data"
trap 'kill $PID 2>/dev/null || true; rm -rf "$(dirname "$DATA")"' EXIT
"$BIN" init --data-dir "$DATA" > /dev/null
"$BIN" partner add acme --data-dir "$DATA" > /dev/null
"$BIN" partner add globex --data-dir "$DATA" > /dev/null
"$BIN" serve --data-dir "$DATA" --listen 127.0.0.1:0 > "$OUT/restarts-serve.out" 2> "$OUT/restarts-serve.log" &
PID=$!
for _ in $(seq 100); do grep -q listening "$OUT/restarts-serve.out" 2>/dev/null && break; sleep 0.1; done
export ESCROW_SERVER="$(sed -n 's/^escrow listening on //p' "$OUT/restarts-serve.out")"
for p in acme globex; do
  I="$DATA/identities/$p/admin"
  o=$([ "$p" = acme ] && echo globex || echo acme)
  "$BIN" upload "$GEN/$p.arrow" --dataset accounts --key-column website --name-column company_name --identity "$I" > /dev/null
  share_for_overlap "$I" "$o"
  for u in join count dimension filter; do
    "$BIN" policy grant accounts --to "$o" --usage "$u" --identity "$I" > /dev/null
  done
done

python3 - "$A_BIN" "$B_BIN" "$ROUNDS" "$DATA" "$PID" <<'PY'
import json, os, statistics, sys, time
sys.path.insert(0, "bench")
from mtls import connect, restart

a_bin, b_bin, rounds, data, pid = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
ident = os.path.join(data, "identities/acme/admin")
tick = os.sysconf("SC_CLK_TCK")

def stat(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / tick, int(f[7])  # utime + stime, minflt

def post(conn, path, body):
    conn.request("POST", path, body=json.dumps(body), headers={"content-type": "application/json"})
    r = conn.getresponse()
    out = r.read()
    assert r.status in (200, 201), out
    return out

def first_question(binary, kind, tag):
    """The server stopped and `binary` started on the data directory (`mtls.restart`), then
    asked its first question."""
    global pid
    server, pid = restart(pid, binary, data)
    conn = connect(server, ident)
    if kind == "sql":
        path, body = "/v1/queries", {"sql": (
            "SELECT a.industry, COUNT(DISTINCT a.website) FROM acme.accounts a JOIN globex.accounts b "
            f"ON a.website = b.website WHERE a.status IN ('customer', 'opportunity', 'prospect', '{tag}') "
            "GROUP BY a.industry")}
    else:
        # a matrix never asked before, as bench/overlap.sh asks after a restart
        post(conn, "/v1/populations", {"dataset": "accounts", "name": tag,
                                       "filter": f"status = 'prospect' OR status = '{tag}'"})
        path, body = "/v1/overlaps", {"with": "globex"}
    cpu0, flt0 = stat(pid)
    t0 = time.perf_counter()
    post(conn, path, body)
    dt = time.perf_counter() - t0
    cpu1, flt1 = stat(pid)
    if kind != "sql":
        post(conn, "/v1/populations/removals", {"dataset": "accounts", "name": tag})
    return dt, cpu1 - cpu0, flt1 - flt0

samples = {}
n = 0
for r in range(rounds):
    for name, binary in (("A", a_bin), ("B", b_bin)):
        for kind in ("sql", "overlap"):
            for _ in range(3):
                n += 1
                samples.setdefault((name, kind), []).append(first_question(binary, kind, f"restart{n}"))
print(f"first question after a restart, {rounds} rounds x 3 restarts per build and question, alternating")
print(f"  A = {a_bin}\n  B = {b_bin}")
for kind in ("sql", "overlap"):
    for name in ("A", "B"):
        s = samples[(name, kind)]
        wall = [x[0] for x in s]
        print(f"  {kind:8} {name}: wall median {statistics.median(wall):.3f} s (mean {statistics.mean(wall):.3f}), "
              f"CPU mean {statistics.mean(x[1] for x in s):.3f} s, page faults mean {statistics.mean(x[2] for x in s):,.0f}")
PY
