#!/usr/bin/env bash
# Run the cargo-fuzz targets in fuzz/ one after the other, each for SECONDS
# (default 600), at the lowest CPU priority, and print executions and
# coverage per target as a Markdown table.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]      (default: every target)
#
# Needs a nightly toolchain and cargo-fuzz (`cargo +nightly install
# cargo-fuzz`). The seed corpora in fuzz/corpus/TARGET are only read; what
# the fuzzer learns goes to fuzz/target/fuzz-corpus/TARGET (kept between
# runs), logs to fuzz/target/fuzz-logs, crashes to fuzz/artifacts/TARGET.
# Reproduce a crash with `cargo +nightly fuzz run TARGET CRASH_FILE` in fuzz/.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

secs=600
if [[ $# -gt 0 && $1 =~ ^[0-9]+$ ]]; then
    secs=$1
    shift
fi
if [[ $# -gt 0 ]]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo +nightly fuzz list)
fi

run() { nice -n 19 "$@"; }

echo "==> building the fuzz targets" >&2
run cargo +nightly fuzz build >&2

mkdir -p target/fuzz-logs
rows=()
status=0
for t in "${targets[@]}"; do
    corpus=target/fuzz-corpus/$t
    log=target/fuzz-logs/$t.log
    mkdir -p "$corpus" "corpus/$t"
    echo "==> $t for ${secs}s (log: fuzz/$log)" >&2
    result=ok
    # The learned corpus first: libFuzzer writes new inputs to the first
    # directory only, so the committed seeds stay as they are.
    if ! run cargo +nightly fuzz run "$t" "$corpus" "corpus/$t" -- \
        -max_total_time="$secs" -timeout=10 -print_final_stats=1 >"$log" 2>&1; then
        crash=$(grep -o 'artifacts/[^ ]*' "$log" | tail -n 1 || true)
        result="FAILED${crash:+: fuzz/$crash}"
        status=1
    fi
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | tail -n 1 | awk '{print $2}' || true)
    persec=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | tail -n 1 | awk '{print $2}' || true)
    cov=$(grep -o ' cov: [0-9]*' "$log" | tail -n 1 | awk '{print $2}' || true)
    ft=$(grep -o ' ft: [0-9]*' "$log" | tail -n 1 | awk '{print $2}' || true)
    # libFuzzer's corpus at the end (seeds and learned inputs that add
    # coverage), not the files in $corpus, which keep every input that
    # earlier runs wrote there.
    units=$(grep -o ' corp: [0-9]*' "$log" | tail -n 1 | awk '{print $2}' || true)
    rows+=("| $t | $secs | ${execs:--} | ${persec:--} | ${cov:--} | ${ft:--} | ${units:--} | $result |")
done

echo
echo "| target | seconds | executions | exec/s | cov (edges) | features | corpus | result |"
echo "|---|---:|---:|---:|---:|---:|---:|---|"
printf '%s\n' "${rows[@]}"
exit "$status"
