#!/bin/bash
# Ember's fuzzing (README "Fuzzing"): builds every cargo-fuzz target of
# fuzz/ and runs each for FUZZ_SECONDS on its committed seed corpus
# (fuzz/corpus/<target>), FUZZ_JOBS targets at a time. Fails if any target
# crashes, panics, hangs (FUZZ_TIMEOUT seconds for one input) or runs out
# of memory; the input that did it is saved in fuzz/artifacts/<target>/.
# Prints per target: runs executed, executions per second, corpus size
# (inputs, from the seeds plus what the run found) and coverage (edges
# `cov`, features `ft`).
#
#   deploy/fuzz.sh                       # every target, FUZZ_SECONDS each
#   FUZZ_SECONDS=3600 deploy/fuzz.sh virtio_fs net_tx
#
# FUZZ_SECONDS    run time per target (default 20: CI)
# FUZZ_JOBS       targets fuzzed at once (default: number of CPUs, max 4)
# FUZZ_SANITIZER  none (default: fast to build and run) or address
# FUZZ_KEEP       1: keep the inputs a run found in fuzz/corpus-run/<target>
#                 (default: a temporary directory, removed)
#
# cargo-fuzz needs nightly flags; RUSTC_BOOTSTRAP=1 lets the stable
# toolchain accept them. Runs as root: the virtio_fs target confines itself
# in a mount namespace of its own (fuzz/src/jail.rs).
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${FUZZ_SECONDS:-20}"
jobs="${FUZZ_JOBS:-$(nproc)}"
[ "$jobs" -gt 4 ] && jobs=4
sanitizer="${FUZZ_SANITIZER:-none}"
timeout_s="${FUZZ_TIMEOUT:-10}"
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

mapfile -t all < <(sed -n 's/^path = "fuzz_targets\/\(.*\)\.rs"$/\1/p' fuzz/Cargo.toml)
targets=("$@")
[ "${#targets[@]}" -gt 0 ] || targets=("${all[@]}")

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

start=$(date +%s)
echo "fuzz.sh: building ${#all[@]} targets (sanitizer $sanitizer)"
if ! cargo fuzz build --fuzz-dir fuzz -s "$sanitizer" >"$work/build.log" 2>&1; then
    tail -60 "$work/build.log"
    echo "fuzz.sh: build failed"
    exit 1
fi
built=$(date +%s)
echo "fuzz.sh: built in $((built - start)) s"
bindir="fuzz/target/$(rustc -vV | sed -n 's/^host: //p')/release"

run_one() {
    local t="$1" corpus="$work/corpus/$1"
    if [ "${FUZZ_KEEP:-0}" = 1 ]; then
        corpus="fuzz/corpus-run/$t"
    fi
    mkdir -p "$corpus" "fuzz/artifacts/$t" "fuzz/corpus/$t"
    # New inputs go to the first directory; the committed seeds stay as
    # they are.
    "$bindir/$t" -max_total_time="$seconds" -timeout="$timeout_s" \
        -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1 \
        -artifact_prefix="$PWD/fuzz/artifacts/$t/" \
        "$corpus" "fuzz/corpus/$t" >"$work/$t.log" 2>&1
}

failed=()
pids=()
names=()
for t in "${targets[@]}"; do
    run_one "$t" &
    pids+=($!)
    names+=("$t")
    if [ "${#pids[@]}" -ge "$jobs" ]; then
        wait "${pids[0]}" || failed+=("${names[0]}")
        pids=("${pids[@]:1}")
        names=("${names[@]:1}")
    fi
done
for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || failed+=("${names[$i]}")
done
end=$(date +%s)

printf '%-16s %10s %8s %8s %8s %8s\n' target runs exec/s corpus cov ft
for t in "${targets[@]}"; do
    log="$work/$t.log"
    runs=$(sed -n 's/^stat::number_of_executed_units: //p' "$log" | tail -1)
    speed=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    last=$(grep -E '^#[0-9]+.*cov: ' "$log" | tail -1 || true)
    cov=$(sed -n 's/.*cov: \([0-9]*\).*/\1/p' <<<"$last")
    ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
    corp=$(sed -n 's/.* corp: \([0-9]*\)\/.*/\1/p' <<<"$last")
    printf '%-16s %10s %8s %8s %8s %8s\n' "$t" "${runs:-?}" "${speed:-?}" "${corp:-?}" "${cov:-?}" "${ft:-?}"
done
echo "fuzz.sh: ${#targets[@]} targets, ${seconds} s each, $jobs at a time: build $((built - start)) s, runs $((end - built)) s"

if [ "${#failed[@]}" -gt 0 ]; then
    for t in "${failed[@]}"; do
        echo "===== fuzz.sh: $t FAILED; its log:"
        grep -v -E '^#[0-9]+ +(NEW|REDUCE|pulse)' "$work/$t.log" | tail -60
        echo "===== reproducer(s): $(ls "fuzz/artifacts/$t/" 2>/dev/null | tr '\n' ' ')"
        echo "===== replay: RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir fuzz $t fuzz/artifacts/$t/<file>"
    done
    exit 1
fi
