#!/usr/bin/env bash
# tpserve's GPU performance figures, in one run on the GPU test machine, each as a ratio to the
# machine's floors measured in the same run; prints a table last and writes docs/perf/NAME.json.
#
# What (Llama-3.1-8B shape, bf16, random weights: --load-format dummy; make_bench_model.py writes
# the config and a word-level tokenizer so a prompt of N bench words is N tokens):
#   1. floors and in-process figures: worker/examples/bench_device (device copy bandwidth, cuBLAS
#      bf16 GEMM rate on random data, decode eager and through CUDA graphs, prefill, per-phase
#      GPU time, and the linear-kernel choices measured at warm-up);
#   2. cold start: `tpserve serve` from process start to /health 200, first with empty kernel
#      and driver caches, then again warm;
#   3. as a client over HTTP (`tpserve bench serve`, streaming, random prompts that miss the
#      prefix cache, a fresh seed per run) against one `tpserve serve` at TP=1: single-stream
#      decode (128 in / 256 out), time to first token of 2,048- and 8,192-token prompts, the
#      1,000-prompt 1,024 in / 128 out workload at concurrency 256, and decode-heavy 128 in /
#      512 out at concurrency 1, 16, 64 and 256;
#   4. LoRA (issue 10): 8 random rank-16 adapters on all seven projections
#      (make_lora_adapters.py --bench 8); decode-heavy 128 in / 256 out at concurrency 64 against
#      one `tpserve serve --enable-lora`, once for the base model and once spread over the 8
#      adapters (`bench serve --lora-modules`), same server, same run (lora_over_base), after one
#      request per adapter, timed (lora_first_load_s: disk -> host -> GPU slot, plus a prefill);
#   5. with two or more GPUs, the same at TP=2 (NAME-x2.json, with tp2_decode_speedup; its ratios
#      against one GPU's floors, its in-process figures and phases bench_device's at
#      --tensor-parallel-size 2), and the single stream again with every all-reduce on NCCL
#      (--disable-custom-all-reduce), for comparison;
#   6. bench_report.py: the ratios, the table, the JSON (keys listed in bench_report.py).
#
# Why: the issue's targets are client-side figures against same-run floors; one script keeps
# them comparable from run to run. The GPU machine has no Rust toolchain and no network.
#
# How (binaries built elsewhere, as for tests/gpu/run.sh):
#   cargo build --release --bins --examples -p tpserve-coordinator -p tpserve-worker
#   tests/gpu/bench.sh
# Environment:
#   BIN_DIR   pre-built binaries (default target/release): tpserve, tpserve-worker,
#             examples/bench_device
#   WORK      work directory (default /tmp/tpserve-bench)
#   OUT       when set, the JSON results and logs are copied there
#   NAME      base name of the JSON (default: h200 on an H200, else the GPU name's last word)
#   PYTHON    interpreter with `tokenizers` (default python3)
#   QUICK=1   fewer prompts per run (a smoke test of the script, not figures to report)
#   LORA_ONLY=1  only the LoRA sections (their JSON under OUT/tp1; no report)
#   SKIP_LORA=1  leaves the LoRA sections out (~70 s; the report then has no LoRA keys)
#   QUANTIZATION=fp8  every server and bench_device with `--quantization fp8` (issue 12), NAME
#             suffixed with -fp8, no LoRA sections; the floors' weight bytes are the FP8 model's
#             (its memory floor), the GEMM rate stays bf16's
#   KV_CACHE_DTYPE=fp8  every server and bench_device with `--kv-cache-dtype fp8` (issue 12),
#             NAME suffixed with -kvfp8 (after QUANTIZATION's), no LoRA sections
#   BENCH_COMMIT  the commit the JSON names (default: HEAD's short hash, with `-dirty` when tracked
#             files differ from it, so a tree with uncommitted changes does not pass for its HEAD)
# Exit status: 0 when every step produced its figures.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
HERE=tests/gpu
BIN_DIR="${BIN_DIR:-target/release}"
WORK="${WORK:-/tmp/tpserve-bench}"
PYTHON="${PYTHON:-python3}"
OUT="${OUT:-}"
QUICK="${QUICK:-0}"
case "$BIN_DIR" in
  /*) ;;
  *) BIN_DIR="$ROOT/$BIN_DIR" ;;
esac
export TPSERVE_WORKER_BINARY="$BIN_DIR/tpserve-worker"
MODEL="$WORK/model"
FAILED=0
# Extra `tpserve serve` flags of the next start_server (the LoRA run's).
LORA_ARGS=()

# shellcheck disable=SC1091 # sourced from the repository root
source deploy/gpu-env.sh
export NCCL_NVLS_ENABLE=0
GPU_LIST=$(nvidia-smi -L)
NGPU=$(grep -c '^GPU ' <<<"$GPU_LIST" || true)
GPU_NAME=$(sed -n 's/^GPU 0: \(.*\) (UUID.*/\1/p' <<<"$GPU_LIST")
if [ -z "${NAME:-}" ]; then
  case "$GPU_NAME" in
    *H200*) NAME=h200 ;;
    *H100*) NAME=h100 ;;
    *) NAME=$(awk '{ print tolower($NF) }' <<<"$GPU_NAME") ;;
  esac
  [ -z "${QUANTIZATION:-}" ] || NAME="$NAME-$QUANTIZATION"
  [ -z "${KV_CACHE_DTYPE:-}" ] || NAME="$NAME-kv$KV_CACHE_DTYPE"
