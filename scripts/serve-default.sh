#!/usr/bin/env bash
# Builds tpserve, fetches the default model (SmolLM2-135M-Instruct, cached), starts the
# OpenAI-compatible server on http://127.0.0.1:${PORT:-8000} under the model name `smollm2` (the
# name the README's examples use), asks it one question to show it answers, and keeps serving
# until Ctrl-C, which stops it gracefully; the script then exits with the server's status (0).
# PORT=8001 serves on another port when 8000 is taken. Extra arguments go to `tpserve serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
port="${PORT:-8000}"
model="$(scripts/fetch-default-model.sh)"
cargo build --release --bins
./target/release/tpserve serve --model "$model" --served-model-name smollm2 --port "$port" "$@" &
server=$!
# Ctrl-C reaches the server too (same process group); SIGTERM covers `kill` of the script alone.
stop() {
  trap - INT TERM EXIT
  kill -TERM "$server" 2>/dev/null || true
  status=0
  wait "$server" || status=$?
  exit "$status"
}
trap stop INT TERM
trap 'kill -TERM $server 2>/dev/null || true' EXIT
until curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1; do
  if ! kill -0 "$server" 2>/dev/null; then
    wait "$server" || exit $?
    exit 1
  fi
  sleep 1
done
echo "--- asking: What is the capital of France?" >&2
curl -s "http://127.0.0.1:$port/v1/chat/completions" -H 'content-type: application/json' \
  -d '{"model": "smollm2", "messages": [{"role": "user", "content": "What is the capital of France?"}], "temperature": 0}'
echo
echo "--- serving smollm2 on http://127.0.0.1:$port (Ctrl-C stops)" >&2
trap - EXIT
status=0
wait "$server" || status=$?
exit "$status"
