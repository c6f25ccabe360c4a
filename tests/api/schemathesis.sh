#!/usr/bin/env bash
# The API against its own OpenAPI document (docs/openapi.json, served at /v1/openapi.json),
# checked by a property-based tester (schemathesis) on a live `escrow serve` over mutual TLS:
# no 5xx, and every status code, content type, header and body as the document says.
# Bounded: EXAMPLES generated cases per operation (default 30), a few seconds in all.
# Usage: tests/api/schemathesis.sh   (ESCROW_BIN: default $CARGO_TARGET_DIR/debug/escrow)
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN="${ESCROW_BIN:-${CARGO_TARGET_DIR:-$HOME/.cache/escrow-ci-target}/debug/escrow}"
EXAMPLES="${EXAMPLES:-30}"
command -v st >/dev/null || python3 -m pip install --quiet --disable-pip-version-check schemathesis
WORK="$(mktemp -d)"
trap 'kill "$PID" 2>/dev/null || true; rm -rf "$WORK"' EXIT
export ESCROW_DATA_DIR="$WORK/data"
"$BIN" init >/dev/null
"$BIN" partner add acme >/dev/null
"$BIN" partner add globex >/dev/null
"$BIN" serve --listen 127.0.0.1:0 >"$WORK/serve.out" 2>"$WORK/serve.log" &
PID=$!
for _ in $(seq 100); do [ -s "$WORK/serve.out" ] && break; sleep 0.1; done
URL="$(head -1 "$WORK/serve.out" | sed 's/^escrow listening on //')"
ID="$ESCROW_DATA_DIR/identities/acme/admin"
# The authentication checks (ignored_auth) do not apply: every request carries the client
# certificate, which the TLS layer checks before HTTP; the request-validation checks
# (positive/negative data) are not what this run is for.
st run "$URL/v1/openapi.json" \
    --request-cert "$ID/cert.pem" --request-cert-key "$ID/key.pem" --tls-verify "$ID/ca.pem" \
    -n "$EXAMPLES" --request-timeout 30 --seed 7 \
    --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,response_headers_conformance