fi
# Servers read --quantization and --kv-cache-dtype from the environment.
[ -z "${QUANTIZATION:-}" ] || export TPSERVE_QUANTIZATION="$QUANTIZATION"
[ -z "${KV_CACHE_DTYPE:-}" ] || export TPSERVE_KV_CACHE_DTYPE="$KV_CACHE_DTYPE"
export BENCH_DATE
BENCH_DATE=$(date -u +%FT%TZ)
if [ -z "${BENCH_COMMIT:-}" ]; then
  BENCH_COMMIT=$(git rev-parse --short=7 HEAD 2>/dev/null || echo unknown)
  if [ "$BENCH_COMMIT" != unknown ] && ! git diff --quiet HEAD 2>/dev/null; then
    BENCH_COMMIT="$BENCH_COMMIT-dirty"
  fi
fi
export BENCH_COMMIT

# prompts N: N, or fewer with QUICK=1.
prompts() {
  if [ "$QUICK" = 1 ]; then
    echo $(((${1} + 7) / 8))
  else
    echo "$1"
  fi
}

# start_server TP DIR [ENV=VALUE...]: starts `tpserve serve` on a free port, logs to
# DIR/server.log; sets PORT, SERVER_PID and READY_S (seconds to /health 200), or returns 1.
start_server() {
  local tp=$1 dir=$2 start
  shift 2
  PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  mkdir -p "$dir"
  start=$(date +%s.%N)
  env "$@" "$BIN_DIR/tpserve" serve --model "$MODEL" --load-format dummy --device cuda \
    --tensor-parallel-size "$tp" --port "$PORT" --served-model-name llama8b \
    --max-model-len 10240 --max-num-batched-tokens 8192 --max-num-seqs 256 "${LORA_ARGS[@]}" \
    >"$dir/server.out" 2>"$dir/server.log" &
  SERVER_PID=$!
  while ! curl -sf "http://127.0.0.1:$PORT/health" >/dev/null 2>&1; do
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
      echo "bench: the server exited; its log:" >&2
      tail -20 "$dir/server.log" >&2
      return 1
    fi
    if awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { exit !(b - a > 300) }'; then
      echo "bench: not healthy after 300 s" >&2
      return 1
    fi
    sleep 0.05
  done
  READY_S=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }')
}

stop_server() {
  kill -TERM "$SERVER_PID" 2>/dev/null || true
  wait "$SERVER_PID" 2>/dev/null || true
}

