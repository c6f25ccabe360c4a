"""The client side of bench/load.sh (stdlib only): see there."""
import http.client, json, os, ssl, subprocess, sys, threading, time

# SERVERS and PIDS are comma-separated: several nodes on one catalog (partner i talks to
# node i mod n; setup runs through the first).
servers, data, pids, seconds, partners, binary = sys.argv[1:7]
servers, pids = servers.split(","), [int(p) for p in pids.split(",")]
server = servers[0]
seconds, partners = float(seconds), int(partners)
names = [f"p{i:0{len(str(partners))}d}" for i in range(1, partners + 1)]


def ident(p):
    return os.path.join(data, "identities", p, "admin")


def csv(partner, version, n=2000):
    # Half the companies are shared by all partners, half are the partner's own.
    rows = ["account_id,company_name,website,status,region"]
    for i in range(n):
        own = i % 2
        site = f"own{partner}-{i}.example" if own else f"shared{i}.example"
        rows.append(f"{partner}-{version}-{i},Co {i},https://{site},"
                    f"{['customer','opportunity','prospect'][i % 3]},{['NA','EMEA','APAC'][i % 3]}")
    return ("\n".join(rows) + "\n").encode()


def cli(partner, *args):
    subprocess.run([binary, *args], check=True, capture_output=True,
                   env={**os.environ, "ESCROW_IDENTITY": ident(partner), "ESCROW_SERVER": server})


class Client:
    def __init__(self, partner, node=0):
        self.partner = partner
        self.host, self.port = servers[node % len(servers)].removeprefix("https://").rsplit(":", 1)
        self.ctx = ssl.create_default_context(cafile=os.path.join(ident(partner), "ca.pem"))
        self.ctx.load_cert_chain(os.path.join(ident(partner), "cert.pem"),
                                 os.path.join(ident(partner), "key.pem"))
        self.conn = None

    def call(self, method, path, body, ctype):
        """One request; retried after Retry-After on 429. Returns (status, seconds of the
        answered attempt, seconds in all including 429s and their waits, 429s). The last
        answer's body is kept in self.last."""
        busy, start = 0, time.perf_counter()
        while True:
            if self.conn is None:
                self.conn = http.client.HTTPSConnection(self.host, int(self.port), context=self.ctx, timeout=120)
            t0 = time.perf_counter()
            try:
                self.conn.request(method, path, body=body, headers={"content-type": ctype})
                r = self.conn.getresponse()
                self.last = r.read()
            except Exception as e:  # transport failure: a failed request
                self.conn.close()
                self.conn = None
                now = time.perf_counter()
                return ("error: " + type(e).__name__, now - t0, now - start, busy)
            dt = time.perf_counter() - t0
            if r.status == 429:
                busy += 1
                time.sleep(float(r.getheader("retry-after", "1")))
                continue
            return (r.status, dt, time.perf_counter() - start, busy)


def setup():
    for i, p in enumerate(names):
        c = Client(p)
        st, _, _, _ = c.call("PUT", "/v1/datasets/accounts?key_column=website", csv(p, 0), "text/csv")
        assert st == 201, st
    for i, p in enumerate(names):
        # each partner lets the previous one join on, count and break down its accounts, and
        # see the overlap with its customers
        prev = names[i - 1]
        for usage in ["join", "count", "dimension"]:
            cli(p, "policy", "grant", "accounts", "--to", prev, "--usage", usage)
        cli(p, "policy", "set", "accounts", "--budget", "1000000")
        cli(p, "population", "add", "accounts", "customers", "--filter", "status = 'customer'")
        cli(p, "policy", "grant", "accounts", "--to", prev, "--usage", "overlap", "--population", "customers")


results = {}  # kind -> seconds of each answered attempt
overall = {}  # kind -> seconds from first attempt to answer (429 waits included)
released = {}  # kind -> rows released in the latest answer (shows answers are not all suppressed)
failures, busy_total, lock = [], [0], threading.Lock()
stop_at = 0.0


def worker(idx):
    p, nxt = names[idx], names[(idx + 1) % len(names)]
    c = Client(p, idx)
    step, version = 0, 0
    questions = [
        ("own", "/v1/queries", json.dumps({"sql": f"SELECT region, COUNT(DISTINCT website) AS n FROM {p}.accounts GROUP BY region"})),
        ("join", "/v1/queries", json.dumps({"sql": f"SELECT m.region, COUNT(DISTINCT m.website) AS n FROM {p}.accounts m JOIN {nxt}.accounts t ON m.website = t.website GROUP BY m.region"})),
        ("overlap", "/v1/overlaps", json.dumps({"with": nxt})),
    ]
    while time.time() < stop_at:
        step += 1
        if step % 10 == 0:
            version += 1
            kind, (st, dt, total, b) = "upload", c.call("PUT", "/v1/datasets/accounts?key_column=website",
                                                  csv(p, version), "text/csv")
            ok = st == 201
        else:
            kind, path, body = questions[step % 3]
            st, dt, total, b = c.call("POST", path, body, "application/json")
            ok = st == 200
        with lock:
            busy_total[0] += b
            if ok:
                results.setdefault(kind, []).append(dt)
                overall.setdefault(kind, []).append(total)
                if kind != "upload":
                    released[kind] = len(json.loads(c.last).get("rows", []))
            else:
                failures.append((p, kind, st))


def rss_kib():
    """The servers' resident memory, summed over the nodes."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


setup()
print(f"setup done: {len(names)} partners, each with 2,000 accounts, grants, a population")
rss = [rss_kib()]
stop_at = time.time() + seconds
threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(names))]
t0 = time.time()
for t in threads:
    t.start()
while any(t.is_alive() for t in threads):
    rss.append(rss_kib())
    time.sleep(0.5)
elapsed = time.time() - t0


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000


total = sum(len(v) for v in results.values())
print(f"{len(names)} partners on {len(servers)} node(s) for {elapsed:.0f} s: {total} requests ok ({total / elapsed:.1f}/s), "
      f"{len(failures)} failed, {busy_total[0]} answered 429 and retried after Retry-After")
for kind in ["upload", "own", "join", "overlap"]:
    xs = results.get(kind, [])
    if xs:
        rows = f"  (latest answer: {released[kind]} rows)" if kind in released else ""
        ys = overall[kind]
        print(f"  {kind:8s} n={len(xs):6d}  p50 {pct(xs, .5):7.1f} ms  p99 {pct(xs, .99):7.1f} ms"
              f"  | with 429 waits: p50 {pct(ys, .5):7.1f} ms  p99 {pct(ys, .99):7.1f} ms{rows}")
print(f"server RSS (all nodes): start {rss[0] / 1024:.0f} MiB, peak {max(rss) / 1024:.0f} MiB, end {rss[-1] / 1024:.0f} MiB")
if failures:
    print("failures (first 10):", failures[:10])
    sys.exit(1)
