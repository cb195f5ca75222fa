#!/usr/bin/env bash
# Soak under faults (issue 14 item 5): builds the release binaries, fetches the default model
# (SmolLM2-135M-Instruct, cached) and runs scripts/lib/soak.py, which starts a real
# `tpserve serve` at TP=3 on the CPU and drives it with at least SOAK_REQUESTS requests over at
# least SOAK_MINUTES minutes: mixed prompt lengths, chat and completions, streamed and not, 20%
# cancelled at a random point, 5% clients that stop reading for a while, bursts above
# --max-waiting-requests, and a worker SIGKILLed (and respawned by the server) twice. It asserts
# that every request ends (a completion, an error event or an error status; none passes its
# deadline), that KV usage returns to 0, that the resident memory of the coordinator and of every
# worker is flat after warm-up, and that the server answers normally at the end; it prints the
# figures and the memory curve and writes them (JSON and CSV) to SOAK_OUT.
#
#   scripts/soak.sh                                # the full run: 10,000 requests, 30 minutes
#   SOAK_MINUTES=2 SOAK_REQUESTS=300 scripts/soak.sh   # a short run, to develop it
#
# Knobs (environment): SOAK_MINUTES (30), SOAK_REQUESTS (10000), SOAK_MAX_MINUTES (twice
# SOAK_MINUTES: a machine too slow for SOAK_REQUESTS by then fails the count), SOAK_CONCURRENCY (32),
# SOAK_SEED (0), SOAK_OUT (target/soak, under CARGO_TARGET_DIR when set), SOAK_BIN_DIR (run the
# tpserve and tpserve-worker found there instead of building: a copy, so that a rebuild during a
# long soak does not change the workers the server respawns). Exits non-zero when any check fails.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"
bin="${SOAK_BIN_DIR:-}"
if [ -z "$bin" ]; then
  cargo build --release --bins
  bin="$target/release"
fi
model="$(scripts/fetch-default-model.sh)"
export SOAK_OUT="${SOAK_OUT:-$target/soak}"
exec python3 scripts/lib/soak.py --tpserve "$bin/tpserve" --model "$model"