# client DIR NAME ARGS...: one `tpserve bench serve` run against the server; its JSON goes to
# DIR/serve_NAME.json.
client() {
  local dir=$1 name=$2
  shift 2
  echo "== $name: bench serve $*"
  if ! timeout -k 10 900 "$BIN_DIR/tpserve" bench serve --base-url "http://127.0.0.1:$PORT" \
    --model llama8b --result-json "$dir/serve_$name.json" "$@" >"$dir/client_$name.txt" 2>&1; then
    echo "bench: $name failed:" >&2
    tail -20 "$dir/client_$name.txt" >&2
    FAILED=1
    return 0
  fi
  grep -E "Output token throughput|Median (TTFT|ITL)|P99 ITL|Failed" "$dir/client_$name.txt" || true
}

# workloads DIR FULL: the client runs against the running server (FULL=0: single stream only).
workloads() {
  local dir=$1 full=$2 seed=100 c
  client "$dir" decode_c1_128_256 --num-prompts "$(prompts 8)" --random-input-len 128 \
    --random-output-len 256 --max-concurrency 1 --seed $((seed + 1))
  [ "$full" = 1 ] || return 0
  client "$dir" prefill_2048 --num-prompts "$(prompts 6)" --random-input-len 2048 \
    --random-output-len 1 --max-concurrency 1 --seed $((seed + 2))
  client "$dir" prefill_8192 --num-prompts "$(prompts 4)" --random-input-len 8192 \
    --random-output-len 1 --max-concurrency 1 --seed $((seed + 3))
  client "$dir" throughput_1024_128 --num-prompts "$(prompts 1000)" --random-input-len 1024 \
    --random-output-len 128 --max-concurrency 256 --seed $((seed + 4))
  for c in 1 16 64 256; do
    client "$dir" "decode_c${c}_128_512" --num-prompts "$(prompts $((c < 2 ? 4 : 2 * c)))" \
      --random-input-len 128 --random-output-len 512 --max-concurrency "$c" \
      --seed $((seed + 10 + c))
  done
}

# The LoRA sections: throughput over 8 adapters against the base in one server, then 1,000
# registered adapters cycling through 16 slots (lora_cycle.py).
lora_sections() {
  echo "== LoRA: 64 streams, base model, then over 8 rank-16 adapters (all seven projections)"
  "$PYTHON" "$HERE/make_lora_adapters.py" "$MODEL" "$WORK/lora" --bench 8 --rank 16 >/dev/null
  local modules=() i
  for i in 0 1 2 3 4 5 6 7; do modules+=("l$i=$WORK/lora/l$i"); done
  LORA_ARGS=(--enable-lora --max-loras 8 --max-lora-rank 16 --lora-modules "${modules[@]}")
  start_server 1 "$WORK/tp1-lora"
  LORA_ARGS=()
  # Each adapter's first request waits for its preload (disk to host memory, beside the steps)
  # and its copy into a GPU slot (on the step thread): timed here, apart from the throughput
  # runs.
  "$PYTHON" - "$PORT" "$WORK/tp1/lora_first_load.json" <<'PY'
import json, sys, time, urllib.request
port, out = sys.argv[1], sys.argv[2]
seconds = {}
for i in range(8):
    body = json.dumps({"model": f"l{i}", "prompt": "warm up", "max_tokens": 1}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                 {"Content-Type": "application/json"})
    t = time.time()
    urllib.request.urlopen(req, timeout=300).read()
    seconds[f"l{i}"] = time.time() - t
json.dump(seconds, open(out, "w"))
print("LoRA first request per adapter (s): " + ", ".join(f"{v:.2f}" for v in seconds.values()))
PY
  client "$WORK/tp1-lora" base_c64_128_256 --num-prompts "$(prompts 128)" --random-input-len 128 \
    --random-output-len 256 --max-concurrency 64 --seed 300
  client "$WORK/tp1-lora" lora8_c64_128_256 --num-prompts "$(prompts 128)" --random-input-len 128 \
    --random-output-len 256 --max-concurrency 64 --seed 301 \
    --lora-modules l0 l1 l2 l3 l4 l5 l6 l7
  stop_server
  grep -h "LoRA slots\|CUDA graphs captured" "$WORK/tp1-lora/server.log" | sed 's/\x1b\[[0-9;]*m//g' || true
  cp "$WORK/tp1-lora/serve_base_c64_128_256.json" "$WORK/tp1-lora/serve_lora8_c64_128_256.json" \
    "$WORK/tp1/" 2>/dev/null || true
  echo "== LoRA: 1,000 registered adapters (16 distinct rank-8 q/v files) through 16 GPU slots"
  "$PYTHON" "$HERE/make_lora_adapters.py" "$MODEL" "$WORK/lora-cycle" --bench 16 --rank 8 \
    --targets q_proj,v_proj --seed 20 >/dev/null
  modules=()
  for i in $(seq 0 999); do modules+=("c$i=$WORK/lora-cycle/l$((i % 16))"); done
  LORA_ARGS=(--enable-lora --max-loras 16 --max-lora-rank 8 --max-cpu-loras 64
    --lora-modules "${modules[@]}")
  start_server 1 "$WORK/tp1-lora-cycle"
  LORA_ARGS=()
  "$PYTHON" "$HERE/lora_cycle.py" "$PORT" "$WORK/tp1/lora_cycle.json" --count 1000 \
    --requests "$(prompts 2000)" --concurrency 64 || echo "bench: lora_cycle had failures" >&2
  stop_server
}

