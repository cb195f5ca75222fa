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

{{/* etcd client URLs, comma-separated: the bundled etcd's client Service, or etcd.endpoints. */}}
{{- define "tpserve.etcdEndpoints" -}}
{{- if .Values.etcd.enabled }}
{{- printf "http://%s.%s.svc:%d" (include "tpserve.etcd.fullname" .) .Release.Namespace (int .Values.etcd.clientPort) }}
{{- else }}
{{- required "etcd.endpoints is required when etcd.enabled is false" (join "," .Values.etcd.endpoints) }}
{{- end }}
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
Environment shared by the server and workers containers: the pod's identity, the etcd endpoints
and the cluster name. The cluster name is "<namespace>.<pod name>": unique per replica (so every
pod forms its own group) and unique across releases sharing an external etcd.
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
- name: TPSERVE_CLUSTER
  value: "$(POD_NAMESPACE).$(POD_NAME)"
- name: TPSERVE_ETCD_ENDPOINTS
  value: {{ include "tpserve.etcdEndpoints" . | quote }}
- name: RUST_LOG
  value: {{ .Values.logLevel | quote }}
- name: TPSERVE_CACHE_DIR
  value: /var/cache/tpserve
- name: XDG_CACHE_HOME
  value: /var/cache/tpserve
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
- name: OTEL_RESOURCE_ATTRIBUTES
  value: "k8s.namespace.name=$(POD_NAMESPACE),k8s.pod.name=$(POD_NAME),service.instance.id=$(POD_NAME)"
{{- end }}
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
{{- end }}

{{/* Whether the serving containers mount the model volume read-only. */}}
{{- define "tpserve.modelReadOnly" -}}
{{- if and (eq .Values.model.source "pvc") (not .Values.model.pvc.readOnly) }}false{{- else }}true{{- end }}
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
{{- if not (has .Values.worker.device (list "cuda" "cpu")) }}
{{- fail (printf "worker.device must be cuda or cpu, not %q" .Values.worker.device) }}
{{- end }}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- fail "autoscaling.minReplicas must not exceed autoscaling.maxReplicas" }}
{{- end }}
{{- if and (not .Values.etcd.enabled) (empty .Values.etcd.endpoints) }}
{{- fail "etcd.endpoints is required when etcd.enabled is false" }}
{{- end }}
{{- end }}
