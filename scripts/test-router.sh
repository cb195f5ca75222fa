#!/usr/bin/env bash
# Tests the chart README's router recipe on loopback: vLLM's router (PyPI vllm-router, the image's
# `router` target) with static backends and its cache_aware policy in front of two real
# `tpserve serve` replicas (the default model, TP=1, on the CPU). Requests through the router get
# answers; requests that share a prompt prefix all go to one replica (counted from each replica's
# vllm:request_success_total), where round_robin, the control, splits them; the router's model
# list is the replicas'.
# Prints one line per check and "N passed, M failed"; exits 1 if any failed.
#
# Environment: TPSERVE_BIN_DIR (default target/release), VLLM_ROUTER (default vllm-router on PATH).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
BIN_DIR="${TPSERVE_BIN_DIR:-${CARGO_TARGET_DIR:-target}/release}"
ROUTER="${VLLM_ROUTER:-vllm-router}"
work="$(mktemp -d)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null; done
  rm -rf "$work"
}
trap cleanup EXIT
passed=0
failed=0
ok() { echo "ok   $*"; passed=$((passed + 1)); }
bad() { echo "FAIL $*"; failed=$((failed + 1)); }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
# wait_http URL LIMIT: until URL answers 200, for up to LIMIT seconds.
wait_http() {
  local deadline=$((SECONDS + $2))
  until curl -fsS -o /dev/null "$1" 2>/dev/null; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 0.5
  done
}
# successes PORT: the replica's finished requests.
successes() {
  curl -fsS "http://127.0.0.1:$1/metrics" | awk '/^vllm:request_success_total/ { n += $NF } END { print n + 0 }'
}

model="$(scripts/fetch-default-model.sh)" || { echo "FAIL fetching the default model"; exit 1; }
ports=("$(free_port)" "$(free_port)")
for i in 0 1; do
  "$BIN_DIR/tpserve" serve --model "$model" --served-model-name smollm2 --host 127.0.0.1 \
    --port "${ports[$i]}" --max-model-len 2048 --kv-cache-space 0.5 >"$work/server-$i.log" 2>&1 &
  pids+=("$!")
done
for i in 0 1; do
  if ! wait_http "http://127.0.0.1:${ports[$i]}/health" 180; then
    echo "FAIL replica $i did not become ready"; tail -20 "$work/server-$i.log"; exit 1
  fi
done
rport="$(free_port)"
"$ROUTER" --host 127.0.0.1 --port "$rport" --policy cache_aware \
  --worker-urls "http://127.0.0.1:${ports[0]}" "http://127.0.0.1:${ports[1]}" \
  --prometheus-host 127.0.0.1 --prometheus-port "$(free_port)" >"$work/router.log" 2>&1 &
pids+=("$!")
if wait_http "http://127.0.0.1:$rport/v1/models" 60; then
  ok "the router serves /v1/models: $(curl -fsS "http://127.0.0.1:$rport/v1/models" | head -c 120)"
else
  bad "the router did not start"; tail -20 "$work/router.log"; exit 1
fi

# send PREFIX N: N completions through the router whose prompts share PREFIX; counts answers.
answered=0
send() {
  local i body
  for i in $(seq "$2"); do
    body=$(printf '{"model": "smollm2", "prompt": "%s Question %d: what comes next?", "max_tokens": 4, "temperature": 0}' "$1" "$i")
    if curl -fsS "http://127.0.0.1:$rport/v1/completions" -H 'content-type: application/json' -d "$body" \
      | grep -q '"choices"'; then
      answered=$((answered + 1))
    fi
  done
}
alpha="The lighthouse keeper wrote in his log every night about the ships, the weather, the birds that rested on the rail and the long light that swept the sea."
beta="Quarterly revenue grew in every region, led by strong subscription renewals, while operating costs stayed flat and the board approved a new buyback program."
before=("$(successes "${ports[0]}")" "$(successes "${ports[1]}")")
send "$alpha" 4
mid=("$(successes "${ports[0]}")" "$(successes "${ports[1]}")")
send "$beta" 4
after=("$(successes "${ports[0]}")" "$(successes "${ports[1]}")")
a=("$((mid[0] - before[0]))" "$((mid[1] - before[1]))")
b=("$((after[0] - mid[0]))" "$((after[1] - mid[1]))")
if [ "$answered" -eq 8 ]; then ok "8 completions answered through the router"; else bad "$answered of 8 answered"; fi
if [ "${a[0]}" -eq 4 ] || [ "${a[1]}" -eq 4 ]; then
  ok "the 4 requests with one prefix all went to one replica (${a[0]} and ${a[1]})"
else
  bad "one prefix's requests were split: ${a[0]} and ${a[1]}"
fi
if [ "${b[0]}" -eq 4 ] || [ "${b[1]}" -eq 4 ]; then
  ok "the 4 requests with another prefix all went to one replica (${b[0]} and ${b[1]})"
else
  bad "another prefix's requests were split: ${b[0]} and ${b[1]}"
fi
# The control: round_robin splits the same requests, so the checks above can fail.
kill "${pids[2]}" 2>/dev/null; wait "${pids[2]}" 2>/dev/null
"$ROUTER" --host 127.0.0.1 --port "$rport" --policy round_robin \
  --worker-urls "http://127.0.0.1:${ports[0]}" "http://127.0.0.1:${ports[1]}" \
  --prometheus-host 127.0.0.1 --prometheus-port "$(free_port)" >"$work/router-rr.log" 2>&1 &
pids[2]=$!
if wait_http "http://127.0.0.1:$rport/v1/models" 60; then
  before=("$(successes "${ports[0]}")" "$(successes "${ports[1]}")")
  send "$alpha" 4
  a=("$(( $(successes "${ports[0]}") - before[0] ))" "$(( $(successes "${ports[1]}") - before[1] ))")
  if [ "${a[0]}" -gt 0 ] && [ "${a[1]}" -gt 0 ]; then
    ok "control: round_robin splits the same prefix's requests (${a[0]} and ${a[1]})"
  else
    bad "control: round_robin did not split (${a[0]} and ${a[1]})"
  fi
else
  bad "the round_robin router did not start"; tail -20 "$work/router-rr.log"
fi
echo "router: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