main() {
  rm -rf "$WORK"
  mkdir -p "$WORK/tp1"
  echo "== $GPU_NAME x $NGPU, commit $BENCH_COMMIT, $BENCH_DATE"
  "$PYTHON" "$HERE/make_bench_model.py" "$MODEL"

  if [ "${LORA_ONLY:-0}" = 1 ]; then
    lora_sections
    return
  fi
  echo "== in-process: bench_device (floors, decode eager and with graphs, prefill, phases)"
  if ! timeout -k 10 600 "$BIN_DIR/examples/bench_device" --config "$MODEL/config.json" \
    --dtype bfloat16 ${QUANTIZATION:+--quantization "$QUANTIZATION"} \
    ${KV_CACHE_DTYPE:+--kv-cache-dtype "$KV_CACHE_DTYPE"} \
    --json "$WORK/tp1/bench_device.json" 2>&1 | tee "$WORK/bench_device.txt"; then
    echo "bench: bench_device failed" >&2
    return 1
  fi

  echo "== cold start (dummy 8B, TP=1): first with empty kernel and driver caches, then warm"
  local caches="$WORK/caches"
  mkdir -p "$caches/tpserve" "$caches/nv"
  start_server 1 "$WORK/cold-first" TPSERVE_CACHE_DIR="$caches/tpserve" \
    CUDA_CACHE_PATH="$caches/nv"
  local first=$READY_S
  stop_server
  start_server 1 "$WORK/cold-warm" TPSERVE_CACHE_DIR="$caches/tpserve" \
    CUDA_CACHE_PATH="$caches/nv"
  local warm=$READY_S
  stop_server
  echo "{\"first\": $first, \"warm\": $warm}" >"$WORK/tp1/cold_start.json"
  echo "cold start: first $first s, warm $warm s"
  grep -h "CUDA kernels ready\|CUDA graphs captured\|engine ready" \
    "$WORK/cold-first/server.log" "$WORK/cold-warm/server.log" | sed 's/\x1b\[[0-9;]*m//g' || true

  echo "== TP=1 over HTTP"
  start_server 1 "$WORK/tp1"
  workloads "$WORK/tp1" 1
  stop_server

  [ -n "${QUANTIZATION:-}${KV_CACHE_DTYPE:-}" ] || [ "${SKIP_LORA:-0}" = 1 ] || lora_sections
  local tp2_args=()
  if [ "$NGPU" -ge 2 ]; then
    echo "== TP=2 in-process: bench_device --tensor-parallel-size 2 (the first rank's figures)"
    mkdir -p "$WORK/tp2"
    # The TP=2 report's ratios stay against one GPU's floors (TP=1's bench_device.json); the
    # in-process figures and phases it shows are TP=2's own.
    cp "$WORK/tp1/bench_device.json" "$WORK/tp2/"
    timeout -k 10 600 "$BIN_DIR/examples/bench_device" --config "$MODEL/config.json" \
      --dtype bfloat16 --tensor-parallel-size 2 ${QUANTIZATION:+--quantization "$QUANTIZATION"} \
      ${KV_CACHE_DTYPE:+--kv-cache-dtype "$KV_CACHE_DTYPE"} \
      --json "$WORK/tp2/bench_device_tp2.json" 2>&1 | tee "$WORK/bench_device_tp2.txt" ||
      echo "bench: bench_device at TP=2 failed" >&2
    echo "== TP=2 over HTTP"
    start_server 2 "$WORK/tp2"
    workloads "$WORK/tp2" 1
    stop_server
    grep -h "all-reduce" "$WORK/tp2/server.log" | sed 's/\x1b\[[0-9;]*m//g' | head -4 || true
    echo "== TP=2 single stream with every all-reduce on NCCL (--disable-custom-all-reduce)"
    start_server 2 "$WORK/tp2-nccl" TPSERVE_DISABLE_CUSTOM_ALL_REDUCE=true
    workloads "$WORK/tp2-nccl" 0
    stop_server
    "$PYTHON" "$HERE/bench_report.py" "$WORK/tp2" "$WORK/$NAME-x2.json"
    "$PYTHON" - "$WORK/$NAME-x2.json" <<'EOF'
import json, os, sys
path = sys.argv[1]
d = json.load(open(path))
d["tensor_parallel_size"] = 2
# The in-process figures and phases of the TP=2 group itself (its first rank), where they ran.
tp2 = os.path.join(os.path.dirname(path), "tp2", "bench_device_tp2.json")
if os.path.exists(tp2):
    dev = json.load(open(tp2))
    d["in_process"] = {k: dev[k] for k in d["in_process"] if k in dev}
    d["in_process"]["rank_decode_floor_ms"] = dev["decode_floor_ms"]
    d["phases"] = dev.get("phases", [])
json.dump(d, open(path, "w"), indent=2)
EOF
    tp2_args=(--tp2-work "$WORK/tp2")
  fi
  "$PYTHON" "$HERE/bench_report.py" "$WORK/tp1" "$WORK/$NAME.json" "${tp2_args[@]}"
  mkdir -p docs/perf
  cp "$WORK/$NAME.json" docs/perf/
  [ -f "$WORK/$NAME-x2.json" ] && cp "$WORK/$NAME-x2.json" docs/perf/
  return "$FAILED"
}

status=0
main 2>&1 | tee "$WORK.log" || status=$?
if [ -n "$OUT" ]; then
  mkdir -p "$OUT"
  cp "$WORK.log" "$OUT/bench.log" 2>/dev/null || true
  for f in "$WORK/$NAME.json" "$WORK/$NAME-x2.json" "$WORK/tp1/bench_device.json" \
    "$WORK/tp2/bench_device_tp2.json"; do
    [ -f "$f" ] && cp "$f" "$OUT/"
  done
  tail -c 200000 "$WORK/tp1/server.log" >"$OUT/server_tp1.log" 2>/dev/null || true
  tail -c 200000 "$WORK/tp2/server.log" >"$OUT/server_tp2.log" 2>/dev/null || true
  mkdir -p "$OUT/tp1"
  cp "$WORK"/tp1/*.json "$OUT/tp1/" 2>/dev/null || true
  for d in tp1-lora tp1-lora-cycle; do
    tail -c 200000 "$WORK/$d/server.log" >"$OUT/server_$d.log" 2>/dev/null || true
  done
fi
exit "$status"
