#!/usr/bin/env bash
# Runs the cargo-fuzz targets of fuzz/ one after another (one process each,
# never in parallel), each bounded by a libFuzzer limit, starting from the
# committed seeds and crash inputs (fuzz/seeds/<target>, fuzz/regressions/
# <target>) and keeping what it finds in fuzz/corpus/<target> (not
# committed). Installs cargo-fuzz when `cargo fuzz` is missing.
#
# Usage: scripts/fuzz.sh [LIMIT] [TARGET...]
#   LIMIT: a libFuzzer option, default -max_total_time=60 (seconds per
#   target); -runs=1000000 for the 1M-execution runs of fuzz/README.md.
# Exit status: non-zero on the first crash (its input is in
# fuzz/artifacts/<target>/; fuzz/README.md says what to do with it).
set -euo pipefail
cd "$(dirname "$0")/.."
limit="${1:--max_total_time=60}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(frame frame_stream request_body request_roundtrip layout config)
fi
if ! cargo +nightly --version >/dev/null 2>&1; then
    rustup toolchain install nightly --profile minimal
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi
t0=$(date +%s)
cargo +nightly fuzz build
echo "fuzz: targets built in $(($(date +%s) - t0)) s"
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t"
    dirs=("fuzz/corpus/$t")
    for d in "fuzz/seeds/$t" "fuzz/regressions/$t"; do
        if [ -d "$d" ]; then dirs+=("$d"); fi
    done
    log="fuzz/corpus/$t.log"
    start=$(date +%s)
    if ! cargo +nightly fuzz run "$t" "${dirs[@]}" -- "$limit" -print_final_stats=1 >"$log" 2>&1; then
        tail -n 60 "$log"
        echo "fuzz: target $t FAILED (input in fuzz/artifacts/$t/, log $log)"
        exit 1
    fi
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || true)
    echo "fuzz: $t: ${runs:-?} executions, 0 crashes, $(($(date +%s) - start)) s ($limit)"
done
