#!/usr/bin/env bash
# The tests through the official OpenAI Python client (tests/openai_client), as CI runs them:
# makes a fresh virtual environment with pinned openai, pytest, jsonschema and httpx, starts two
# real `tpserve serve` processes on the CPU from the release binaries (build them first: CI's
# `cargo build --release --workspace --bins` does) on ports the OS picks, runs pytest against
# them, and stops them at the end, whether the tests passed or not. The generating server serves
# the default model (SmolLM2-135M-Instruct GGUF) under Qwen2.5's real tool-capable chat template
# (scripts/fetch-chat-templates.sh); the embedding server serves the same checkpoint with
# `--task embed`, declared Matryoshka so `dimensions` is allowed. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"
model="${TPSERVE_DEFAULT_MODEL:-$(scripts/fetch-default-model.sh)}"
templates="${TPSERVE_CHAT_TEMPLATES:-$(scripts/fetch-chat-templates.sh)}"
target="${CARGO_TARGET_DIR:-$(cargo metadata --format-version 1 --no-deps |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')}"
bin="${TPSERVE_BIN:-$target/release/tpserve}"
[ -x "$bin" ] || { echo "$bin is missing: run cargo build --release --bins first" >&2; exit 1; }

work="$(mktemp -d)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT

# Starts `tpserve serve ARGS...` in the background, logging to $work/NAME.log; the address it
# prints once it listens lands in $work/NAME.out.
start() {
  local name="$1"
  shift
  "$bin" serve --host 127.0.0.1 --port 0 --print-listening-url --model "$model" "$@" \
    >"$work/$name.out" 2>"$work/$name.log" &
  pids+=("$!")
}

# Waits for server NAME's address and prints it (or shows its log and fails).
listening() {
  local name="$1" pid="$2"
  for _ in $(seq 1200); do
    if url="$(sed -n 's/^TPSERVE_LISTENING //p' "$work/$name.out")" && [ -n "$url" ]; then
      echo "$url"
      return
    fi
    if ! kill -0 "$pid" 2>/dev/null; then break; fi
    sleep 0.1
  done
  echo "the $name server did not start; its log:" >&2
  cat "$work/$name.log" >&2
  return 1
}

start gen --served-model-name smollm2 --max-model-len 2048 \
  --chat-template "$templates/Qwen-Qwen2.5-7B-Instruct.jinja" \
  --enable-auto-tool-choice --tool-call-parser hermes
start embed --served-model-name smollm2-embed --task embed --max-model-len 512 \
  --hf-overrides '{"is_matryoshka": true}'

python3 -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet --disable-pip-version-check \
  openai==3.57.0 pytest==9.2.0 jsonschema==4.26.0 httpx==0.28.1

TPSERVE_OPENAI_GEN_URL="$(listening gen "${pids[0]}")"
TPSERVE_OPENAI_EMBED_URL="$(listening embed "${pids[1]}")"
export TPSERVE_OPENAI_GEN_URL TPSERVE_OPENAI_EMBED_URL
cd "$root/tests/openai_client"
"$work/venv/bin/python" -m pytest -p no:cacheprovider -q "$@"
