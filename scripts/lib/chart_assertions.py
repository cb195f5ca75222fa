"""Asserts the properties helm/tpserve promises in its renderings (run by scripts/check-helm.sh).

Usage: chart_assertions.py METRICS_SOURCE DASHBOARD NAME=RENDERING...

Every rendering: the serving pods turn off service links; the liveness probe is /live and the
readiness and startup probes /health, with a startup budget and the stall timeout set; only the
container that runs the ranks asks for GPUs and sees them, the others get
NVIDIA_VISIBLE_DEVICES=void; CUDA_CACHE_PATH is on a writable volume; the workers container has its
liveness probe, with a shorter window than the server's; root file systems are read-only; an https
etcd comes with the client's TLS files in both containers, and the bundled etcd with client and
peer certificate checks; with worker.tls, every container that runs or dials ranks has the three
--worker-tls-* files from the Secret, mounted read-only. Then what each value set of helm/tpserve/ci/ is there for, and that every
metric the PrometheusRule and the dashboard use is one the coordinator exports.
Prints one line per check; exits 1 if any failed.
"""

import json
import re
import sys

import yaml

failures = 0


def check(ok, what):
    global failures
    print(f"{'ok  ' if ok else 'FAIL'} {what}")
    failures += not ok


def env_of(container):
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def window(probe):
    return probe["periodSeconds"] * probe.get("failureThreshold", 3)


def gpu_requests(container):
    limits = (container.get("resources") or {}).get("limits") or {}
    return {k: v for k, v in limits.items() if k.startswith("nvidia.com/")}


def writable_mount(container, path):
    for m in container.get("volumeMounts", []):
        if (path + "/").startswith(m["mountPath"].rstrip("/") + "/") and not m.get("readOnly"):
            return True
    return False


def serving(docs):
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet") and \
                d["metadata"]["labels"].get("app.kubernetes.io/component") == "server":
            return d
    raise AssertionError("no serving workload")


