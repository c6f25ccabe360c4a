"""An HTTPS connection to escrow as an identity bundle (cert.pem, key.pem, ca.pem), for the
bench scripts' Python parts (they run from the repository root: `sys.path.insert(0, "bench")`)."""
import http.client
import os
import ssl


def connect(server, ident, timeout=600):
    host, port = server.removeprefix("https://").rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=os.path.join(ident, "ca.pem"))
    ctx.load_cert_chain(os.path.join(ident, "cert.pem"), os.path.join(ident, "key.pem"))
    return http.client.HTTPSConnection(host, int(port), context=ctx, timeout=timeout)


def timed_overlap(conn, partner="globex"):
    """Seconds until `conn`'s overlap matrix with `partner` is answered (it must be)."""
    import json
    import time
    t0 = time.perf_counter()
    conn.request("POST", "/v1/overlaps", body=json.dumps({"with": partner}),
                 headers={"content-type": "application/json"})
    r = conn.getresponse()
    body = r.read()
    assert r.status == 200, body
    return time.perf_counter() - t0


def peak_rss_mb(pid):
    """A process's peak resident memory, in MB."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# Restarts timed per run: each is a new process with a new question, and one cold process's
# figure moves by tens of percent with what the machine is doing; the median is reported with
# every sample.
RESTARTS = int(os.environ.get("RESTARTS", "5"))


def restart(pid, binary, data):
    """Stop the server `pid` and start another on the same data directory (a cold process:
    no cached plaintext); returns its address and pid. It is stopped when the script ends."""
    import atexit
    import signal
    import subprocess
    import time
    os.kill(pid, signal.SIGTERM)
    while os.path.exists(f"/proc/{pid}") and "zombie" not in open(f"/proc/{pid}/status").read().lower():
        time.sleep(0.05)
    # Its log is appended to bench/out/restarted-serve.log (ESCROW_LOG=debug: stage timings).
    log = open(os.path.join("bench", "out", "restarted-serve.log"), "a")
    proc = subprocess.Popen([binary, "serve", "--data-dir", data, "--listen", "127.0.0.1:0"],
                            stdout=subprocess.PIPE, stderr=log, text=True)
    atexit.register(proc.terminate)
    for line in proc.stdout:
        if line.startswith("escrow listening on "):
            return line.removeprefix("escrow listening on ").strip(), proc.pid
    raise RuntimeError("the restarted server did not start")
