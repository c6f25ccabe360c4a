#!/usr/bin/env bash
# Query benchmark, side by side with DuckDB (the issue's reference):
#   1. two 1M-row lists from ../shared/bench/gen_accounts.py sealed in escrow (acme, globex;
#      globex grants acme join/count/dimension, budget raised so repeats never run out)
#   2. the approved overlap query through the full service path (mTLS, gate, casbin,
#      protection rewrite, noise), as acme: first run (decrypting both lists), the same
#      question repeated (answered from its kept answer) and new questions on warm data
#      (a no-op filter varied per question): medians; then the server is restarted (no
#      plaintext held) and a new question timed: the first after a restart, RESTARTS times
#      (default 5; each a new process and a new question): median and every sample
#   3. DuckDB on the same plaintext (Arrow files loaded in memory), 2 threads, same SQL: median
#   4. 50 concurrent queries (4 rounds) over 100k-row lists: failures, p50, p99
# Usage: bench/query.sh [ROWS]   (default 1000000). Needs: pip install pyarrow duckdb
source "$(dirname "$0")/common.sh"

for n in "$ROWS" 100000; do
  if [ ! -f "$OUT/gen-$n/acme.arrow" ]; then
    echo "== generating $n rows per partner"
    python3 "$SHARED/bench/gen_accounts.py" --out "$OUT/gen-$n" --rows "$n" > /dev/null
  fi
done

DATA="$(mktemp -d)/data"
"$BIN" init --data-dir "$DATA" > /dev/null
"$BIN" partner add acme --data-dir "$DATA" > /dev/null
"$BIN" partner add globex --data-dir "$DATA" > /dev/null
"$BIN" serve --data-dir "$DATA" --listen 127.0.0.1:0 > "$OUT/query-serve.out" 2> "$OUT/query-serve.log" &
PID=$!
trap 'kill $PID 2>/dev/null || true; rm -rf "$(dirname "$DATA")"' EXIT
for _ in $(seq 100); do grep -q listening "$OUT/query-serve.out" 2>/dev/null && break; sleep 0.1; done
export ESCROW_SERVER="$(sed -n 's/^escrow listening on //p' "$OUT/query-serve.out")"
A="$DATA/identities/acme/admin"
G="$DATA/identities/globex/admin"

echo "== uploading"
for n in "$ROWS" 100000; do
  "$BIN" upload "$OUT/gen-$n/acme.arrow" --dataset "accounts_$n" --key-column website --identity "$A" > /dev/null
  "$BIN" upload "$OUT/gen-$n/globex.arrow" --dataset "accounts_$n" --key-column website --identity "$G" > /dev/null
  for u in join count dimension filter; do
    "$BIN" policy grant "accounts_$n" --to acme --usage "$u" --identity "$G" > /dev/null
  done
  "$BIN" policy set "accounts_$n" --budget 1000000 --identity "$G" > /dev/null
done

python3 - "$ESCROW_SERVER" "$A" "$OUT/gen-$ROWS" "$ROWS" "$PID" "$BIN" "$DATA" <<'PY'
import http.client, json, os, ssl, statistics, sys, time, threading
import duckdb, pyarrow.ipc as ipc
sys.path.insert(0, "bench")
from mtls import RESTARTS, peak_rss_mb, restart

server, ident, gen, rows, pid, binary, data = sys.argv[1:8]
host, port = server.removeprefix("https://").rsplit(":", 1)
ctx = ssl.create_default_context(cafile=os.path.join(ident, "ca.pem"))
ctx.load_cert_chain(os.path.join(ident, "cert.pem"), os.path.join(ident, "key.pem"))

def ask(sql, conn=None):
    c = conn or http.client.HTTPSConnection(host, int(port), context=ctx, timeout=300)
    t0 = time.perf_counter()
    c.request("POST", "/v1/queries", body=json.dumps({"sql": sql}), headers={"content-type": "application/json"})
    r = c.getresponse()
    body = r.read()
    dt = time.perf_counter() - t0
    if conn is None:
        c.close()
    return r.status, json.loads(body), dt

def overlap(n):
    return (f"SELECT a.industry, COUNT(DISTINCT a.website) FROM acme.accounts_{n} a "
            f"JOIN globex.accounts_{n} b ON a.website = b.website GROUP BY a.industry")

sql = overlap(rows)
status, body, first = ask(sql)
assert status == 200, body
warm = []
conn = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=300)
for _ in range(7):
    status, body, dt = ask(sql, conn)
    assert status == 200, body
    warm.append(dt)
escrow_med = statistics.median(warm)
# New questions on warm data: the same join with a filter that keeps every row but makes
# each question new (a repeated question is answered from its kept answer, not computed).
fresh = []
for i in range(7):
    q = sql.replace(
        " GROUP BY",
        f" WHERE a.status IN ('customer', 'opportunity', 'prospect', 'none{i}') GROUP BY",
    )
    status, body_i, dt = ask(q, conn)
    assert status == 200, body_i
    fresh.append(dt)
