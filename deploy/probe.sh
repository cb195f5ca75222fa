#!/usr/bin/env bash
# tpserve-probe: HTTP checks of the pod's coordinator over loopback, for container probes and
# health checks in an image without curl (bash's /dev/tcp, coreutils' timeout).
#
#   tpserve-probe ready PORT     exit 0 when GET /health answers 200 (docker-compose's healthcheck)
#   tpserve-probe workers PORT   the workers container's liveness probe: exit 1 only while GET /live
#                                answers that the engine is stuck waiting on a step from the
#                                workers (code workers_stalled: a hung collective, a wedged rank),
#                                so that restarting the ranks is what helps. Any other answer, or
#                                none (the coordinator starting, restarting, or gone), is not the
#                                workers' fault: exit 0.
# An answer must come within 5 s (the probe's timeoutSeconds must be longer).
set -uo pipefail
mode="${1:-}"
port="${2:-8000}"

# get PATH: prints the whole HTTP answer to GET PATH, or nothing.
get() {
  { exec 3<>"/dev/tcp/127.0.0.1/$port"; } 2>/dev/null || return 0
  printf 'GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' "$1" >&3
  timeout 5 cat <&3
  exec 3<&-
}

case "$mode" in
  ready)
    status=$(get /health | head -n 1)
    [[ "$status" == "HTTP/1."?" 200"* ]]
    ;;
  workers)
    answer=$(get /live)
    if [[ "$answer" == *'"workers_stalled"'* ]]; then
      echo "tpserve-probe: the coordinator is stuck on a step from these workers: ${answer##*\"message\":}" >&2
      exit 1
    fi
    exit 0
    ;;
  *)
    echo "usage: tpserve-probe ready|workers PORT" >&2
    exit 2
    ;;
esac
