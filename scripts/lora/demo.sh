#!/usr/bin/env bash
# Training to serving, end to end: a LoRA adapter trained with PEFT on the default model
# (scripts/lora/train_demo.py: every answer becomes one line of JSON, {"answer": "..."}) is
# served by `tpserve serve --enable-lora --lora-modules demo=<dir>` next to its base model, and
# the held-out questions are sent for both at once over HTTP (scripts/lora/check_serving.py):
# the adapter's answers must be JSON, the base's must not, and both must equal PEFT's float32
# greedy answers from training.
#
#   scripts/lora/demo.sh                 # trains first unless the adapter is cached
#   scripts/lora/demo.sh --adapter DIR   # serve an adapter trained before (with peft_greedy.json)
#
# Training needs the packages of scripts/lora/requirements.txt (torch is ~4 GB with its CUDA
# packages): the Python in $TPSERVE_LORA_PYTHON (default python3), e.g. a virtual environment's.
# Serving needs only the release binaries (cargo build --release --bins) and the
# standard library's python3. The server runs `--dtype float32` (the GGUF dequantized at load,
# the weights PEFT trained on); TPSERVE_LORA_DEMO_QUANTIZED=1 serves the GGUF's quantized
# blocks instead and checks only the behaviour, not equality with PEFT.
# Not part of .ci/run: torch is ~4 GB and training takes minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/../.."
adapter=""
while [ $# -gt 0 ]; do
  case "$1" in
    --adapter)
      [ $# -ge 2 ] || { echo "--adapter needs a directory" >&2; exit 2; }
      adapter="$2"; shift 2 ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

model="${TPSERVE_DEFAULT_MODEL:-$(scripts/fetch-default-model.sh)}"
target="${CARGO_TARGET_DIR:-$(cargo metadata --format-version 1 --no-deps |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')}"
bin="${TPSERVE_BIN:-$target/release/tpserve}"
[ -x "$bin" ] || { echo "$bin is missing: run cargo build --release --bins first" >&2; exit 1; }

if [ -z "$adapter" ]; then
  adapter="${TPSERVE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tpserve}/lora/smollm2-json-answer"
  if [ ! -s "$adapter/adapter_model.safetensors" ] || [ ! -s "$adapter/peft_greedy.json" ]; then
    py="${TPSERVE_LORA_PYTHON:-python3}"
    "$py" -c 'import peft, torch, transformers' 2>/dev/null || {
      echo "$py lacks peft/torch/transformers: install scripts/lora/requirements.txt into a" \
        "virtual environment and set TPSERVE_LORA_PYTHON to its python" >&2
      exit 1
    }
    echo "== training the adapter into $adapter"
    "$py" scripts/lora/train_demo.py --gguf "$model" --out "$adapter"
  fi
fi
for f in adapter_config.json adapter_model.safetensors peft_greedy.json; do
  [ -s "$adapter/$f" ] || { echo "$adapter/$f is missing (train_demo.py writes it)" >&2; exit 1; }
done

work="$(mktemp -d)"
pid=""
cleanup() {
  if [ -n "$pid" ]; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

weights=(--dtype float32)
compare=()
if [ "${TPSERVE_LORA_DEMO_QUANTIZED:-0}" = 1 ]; then weights=(); compare=(--no-compare); fi
echo "== serving $model with the adapter as \"demo\""
"$bin" serve --host 127.0.0.1 --port 0 --print-listening-url --model "$model" --device cpu \
  "${weights[@]}" --served-model-name smollm2 --enable-lora --lora-modules "demo=$adapter" \
  >"$work/server.out" 2>"$work/server.log" &
pid=$!

url=""
for _ in $(seq 1200); do
  url="$(sed -n 's/^TPSERVE_LISTENING //p' "$work/server.out")"
  if [ -n "$url" ] && curl -sf "$url/health" >/dev/null; then break; fi
  url=""
  kill -0 "$pid" 2>/dev/null || break
  sleep 0.1
done
if [ -z "$url" ]; then
  echo "the server did not become healthy; its log:" >&2
  cat "$work/server.log" >&2
  exit 1
fi
echo "== $url is healthy; asking the held-out questions of $adapter/peft_greedy.json"
python3 scripts/lora/check_serving.py --url "$url" --greedy "$adapter/peft_greedy.json" \
  --adapter demo "${compare[@]}"
