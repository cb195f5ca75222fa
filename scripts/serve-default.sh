#!/usr/bin/env bash
# Builds tpserve, fetches the default model (SmolLM2-135M-Instruct, cached), starts the
# OpenAI-compatible server on http://127.0.0.1:${PORT:-8000}, asks it one question to show it
# answers, and keeps serving in the foreground until Ctrl-C. Extra arguments go to `tpserve serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
port="${PORT:-8000}"
model="$(scripts/fetch-default-model.sh)"
cargo build --release --bins
./target/release/tpserve serve --model "$model" --served-model-name SmolLM2-135M-Instruct --port "$port" "$@" &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null' EXIT INT TERM
for _ in $(seq 1 120); do
  if curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1; then break; fi
  if ! kill -0 $server 2>/dev/null; then echo "the server exited" >&2; exit 1; fi
  sleep 1
done
echo "--- asking: What is the capital of France?" >&2
curl -s "http://127.0.0.1:$port/v1/chat/completions" -H 'content-type: application/json' \
  -d '{"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "What is the capital of France?"}], "temperature": 0}'
echo
echo "--- serving on http://127.0.0.1:$port (Ctrl-C stops)" >&2
wait $server
