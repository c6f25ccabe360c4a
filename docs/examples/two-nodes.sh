#!/usr/bin/env bash
# A local two-node escrow: one PostgreSQL catalog (a new database on ESCROW_POSTGRES, default
# postgres://postgres@127.0.0.1:5432/postgres; psql needed), one S3-compatible object store
# (moto's server from PyPI, with a bucket), two nodes on 127.0.0.1:8443 and :8444, each with a
# data directory of its own holding the same keys and certificates (./escrow-two-nodes/a, and
# b copied from it; the audit log is rows of the catalog). Partners acme and globex are added. Ctrl-C stops the nodes and the S3 server; the database is kept (drop it
# with the printed command).
#
#   docs/examples/two-nodes.sh        (ESCROW_BIN=path/to/escrow skips the release build)
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ -z "${ESCROW_BIN:-}" ]; then cargo build --release --bin escrow --quiet; fi
BIN="${ESCROW_BIN:-${CARGO_TARGET_DIR:-target}/release/escrow}"
source bench/s3.sh

PG="${ESCROW_POSTGRES:-postgres://postgres@127.0.0.1:5432/postgres}"
DB="escrow_two_nodes_$(date +%s)"
psql -q "$PG" -c "CREATE DATABASE $DB"
export ESCROW_CATALOG="${PG%/*}/$DB"
start_s3 nodes
export ESCROW_DATA_DIR="$PWD/escrow-two-nodes/a"
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null || true; stop_s3' EXIT

"$BIN" init
"$BIN" partner add acme > /dev/null
"$BIN" partner add globex > /dev/null
# The second node's directory: a copy (keys, CA, server certificate, catalog binding).
rm -rf escrow-two-nodes/b
cp -a "$ESCROW_DATA_DIR" escrow-two-nodes/b
for node in a:8443 b:8444; do
  dir="$PWD/escrow-two-nodes/${node%%:*}"
  ESCROW_DATA_DIR="$dir" "$BIN" serve --listen "127.0.0.1:${node#*:}" 2> "$dir/node.log" &
  PIDS+=($!)
done
cat <<INFO

two nodes: https://127.0.0.1:8443 and https://127.0.0.1:8444 (logs: escrow-two-nodes/{a,b}/node.log)
catalog:   $ESCROW_CATALOG   (drop later: psql $PG -c "DROP DATABASE $DB WITH (FORCE)")
objects:   $ESCROW_OBJECTS at $AWS_ENDPOINT_URL

operator commands in another shell need the same settings:
  export ESCROW_DATA_DIR=$ESCROW_DATA_DIR ESCROW_CATALOG=$ESCROW_CATALOG ESCROW_OBJECTS=$ESCROW_OBJECTS
  export AWS_ENDPOINT_URL=$AWS_ENDPOINT_URL AWS_ALLOW_HTTP=true AWS_REGION=$AWS_REGION AWS_ACCESS_KEY_ID=$AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY=$AWS_SECRET_ACCESS_KEY
a partner's CLI talks to either node:
  ESCROW_IDENTITY=$ESCROW_DATA_DIR/identities/acme/admin $BIN upload docs/examples/accounts.csv --dataset accounts --key-column website --server https://127.0.0.1:8443
  ESCROW_IDENTITY=$ESCROW_DATA_DIR/identities/acme/admin $BIN datasets --server https://127.0.0.1:8444
Ctrl-C stops both nodes and the S3 server.
INFO
wait
