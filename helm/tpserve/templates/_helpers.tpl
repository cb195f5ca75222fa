{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "tpserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified name. Kept to 52 characters: StatefulSet pods add "-<ordinal>" and their
controller-revision-hash label adds 11 more characters to the StatefulSet name.
*/}}
{{- define "tpserve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "tpserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels every object carries. */}}
{{- define "tpserve.labels" -}}
helm.sh/chart: {{ include "tpserve.chart" . }}
app.kubernetes.io/name: {{ include "tpserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tpserve
{{- end }}

{{- define "tpserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tpserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The serving pods (coordinator + workers). */}}
{{- define "tpserve.server.selectorLabels" -}}
{{ include "tpserve.selectorLabels" . }}
app.kubernetes.io/component: server
{{- end }}

{{/* The bundled etcd. */}}
{{- define "tpserve.etcd.fullname" -}}
{{- printf "%s-etcd" (include "tpserve.fullname" .) }}
{{- end }}

{{- define "tpserve.etcd.selectorLabels" -}}
{{ include "tpserve.selectorLabels" . }}
app.kubernetes.io/component: etcd
{{- end }}

{{- define "tpserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "tpserve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "tpserve.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "tpserve.downloaderImage" -}}
{{- printf "%s:%s" .Values.downloader.image.repository (default .Chart.AppVersion .Values.downloader.image.tag) }}
{{- end }}

{{/* Whether the ranks register in etcd (a workers container) rather than being the server's children. */}}
{{- define "tpserve.usesEtcd" -}}
{{- if eq .Values.worker.discovery "etcd" }}true{{ end }}
{{- end }}

{{/* Whether the chart runs etcd. */}}
{{- define "tpserve.bundledEtcd" -}}
{{- if and (include "tpserve.usesEtcd" .) .Values.etcd.enabled }}true{{ end }}
{{- end }}

{{/* Whether the bundled etcd runs TLS (client certificates required, peer TLS). */}}
{{- define "tpserve.etcdTls" -}}
{{- if and (include "tpserve.bundledEtcd" .) .Values.etcd.tls.enabled }}true{{ end }}
{{- end }}

{{/* The Secret with the bundled etcd's server and peer certificate. */}}
{{- define "tpserve.etcd.serverTlsSecret" -}}
{{- default (printf "%s-tls" (include "tpserve.etcd.fullname" .)) .Values.etcd.tls.existingSecret }}
{{- end }}

{{/* The Secret with tpserve's etcd client certificate, empty when there is none. */}}
{{- define "tpserve.etcd.clientTlsSecret" -}}
{{- if .Values.etcd.client.tlsSecret }}
{{- .Values.etcd.client.tlsSecret }}
{{- else if include "tpserve.etcdTls" . }}
{{- printf "%s-client-tls" (include "tpserve.etcd.fullname" .) }}
{{- end }}
{{- end }}

{{/*
The data of the bundled etcd's two TLS Secrets the chart makes, as YAML {server: ..., client: ...}:
the Secrets in the cluster when both exist (an upgrade keeps the certificates made at install),
else a new CA with a server/peer certificate and a client certificate signed by it. Made once per
rendering and remembered, so the Secrets and the pods' checksum annotations agree.
*/}}
{{- define "tpserve.etcd.tlsData" -}}
{{- if not (hasKey .Values.etcd.tls "_rendered") }}
{{- $name := include "tpserve.etcd.fullname" . }}
{{- $ns := .Release.Namespace }}
{{- $server := lookup "v1" "Secret" $ns (include "tpserve.etcd.serverTlsSecret" .) }}
{{- $client := lookup "v1" "Secret" $ns (printf "%s-client-tls" $name) }}
{{- $data := dict }}
{{- if and $server $client }}
{{- $data = dict "server" $server.data "client" $client.data }}
{{- else }}
{{- $days := int .Values.etcd.tls.validityDays }}
{{- $ca := genCA (printf "%s-ca" $name) $days }}
{{- $headless := printf "%s-headless" $name }}
{{- $d := .Values.clusterDomain }}
{{- $sans := list $name (printf "%s.%s" $name $ns) (printf "%s.%s.svc" $name $ns) (printf "%s.%s.svc.%s" $name $ns $d) (printf "*.%s.%s.svc" $headless $ns) (printf "*.%s.%s.svc.%s" $headless $ns $d) "localhost" }}
{{- $cert := genSignedCert $name (list "127.0.0.1") $sans $days $ca }}
{{- $clientCert := genSignedCert (include "tpserve.fullname" .) nil nil $days $ca }}
{{- $data = dict "server" (dict "ca.crt" ($ca.Cert | b64enc) "tls.crt" ($cert.Cert | b64enc) "tls.key" ($cert.Key | b64enc)) "client" (dict "ca.crt" ($ca.Cert | b64enc) "tls.crt" ($clientCert.Cert | b64enc) "tls.key" ($clientCert.Key | b64enc)) }}
{{- end }}
{{- $_ := set .Values.etcd.tls "_rendered" (toYaml $data) }}
{{- end }}
{{- get .Values.etcd.tls "_rendered" }}
{{- end }}

{{/* The Secrets' data hashed, for pod annotations that roll the pods when a Secret changes. A
Secret the chart does not make is looked up in the cluster (empty under `helm template`). */}}
{{- define "tpserve.secretChecksum" -}}
{{- $secret := lookup "v1" "Secret" .namespace .name }}
{{- sha256sum (toJson (default dict (get (default dict $secret) "data"))) }}
{{- end }}

{{/* etcd client URLs, comma-separated: the bundled etcd's client Service, or etcd.endpoints. */}}
{{- define "tpserve.etcdEndpoints" -}}
{{- if .Values.etcd.enabled }}
{{- printf "%s://%s.%s.svc:%d" (ternary "https" "http" (eq (include "tpserve.etcdTls" .) "true")) (include "tpserve.etcd.fullname" .) .Release.Namespace (int .Values.etcd.clientPort) }}
{{- else }}
{{- required "etcd.endpoints is required when etcd.enabled is false" (join "," .Values.etcd.endpoints) }}
{{- end }}
{{- end }}

{{/* The key prefix every cluster name of this release's pods starts with (etcd role permissions). */}}
{{- define "tpserve.etcdKeyPrefix" -}}
{{- printf "/tpserve/%s.%s-" .Release.Namespace (include "tpserve.fullname" .) }}
{{- end }}

{{/* Name of the Secret with the API key, empty when there is none. */}}
{{- define "tpserve.apiKeySecret" -}}
{{- if .Values.apiKey.existingSecret }}
{{- .Values.apiKey.existingSecret }}
{{- else if .Values.apiKey.value }}
{{- printf "%s-api-key" (include "tpserve.fullname" .) }}
{{- end }}
{{- end }}

{{- define "tpserve.otelServiceName" -}}
{{- default (include "tpserve.fullname" .) .Values.otel.serviceName }}
{{- end }}

{{/*
Environment shared by the server and workers containers: the pod's identity, the etcd endpoints,
credentials and the cluster name. The cluster name is "<namespace>.<pod name>": unique per replica
(so every pod forms its own group) and unique across releases sharing an external etcd.
*/}}
{{- define "tpserve.commonEnv" -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
{{- if include "tpserve.usesEtcd" . }}
- name: TPSERVE_CLUSTER
  value: "$(POD_NAMESPACE).$(POD_NAME)"
- name: TPSERVE_ETCD_ENDPOINTS
  value: {{ include "tpserve.etcdEndpoints" . | quote }}
{{- if include "tpserve.etcd.clientTlsSecret" . }}
- name: TPSERVE_ETCD_CACERT
  value: /etc/tpserve/etcd-tls/ca.crt
- name: TPSERVE_ETCD_CERT
  value: /etc/tpserve/etcd-tls/tls.crt
- name: TPSERVE_ETCD_KEY
  value: /etc/tpserve/etcd-tls/tls.key
{{- end }}
{{- with .Values.etcd.client.authSecret }}
- name: TPSERVE_ETCD_USER
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.etcd.client.usernameKey }}
- name: TPSERVE_ETCD_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.etcd.client.passwordKey }}
{{- end }}
{{- end }}
{{- if .Values.worker.tls.secret }}
- name: TPSERVE_WORKER_TLS_CERT
  value: /etc/tpserve/worker-tls/tls.crt
- name: TPSERVE_WORKER_TLS_KEY
  value: /etc/tpserve/worker-tls/tls.key
- name: TPSERVE_WORKER_TLS_CA
  value: /etc/tpserve/worker-tls/ca.crt
{{- end }}
- name: RUST_LOG
  value: {{ .Values.logLevel | quote }}
- name: TPSERVE_CACHE_DIR
  value: /var/cache/tpserve
- name: XDG_CACHE_HOME
  value: /var/cache/tpserve
- name: HOME
  value: /tmp
{{- /* The whole group lives in one pod: NCCL's bootstrap and the CPU communicator stay on loopback. */}}
- name: NCCL_SOCKET_IFNAME
  value: lo
- name: NCCL_NVLS_ENABLE
  value: "0"
{{- if .Values.otel.endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ .Values.otel.endpoint | quote }}
- name: OTEL_EXPORTER_OTLP_PROTOCOL
  value: {{ .Values.otel.protocol | quote }}
{{- /* tpserve's own flags (--otlp-traces-endpoint, --otlp-traces-protocol); an HTTP endpoint without a path gets /v1/traces. */}}
- name: TPSERVE_OTLP_TRACES_ENDPOINT
  value: {{ .Values.otel.endpoint | quote }}
- name: OTEL_EXPORTER_OTLP_TRACES_PROTOCOL
  value: {{ .Values.otel.protocol | quote }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: "k8s.namespace.name=$(POD_NAMESPACE),k8s.pod.name=$(POD_NAME),service.instance.id=$(POD_NAME)"
{{- end }}
{{- end }}

{{/*
Environment of a container that uses the GPUs: the CUDA driver's JIT cache on the writable cache
volume (the root file system is read-only).
*/}}
{{- define "tpserve.gpuEnv" -}}
- name: CUDA_CACHE_PATH
  value: /var/cache/tpserve/cuda
{{- end }}

{{/*
Environment of a container that must not see the node's GPUs. The CUDA base image sets
NVIDIA_VISIBLE_DEVICES=all, which gives every container on a node whose default runtime is NVIDIA's
all of the node's GPUs, whatever it asks for; `void` gives it none (and no driver files).
*/}}
{{- define "tpserve.noGpuEnv" -}}
- name: NVIDIA_VISIBLE_DEVICES
  value: void
{{- end }}

{{/* Volume mounts shared by the server and workers containers. */}}
{{- define "tpserve.commonMounts" -}}
- name: model
  mountPath: {{ .Values.model.mountPath }}
  readOnly: {{ include "tpserve.modelReadOnly" . }}
- name: shm
  mountPath: /dev/shm
- name: cache
  mountPath: /var/cache/tpserve
- name: tmp
  mountPath: /tmp
{{- if and (include "tpserve.usesEtcd" .) (include "tpserve.etcd.clientTlsSecret" .) }}
- name: etcd-tls
  mountPath: /etc/tpserve/etcd-tls
  readOnly: true
{{- end }}
{{- if .Values.worker.tls.secret }}
- name: worker-tls
  mountPath: /etc/tpserve/worker-tls
  readOnly: true
{{- end }}
{{- end }}

{{/* The GPU resources of the container that runs the ranks. */}}
{{- define "tpserve.rankResources" -}}
{{- $res := deepCopy .Values.worker.resources }}
{{- if eq .Values.worker.device "cuda" }}
{{- $gpus := dict .Values.worker.gpuResource (int .Values.tensorParallelSize) }}
{{- $_ := set $res "limits" (merge (deepCopy $gpus) (default dict $res.limits)) }}
{{- $_ := set $res "requests" (merge (deepCopy $gpus) (default dict $res.requests)) }}
{{- end }}
{{- toYaml $res }}
{{- end }}

{{/* The startup probe's failureThreshold: the model load budget over its period, rounded up. */}}
{{- define "tpserve.startupThreshold" -}}
{{- $p := .Values.server.probes }}
{{- div (add (int $p.modelLoadTimeoutSeconds) (sub (int $p.startup.periodSeconds) 1)) (int $p.startup.periodSeconds) }}
{{- end }}

{{/* A Deployment's progressDeadlineSeconds. */}}
{{- define "tpserve.progressDeadline" -}}
{{- if .Values.workload.progressDeadlineSeconds }}
{{- .Values.workload.progressDeadlineSeconds }}
{{- else }}
{{- add (int .Values.server.probes.modelLoadTimeoutSeconds) 600 }}
{{- end }}
{{- end }}

{{/* Whether the serving containers mount the model volume read-only. */}}
{{- define "tpserve.modelReadOnly" -}}
{{- if and (eq .Values.model.source "pvc") (not .Values.model.pvc.readOnly) }}false{{- else }}true{{- end }}
{{- end }}

{{/* Whether the model volume is a claim per replica (StatefulSet claim or ephemeral volume). */}}
{{- define "tpserve.perReplicaModel" -}}
{{- if and (eq .Values.model.source "download") (eq .Values.model.download.storage "perReplica") }}true{{ end }}
{{- end }}

{{/* Checks of values that a schema cannot express. */}}
{{- define "tpserve.validate" -}}
{{- if not (has .Values.model.source (list "download" "pvc" "hostPath")) }}
{{- fail (printf "model.source must be download, pvc or hostPath, not %q" .Values.model.source) }}
{{- end }}
{{- if and (eq .Values.model.source "pvc") (not .Values.model.pvc.claimName) }}
{{- fail "model.pvc.claimName is required when model.source is pvc" }}
{{- end }}
{{- if and (eq .Values.model.source "hostPath") (not .Values.model.hostPath.path) }}
{{- fail "model.hostPath.path is required when model.source is hostPath" }}
{{- end }}
{{- if and (eq .Values.model.source "download") (not .Values.model.download.url) }}
{{- fail "model.download.url is required when model.source is download" }}
{{- end }}
{{- if and (eq .Values.model.source "download") (eq .Values.model.download.storage "sharedClaim") (not .Values.model.pvc.claimName) }}
{{- fail "model.pvc.claimName is required when model.download.storage is sharedClaim" }}
{{- end }}
{{- if and (eq .Values.model.source "download") (ne .Values.model.download.storage "sharedClaim") .Values.model.pvc.claimName }}
{{- fail "model.pvc.claimName is set but model.download.storage is not sharedClaim: set model.download.storage=sharedClaim to download into that claim" }}
{{- end }}
{{- if and (hasPrefix "nvidia.com/mig-" .Values.worker.gpuResource) (gt (int .Values.tensorParallelSize) 1) (eq .Values.worker.device "cuda") }}
{{- fail (printf "worker.gpuResource %s is a MIG profile: a CUDA process uses one MIG instance, so tensorParallelSize must be 1" .Values.worker.gpuResource) }}
{{- end }}
{{- if and .Values.autoscaling.enabled .Values.autoscaling.keda.enabled }}
{{- fail "autoscaling.enabled (HPA) and autoscaling.keda.enabled (KEDA) both scale the replicas: choose one" }}
{{- end }}
{{- if and .Values.router.enabled (eq .Values.router.discovery "static") (ne .Values.workload.kind "StatefulSet") }}
{{- fail "router.discovery static needs workload.kind StatefulSet (stable pod names); use router.discovery kubernetes with a Deployment" }}
{{- end }}
{{- if and .Values.router.enabled (eq .Values.router.discovery "static") (or .Values.autoscaling.enabled .Values.autoscaling.keda.enabled) }}
{{- fail "router.discovery static lists replicaCount pods and cannot follow an autoscaler; use router.discovery kubernetes" }}
{{- end }}
{{- if and (include "tpserve.bundledEtcd" .) (gt (int .Values.etcd.replicas) 1) (not .Values.etcd.persistence.enabled) }}
{{- fail "etcd.replicas > 1 needs etcd.persistence.enabled: a member that restarts with an empty data directory cannot rejoin its cluster" }}
{{- end }}
{{- if and (include "tpserve.etcdTls" .) .Values.etcd.tls.existingSecret (not .Values.etcd.client.tlsSecret) }}
{{- fail "etcd.tls.existingSecret needs etcd.client.tlsSecret: a client certificate signed by the same CA" }}
{{- end }}
{{- if and (eq .Values.worker.discovery "etcd") (ge (mul (int .Values.worker.probes.liveness.periodSeconds) (int .Values.worker.probes.liveness.failureThreshold)) (mul (int .Values.server.probes.liveness.periodSeconds) (int .Values.server.probes.liveness.failureThreshold))) }}
{{- fail "the workers' liveness window (worker.probes.liveness period x threshold) must be shorter than the server's (server.probes.liveness): on a stall on the workers, the workers restart first" }}
{{- end }}
{{- if not (has .Values.worker.device (list "cuda" "cpu")) }}
{{- fail (printf "worker.device must be cuda or cpu, not %q" .Values.worker.device) }}
{{- end }}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- fail "autoscaling.minReplicas must not exceed autoscaling.maxReplicas" }}
{{- end }}
{{- if and (include "tpserve.usesEtcd" .) (not .Values.etcd.enabled) (empty .Values.etcd.endpoints) }}
{{- fail "etcd.endpoints is required when etcd.enabled is false" }}
{{- end }}
{{- end }}
