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