fresh_med = statistics.median(fresh)
peak = peak_rss_mb(int(pid))
# A restarted server holds no plaintext: its first new question decrypts what it reads again.
# RESTARTS cold processes, each asked a question of its own.
conn.close()
restarted, pid = [], int(pid)
for i in range(RESTARTS):
    server, pid = restart(pid, binary, data)
    host, port = server.removeprefix("https://").rsplit(":", 1)
    status, body_r, dt = ask(sql.replace(
        " GROUP BY", f" WHERE a.status IN ('customer', 'opportunity', 'prospect', 'restarted{i}') GROUP BY"))
    assert status == 200, body_r
    restarted.append(dt)
after_restart = statistics.median(restarted)

con = duckdb.connect()
con.execute("SET threads = 2")
con.execute("CREATE SCHEMA acme; CREATE SCHEMA globex")
a = ipc.open_file(os.path.join(gen, "acme.arrow")).read_all()
b = ipc.open_file(os.path.join(gen, "globex.arrow")).read_all()
con.execute(f"CREATE TABLE acme.accounts_{rows} AS SELECT * FROM a")
con.execute(f"CREATE TABLE globex.accounts_{rows} AS SELECT * FROM b")
duck = []
for _ in range(7):
    t0 = time.perf_counter()
    con.execute(sql).fetchall()
    duck.append(time.perf_counter() - t0)
duck_med = statistics.median(duck)
exact = dict(con.execute(sql).fetchall())
released = {r[0]: r[1] for r in body["rows"]}
# DuckDB joins identical website strings; escrow joins companies (docs/MATCHING.md), so its
# counts are many times DuckDB's on messy lists: the ratio says how many more companies
# company keys find, not how large the noise is.
found = min(released[k] / exact[k] for k in released if exact.get(k))

print(f"overlap query, {rows} x {rows} rows, GROUP BY industry ({len(released)} groups released)")
print(f"  escrow first run (decrypt both lists): {first:.3f} s")
print(f"  escrow first question after a restart, median of {RESTARTS} restarts: {after_restart:.3f} s ({', '.join(f'{t:.3f}' for t in restarted)})")
print(f"  escrow repeated question (its kept answer), median of 7: {escrow_med:.3f} s")
print(f"  escrow new question on warm data, median of 7:           {fresh_med:.3f} s")
print(f"  DuckDB (2 threads, in memory) median:  {duck_med:.3f} s")
print(f"  ratio escrow/DuckDB: first after upload {first/duck_med:.2f}x, first after restart {after_restart/duck_med:.2f}x (target <= 1.5x); new question warm {fresh_med/duck_med:.2f}x (target <= 1.0x); repeated {escrow_med/duck_med:.2f}x")
print(f"  escrow's released count per group / DuckDB's count of identical website strings: at least {found:.1f}x")

# 50 concurrent clients, 4 rounds, over the 100k lists; varied questions. A question the
# server is too busy for (429 too_many_requests: at most 4 running per partner) is asked
# again after the second it advises, as a client does; the latency is from the first ask.
filters = ["", "WHERE b.status = 'customer'", "WHERE b.status = 'prospect'", "WHERE a.region = 'EMEA'", "WHERE a.region = 'NA'"]
lat, failed, busy, running = [], [], [0], [0]
lock = threading.Lock()
def client(i):
    f = filters[i % len(filters)]
    q = (f"SELECT a.industry, COUNT(DISTINCT a.website) FROM acme.accounts_100000 a "
         f"JOIN globex.accounts_100000 b ON a.website = b.website {f} GROUP BY a.industry")
    try:
        t0 = time.perf_counter()
        for _ in range(60):
            s, body, _ = ask(q)
            if s != 429:
                break
            with lock:
                busy[0] += 1
            time.sleep(1)
        dt = time.perf_counter() - t0
        with lock:
            if s == 200:
                lat.append(dt)
            elif body.get("error", {}).get("rule") == "not_run_again" and "running now" in body["error"]["message"]:
                # The same question asked while another client's ask of it runs: refused at
                # once by design (a charged question runs, and is timed, once).
                running[0] += 1
            else:
                failed.append(body)
    except Exception as e:
        with lock:
            failed.append(repr(e))
for r in range(4):
    ts = [threading.Thread(target=client, args=(i,)) for i in range(50)]
    for t in ts: t.start()
    for t in ts: t.join()
lat.sort()
p = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]
print(f"50 concurrent queries x 4 rounds on 100k x 100k: {len(lat)} answered, {len(failed)} failed, {running[0]} refused as running now (the same question as another client's, by design); {busy[0]} asks answered 429 too busy and asked again")
if lat:
    print(f"  p50 {p(0.50):.3f} s   p99 {p(0.99):.3f} s   max {lat[-1]:.3f} s")
if failed:
    print("  failures:", failed[:3])
print(f"server peak RSS before the restart: {peak:.0f} MB")
PY
