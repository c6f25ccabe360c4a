#!/usr/bin/env bash
# Fuzz each target for RUNS executions (default 1,000,000), all four at once, from the seed
# corpora of fuzz/seed.sh; prints libFuzzer's final statistics per target. Findings land in
# fuzz/artifacts/TARGET/: minimise, fix, and add them to tests/corpus/fuzz/TARGET/ (the test
# suite replays that directory through the real server). Needs cargo-fuzz (installed if
# missing), RUSTC_BOOTSTRAP=1 for the sanitizer flags (set here), and python3 with pyarrow.
#
#   fuzz/run.sh [RUNS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")"
RUNS="${1:-1000000}"
[ $# -gt 0 ] && shift
[ $# -gt 0 ] || set -- ingest_csv ingest_arrow ingest_parquet sql_gate
TARGETS=("$@")
export RUSTC_BOOTSTRAP=1
# The bundled SQLite (C, not instrumented) trips AddressSanitizer's one-definition-rule check
# at startup (global 'aiOff'); it is linked once, so the report is spurious.
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_odr_violation=0}"
command -v cargo-fuzz > /dev/null || cargo install cargo-fuzz --locked
[ -d corpus ] || ./seed.sh corpus
# the same flags for build and run, or `run` rebuilds everything
FLAGS=(-O --codegen-units 16)
cargo fuzz build "${FLAGS[@]}"
mkdir -p out
pids=()
for t in "${TARGETS[@]}"; do
  cargo fuzz run "${FLAGS[@]}" "$t" "corpus/$t" -- -runs="$RUNS" -timeout=20 \
    -rss_limit_mb=2048 -print_final_stats=1 > "out/$t.log" 2>&1 &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
for t in "${TARGETS[@]}"; do
  stats=$(grep -E 'stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb)' "out/$t.log" |
    awk '{printf "%s %s  ", $1, $2}')
  found=$(ls "artifacts/$t" 2> /dev/null | wc -l)
  echo "$t: ${stats:-no statistics (see fuzz/out/$t.log)} findings=$found"
done
exit "$status"
