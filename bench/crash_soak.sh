#!/usr/bin/env bash
# Crash soak: hundreds of kill -9s of the real server in one data directory, each at a random
# named fault point (store/src/faults.rs: upload steps, random byte offsets of an upload,
# audit appends, deletes) or at a random moment of an in-flight upload; after every restart
# the directory is checked whole (tests/crash.rs `soak`: acknowledged work survives, nothing
# partial is listed, every dataset reads back all its rows, one sealed file per version,
# the audit chain verifies).
#
#   bench/crash_soak.sh [ITERATIONS]        (default 300; ESCROW_CRASH_SEED=N replays a run)
set -euo pipefail
cd "$(dirname "$0")/.."
export ESCROW_SOAK_ITERATIONS="${1:-300}"
mkdir -p bench/out
cargo test -p escrow --test escrow_tests crash::soak -- --ignored --nocapture 2>&1 \
    | tee bench/out/crash_soak.log | grep -E "ESCROW_CRASH_SEED|^soak:|panicked|test result"
