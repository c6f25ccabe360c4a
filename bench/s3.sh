# Sourced: start_s3 starts a real S3-compatible server (moto's, from PyPI) on a free port with
# one bucket, and exports ESCROW_OBJECTS and the AWS_* settings escrow reads. stop_s3 stops it.
# Set ESCROW_S3_ENDPOINT to use a running S3 server instead (the bucket must be creatable
# with an unsigned PUT, or exist).
start_s3() {
  local bucket="escrow-${1:-bench}-$$"
  if [ -z "${ESCROW_S3_ENDPOINT:-}" ]; then
    python3 -c "import moto.server" 2>/dev/null || python3 -m pip install --quiet "moto[server]"
    local port
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    python3 -m moto.server -H 127.0.0.1 -p "$port" > /dev/null 2>&1 &
    S3_PID=$!
    ESCROW_S3_ENDPOINT="http://127.0.0.1:$port"
    for _ in $(seq 200); do curl -s -o /dev/null "$ESCROW_S3_ENDPOINT/" && break; sleep 0.1; done
  fi
  curl -sf -X PUT "$ESCROW_S3_ENDPOINT/$bucket" > /dev/null
  export ESCROW_OBJECTS="s3://$bucket/escrow" AWS_ENDPOINT_URL="$ESCROW_S3_ENDPOINT" \
    AWS_ALLOW_HTTP=true AWS_REGION="${AWS_REGION:-us-east-1}" \
    AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-escrow}" AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-escrow}"
}

stop_s3() {
  if [ -n "${S3_PID:-}" ]; then kill "$S3_PID" 2>/dev/null || true; fi
}
