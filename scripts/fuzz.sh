#!/usr/bin/env bash
# Runs the fuzz targets (bounded proptest runs on the stable toolchain; docs/RELIABILITY.md)
# for a budget of CPU time each, in batches of cases with a fresh random seed per batch, and
# prints one table row per target: CPU seconds, cases, batches, failures. A failing batch keeps
# proptest's shrunk case in the crate's `proptest-regressions/` file (commit it: the test then
# replays it first on every run) and its log under $FUZZ_LOG_DIR.
#
#   scripts/fuzz.sh [TARGET...]        targets: request-json chat-template gguf-headers
#                                      safetensors-headers step-plans (default: all)
# Environment:
#   FUZZ_CPU_SECONDS  CPU time per target (default 3600: issue 14's hour)
#   FUZZ_NICE         nice level of the runs (default 19: they take only idle CPU, so the
#                     budget is CPU time, not wall time)
#   FUZZ_LOG_DIR      where each batch's output goes (default target/fuzz-logs)
#   FUZZ_BATCH        cases per batch for every target given (default: each target's own)
#   TMPDIR            where the header targets write each case's scratch file (the readers map
#                     files); default /dev/shm where it exists: on a disk, half of their CPU time
#                     was the kernel's
set -euo pipefail
cd "$(dirname "$0")/.."

budget=${FUZZ_CPU_SECONDS:-3600}
nice_level=${FUZZ_NICE:-19}
if [ -z "${TMPDIR:-}" ] && [ -d /dev/shm ] && [ -w /dev/shm ]; then
    export TMPDIR=/dev/shm
fi
log_dir=${FUZZ_LOG_DIR:-target/fuzz-logs}
mkdir -p "$log_dir"

# target name -> cargo package, test selector, test-name filter, cases per batch
declare -A package=(
    [request-json]=tpserve-coordinator [chat-template]=tpserve-modelfile
    [gguf-headers]=tpserve-modelfile [safetensors-headers]=tpserve-modelfile
    [step-plans]=tpserve-worker)
declare -A selector=(
    [request-json]=--lib [chat-template]="--test hostile_chat"
    [gguf-headers]="--test hostile_headers" [safetensors-headers]="--test hostile_headers"
    [step-plans]="--test hostile_plans")
declare -A filter=(
    [request-json]=api::fuzz [chat-template]="" [gguf-headers]=damaged_gguf
    [safetensors-headers]=damaged_safetensors [step-plans]="")
declare -A batch=(
    [request-json]=200000 [chat-template]=400000 [gguf-headers]=20000
    [safetensors-headers]=20000 [step-plans]=20000)

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(request-json chat-template gguf-headers safetensors-headers step-plans)

printf '| target | CPU s | cases | batches | failures |\n| --- | ---: | ---: | ---: | ---: |\n'
for t in "${targets[@]}"; do
    [ -n "${package[$t]:-}" ] || { echo "unknown target $t" >&2; exit 2; }
    # shellcheck disable=SC2086
    bin=$(cargo test --release --no-run --message-format=json -p "${package[$t]}" ${selector[$t]} 2>/dev/null |
        python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["executable"])' | tail -1)
    [ -x "$bin" ] || { echo "no test binary for $t" >&2; exit 1; }
    [ -z "${FUZZ_BATCH:-}" ] || batch[$t]=$FUZZ_BATCH
    spent=0 cases=0 batches=0 failures=0
    while python3 -c "import sys; sys.exit(0 if $spent < $budget else 1)"; do
        log="$log_dir/$t-$batches.log"
        # The crate's directory, so that proptest finds and writes its regressions files.
        set +e
        (cd "${package[$t]#tpserve-}" && PROPTEST_CASES=${batch[$t]} /usr/bin/time -f '%U %S' -o "$OLDPWD/$log.time" \
            nice -n "$nice_level" "$bin" ${filter[$t]:+"${filter[$t]}"} --test-threads 1) > "$log" 2>&1
        rc=$?
        set -e
        read -r user sys < <(tail -1 "$log.time")
        spent=$(python3 -c "print(round($spent + $user + $sys, 1))")
        batches=$((batches + 1))
        cases=$((cases + batch[$t]))
        if [ $rc -ne 0 ]; then
            failures=$((failures + 1))
            echo "FAILED: $t batch $batches, see $log" >&2
        fi
    done
    printf '| %s | %s | %d | %d | %d |\n' "$t" "$spent" "$cases" "$batches" "$failures"
done