def common(name, docs):
    w = serving(docs)
    pod = w["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    inits = {c["name"]: c for c in pod.get("initContainers", [])}
    server = containers["server"]
    workers = containers.get("workers")
    rank_container = workers or server
    check(pod.get("enableServiceLinks") is False, f"{name}: enableServiceLinks false on the serving pods")
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet") and d is not w:
            check(d["spec"]["template"]["spec"].get("enableServiceLinks") is False,
                  f"{name}: enableServiceLinks false on {d['kind']}/{d['metadata']['name']}")
    check(server["livenessProbe"]["httpGet"]["path"] == "/live", f"{name}: server liveness is GET /live")
    check(server["readinessProbe"]["httpGet"]["path"] == "/health", f"{name}: server readiness is GET /health")
    startup = server["startupProbe"]
    check(startup["httpGet"]["path"] == "/health" and window(startup) >= 600,
          f"{name}: startup probe GET /health allows {window(startup)} s for the model load")
    check("--engine-stall-timeout" in server["args"], f"{name}: the server gets --engine-stall-timeout")
    cuda = "--device" not in server["args"] or server["args"][server["args"].index("--device") + 1] == "cuda"
    if workers is not None:
        cuda = any("--device cuda:" in a for a in workers["args"])
    for c in list(containers.values()) + list(inits.values()):
        is_rank = c is rank_container
        env = env_of(c)
        sees_gpus = is_rank and cuda
        check(bool(gpu_requests(c)) == sees_gpus,
              f"{name}: {c['name']} {'asks for' if sees_gpus else 'asks for no'} GPUs {gpu_requests(c) or ''}")
        if sees_gpus:
            check("NVIDIA_VISIBLE_DEVICES" not in env, f"{name}: {c['name']} keeps the GPUs the device plugin gives it")
            check(writable_mount(c, env.get("CUDA_CACHE_PATH", "/")),
                  f"{name}: {c['name']} CUDA_CACHE_PATH={env.get('CUDA_CACHE_PATH')} on a writable volume")
        else:
            check(env.get("NVIDIA_VISIBLE_DEVICES") == "void", f"{name}: {c['name']} has NVIDIA_VISIBLE_DEVICES=void")
        check(c["securityContext"].get("readOnlyRootFilesystem") is True, f"{name}: {c['name']} has a read-only root")
    if "fetch-model" in inits:
        check("downloader" in inits["fetch-model"]["image"], f"{name}: the download runs in the downloader image")
    if workers is not None:
        probe = workers["livenessProbe"]
        check(probe["exec"]["command"][:2] == ["tpserve-probe", "workers"],
              f"{name}: workers liveness is tpserve-probe workers")
        check(window(probe) < window(server["livenessProbe"]),
              f"{name}: workers liveness window {window(probe)} s < server's {window(server['livenessProbe'])} s")
        endpoints = env_of(server)["TPSERVE_ETCD_ENDPOINTS"]
        for c in (server, workers):
            env = env_of(c)
            if endpoints.startswith("https://"):
                check(all(k in env for k in ("TPSERVE_ETCD_CACERT", "TPSERVE_ETCD_CERT", "TPSERVE_ETCD_KEY"))
                      and any(m["mountPath"] == "/etc/tpserve/etcd-tls" for m in c["volumeMounts"]),
                      f"{name}: {c['name']} has the etcd client's TLS files")
    else:
        check(not any(k.startswith("TPSERVE_ETCD") for k in env_of(server)), f"{name}: local ranks, no etcd settings")
    worker_tls(name, pod, server, workers)
    locked_down(name, docs, w, pod, server, workers)
    return w, containers, inits


WORKER_TLS = {"TPSERVE_WORKER_TLS_CERT": "tls.crt", "TPSERVE_WORKER_TLS_KEY": "tls.key",
              "TPSERVE_WORKER_TLS_CA": "ca.crt"}


def worker_tls_secret(pod):
    """The Secret of the worker-tls volume, or None."""
    for v in pod.get("volumes", []):
        if v["name"] == "worker-tls":
            return v["secret"]["secretName"]
    return None


def worker_tls(name, pod, server, workers):
    """With worker.tls, the server and the workers container (when there is one) both get the
    --worker-tls-* files (as their environment variables) from the Secret, mounted read-only;
    without it, neither does."""
    secret = worker_tls_secret(pod)
    for c in [server] + ([workers] if workers is not None else []):
        env = env_of(c)
        if secret is None:
            check(not any(k in env for k in WORKER_TLS), f"{name}: {c['name']} has no worker TLS files")
            continue
        mount = [m for m in c.get("volumeMounts", []) if m["name"] == "worker-tls"]
        base = mount[0]["mountPath"] if mount else None
        check(bool(mount) and mount[0].get("readOnly") is True
              and all(env.get(k) == f"{base}/{f}" for k, f in WORKER_TLS.items()),
              f"{name}: {c['name']} has --worker-tls-cert/key/ca from Secret {secret}, read-only")


def locked_down(name, docs, w, pod, server, workers):
    """Issue 14's locked-down pod: non-root without privilege escalation, keys only from Secrets,
    ranks on loopback, and (where the policy is on) only the HTTP port reachable."""
    check(pod.get("securityContext", {}).get("runAsNonRoot") is True, f"{name}: the serving pod runs as non-root")
    for c in pod["containers"] + pod.get("initContainers", []):
        check(c.get("securityContext", {}).get("allowPrivilegeEscalation") is False,
              f"{name}: {c['name']} may not escalate privileges")
        for e in c.get("env", []):
            if e["name"] in ("TPSERVE_API_KEY", "TPSERVE_WORKER_TOKEN", "TPSERVE_ETCD_PASSWORD"):
                check("secretKeyRef" in e.get("valueFrom", {}) and "value" not in e,
                      f"{name}: {c['name']}'s {e['name']} comes from a Secret")
    if workers is not None:
        script = " ".join((workers.get("command") or []) + (workers.get("args") or []))
        listens = re.findall(r"--listen (\S+)", script)
        check(listens and all(l.startswith("127.0.0.1:") for l in listens),
              f"{name}: every rank listens on the pod's loopback {listens}")
    labels = w["spec"]["template"]["metadata"]["labels"]
    for policy in by_kind(docs, "NetworkPolicy"):
        selector = policy["spec"]["podSelector"].get("matchLabels", {})
        if not selector or any(labels.get(k) != v for k, v in selector.items()):
            continue
        ports = [p.get("port") for rule in policy["spec"].get("ingress", []) for p in rule.get("ports", [])]
        check("Ingress" in policy["spec"]["policyTypes"] and ports == ["http"],
              f"{name}: the serving pods' NetworkPolicy admits only the HTTP port {ports}")


def etcd_statefulset(docs):
    for d in docs:
        if d["kind"] == "StatefulSet" and d["metadata"]["labels"].get("app.kubernetes.io/component") == "etcd":
            return d
    return None


def etcd_args(docs):
    return etcd_statefulset(docs)["spec"]["template"]["spec"]["containers"][0]["args"]


def kinds(docs):
    return {(d["kind"], d["metadata"]["name"]) for d in docs}


def by_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def main():
    metrics_source, dashboard, *renderings = sys.argv[1:]
    exported = set(re.findall(r"vllm:[a-z_]+", open(metrics_source).read()))
    all_docs = {}
    for arg in renderings:
        name, path = arg.split("=", 1)
        all_docs[name] = [d for d in yaml.safe_load_all(open(path)) if d]
    for name, docs in all_docs.items():
        w, containers, inits = common(name, docs)
        etcd = etcd_statefulset(docs)
        if etcd is not None:
            args = etcd_args(docs)
            if any(a.startswith("--listen-client-urls=https") for a in args):
                for flag in ("--client-cert-auth=true", "--peer-client-cert-auth=true",
                             "--trusted-ca-file=/etc/etcd/tls/ca.crt", "--peer-trusted-ca-file=/etc/etcd/tls/ca.crt"):
                    check(flag in args, f"{name}: bundled etcd {flag}")
                plain = [a for a in args if "http://" in a and not a.startswith("--listen-metrics-urls=")]
                check(not plain, f"{name}: bundled etcd client and peer URLs are all https (metrics stay http) {plain or ''}")
            ready = etcd["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]
            check(ready["port"] == "metrics", f"{name}: etcd readiness on its metrics port (no client certificate needed)")
            check(etcd["spec"]["template"]["spec"].get("affinity", {}).get("podAntiAffinity") is not None,
                  f"{name}: etcd members spread over nodes")

    d = all_docs
    # default: a Deployment that surges.
    w = serving(d["default"])
    strategy = w["spec"]["strategy"]
    check(w["kind"] == "Deployment" and strategy["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0},
          "default: a Deployment with maxSurge 1, maxUnavailable 0")
    check(any(p["metadata"]["name"] == w["metadata"]["name"] for p in by_kind(d["default"], "NetworkPolicy")),
          "default: a NetworkPolicy guards the serving pods")
    startup = w["spec"]["template"]["spec"]["containers"][0]["startupProbe"]
    check(w["spec"]["progressDeadlineSeconds"] > window(startup),
          f"default: progressDeadlineSeconds {w['spec']['progressDeadlineSeconds']} > the startup budget {window(startup)}")
    check("--initial-cluster-state=new" in etcd_args(d["default"]), "default: a new etcd cluster at install")
    check("checksum/etcd-client-tls" in w["spec"]["template"]["metadata"]["annotations"],
          "default: the etcd client certificate's checksum on the pods")
    # Mutual TLS to the ranks where the value sets ask for it, not by default.
    for name, want in (("default", None), ("tp4-2replicas", "tpserve-worker-tls"),
                       ("local-keda", "tpserve-worker-tls")):
        got = worker_tls_secret(serving(d[name])["spec"]["template"]["spec"])
        check(got == want, f"{name}: worker TLS Secret {got}")
    # tp4-2replicas: the API key's checksum rolls the pods.
    check("checksum/api-key" in serving(d["tp4-2replicas"])["spec"]["template"]["metadata"]["annotations"],
          "tp4-2replicas: checksum/api-key annotation")
    # statefulset-router
    sr = d["statefulset-router"]
    w = serving(sr)
    check(w["kind"] == "StatefulSet" and any(t["metadata"]["name"] == "model" for t in w["spec"]["volumeClaimTemplates"]),
          "statefulset-router: a StatefulSet with a model claim per replica")
    router = [x for x in by_kind(sr, "Deployment") if x["metadata"]["name"].endswith("-router")][0]
    rargs = router["spec"]["template"]["spec"]["containers"][0]["args"]
    urls = [a for a in rargs if a.startswith("http://")]
    check("cache_aware" in rargs and len(urls) == 2 and all("-headless." in u for u in urls),
          f"statefulset-router: the router's static backends {urls}")
    svc = [x for x in by_kind(sr, "Service") if x["metadata"]["name"] == w["metadata"]["name"]][0]
    check(svc["spec"]["sessionAffinity"] == "ClientIP", "statefulset-router: service.sessionAffinity ClientIP")
    ingress = by_kind(sr, "Ingress")[0]
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["name"]
    check(backend.endswith("-router"), f"statefulset-router: the Ingress goes to the router ({backend})")
    policy = [x for x in by_kind(sr, "NetworkPolicy") if x["metadata"]["name"] == w["metadata"]["name"]][0]
    peers = policy["spec"]["ingress"][0]["from"]
    check(any(p.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/component") == "router" for p in peers),
          "statefulset-router: the NetworkPolicy admits the router")
    check("--initial-cluster-state=existing" in etcd_args(sr), "statefulset-router: etcd.initialClusterState is passed")
    # local-keda
    lk = d["local-keda"]
    w, containers, _ = serving(lk), None, None
    pod = w["spec"]["template"]["spec"]
    check([c["name"] for c in pod["containers"]] == ["server"] and etcd_statefulset(lk) is None,
          "local-keda: one server container, no workers container, no etcd")
    check(gpu_requests(pod["containers"][0]) == {"nvidia.com/mig-3g.40gb": 1}, "local-keda: the server asks for one MIG slice")
    check(any("ephemeral" in v for v in pod["volumes"] if v["name"] == "model"), "local-keda: a per-pod ephemeral model claim")
    so = by_kind(lk, "ScaledObject")[0]["spec"]
    check(so["minReplicaCount"] >= 1 and so["scaleTargetRef"]["kind"] == "Deployment",
          "local-keda: KEDA scales the Deployment and never to zero by default")
    role = by_kind(lk, "Role")[0]
    check(role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}],
          "local-keda: the router may only read pods")
    check("checksum/api-key" in w["spec"]["template"]["metadata"]["annotations"], "local-keda: checksum/api-key of an existing Secret")
    # external etcd: a user per release, TLS.
    ee = d["external-etcd-autoscaling"]
    w = serving(ee)
    env = env_of(w["spec"]["template"]["spec"]["containers"][1])
    check("secretKeyRef" in (env.get("TPSERVE_ETCD_PASSWORD") or {}), "external-etcd: the etcd password comes from a Secret")
    check({"checksum/etcd-auth", "checksum/etcd-client-tls"} <= set(w["spec"]["template"]["metadata"]["annotations"]),
          "external-etcd: checksums of the etcd Secrets")
    check(by_kind(ee, "HorizontalPodAutoscaler")[0]["spec"]["scaleTargetRef"]["kind"] == "Deployment",
          "external-etcd: the HPA scales the Deployment")
    # cpu-download: a verified download into a shared claim, plain bundled etcd.
    cd = d["cpu-download"]
    init = serving(cd)["spec"]["template"]["spec"]["initContainers"][0]
    check(len(env_of(init).get("TPSERVE_MODEL_SHA256") or "") == 64, "cpu-download: the download is checked against its sha256")
    check(not any(a.startswith("--client-cert-auth") for a in etcd_args(cd)), "cpu-download: etcd.tls.enabled false is plain")

    # Metrics the alerts and the dashboard use.
    used = set()
    for docs in all_docs.values():
        for rule in by_kind(docs, "PrometheusRule"):
            for group in rule["spec"]["groups"]:
                for r in group["rules"]:
                    used |= set(re.findall(r"vllm:[a-z_]+", r["expr"]))
    dash = json.load(open(dashboard))
    for panel in dash["panels"]:
        for target in panel["targets"]:
            used |= set(re.findall(r"vllm:[a-z_]+", target["expr"]))
    strip = re.compile(r"_(bucket|sum|count|total)$")
    missing = sorted(m for m in used if m not in exported and strip.sub("", m) not in exported)
    check(used and not missing, f"{len(used)} metrics used by the PrometheusRule and the dashboard are exported"
          + (f"; not exported: {missing}" if missing else ""))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
