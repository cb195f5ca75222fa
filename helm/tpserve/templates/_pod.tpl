{{/*
The serving pod, shared by the Deployment and the StatefulSet (workload.yaml): the server container
(`tpserve serve`), the workers container (the ranks; worker.discovery etcd), and the model download
init container (model.source download).

GPU isolation: only the container that runs the ranks asks for GPUs; the others get
NVIDIA_VISIBLE_DEVICES=void, so that a node whose default container runtime is NVIDIA's does not
hand them every GPU of the node (the CUDA base image sets NVIDIA_VISIBLE_DEVICES=all).
*/}}
{{- define "tpserve.podTemplate" -}}
{{- $tp := int .Values.tensorParallelSize }}
{{- $etcdMode := include "tpserve.usesEtcd" . }}
{{- $apiKeySecret := include "tpserve.apiKeySecret" . }}
{{- $clientTls := include "tpserve.etcd.clientTlsSecret" . }}
metadata:
  labels:
    {{- include "tpserve.labels" . | nindent 4 }}
    app.kubernetes.io/component: server
    {{- with .Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    kubectl.kubernetes.io/default-container: server
    {{- /* Rotating a key or a certificate rolls the pods (helm upgrade). */}}
    {{- if .Values.apiKey.existingSecret }}
    checksum/api-key: {{ include "tpserve.secretChecksum" (dict "namespace" .Release.Namespace "name" .Values.apiKey.existingSecret) }}
    {{- else if .Values.apiKey.value }}
    checksum/api-key: {{ .Values.apiKey.value | sha256sum }}
    {{- end }}
    {{- if and $etcdMode .Values.etcd.client.tlsSecret }}
    checksum/etcd-client-tls: {{ include "tpserve.secretChecksum" (dict "namespace" .Release.Namespace "name" $clientTls) }}
    {{- else if and $etcdMode $clientTls }}
    checksum/etcd-client-tls: {{ (include "tpserve.etcd.tlsData" . | fromYaml).client | toJson | sha256sum }}
    {{- end }}
    {{- if and $etcdMode .Values.etcd.client.authSecret }}
    checksum/etcd-auth: {{ include "tpserve.secretChecksum" (dict "namespace" .Release.Namespace "name" .Values.etcd.client.authSecret) }}
    {{- end }}
    {{- with .Values.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "tpserve.serviceAccountName" . }}
  automountServiceAccountToken: false
  # A Service named like one of our variables' prefixes (e.g. `tpserve`) would otherwise inject
  # TPSERVE_PORT=tcp://... into every container, which `tpserve serve` reads as --port.
  enableServiceLinks: false
  {{- with .Values.runtimeClassName }}
  runtimeClassName: {{ . }}
  {{- end }}
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  securityContext:
    {{- toYaml .Values.podSecurityContext | nindent 4 }}
  terminationGracePeriodSeconds: {{ add (int .Values.server.shutdownTimeoutSeconds) (int .Values.server.preStopSleepSeconds) 15 }}
  {{- if eq .Values.model.source "download" }}
  initContainers:
    # Fetches the model into the model volume when it is not there yet, verified, under a lock and
    # a per-pod temporary name (deploy/fetch-model.py).
    - name: fetch-model
      image: {{ include "tpserve.downloaderImage" . }}
      imagePullPolicy: {{ .Values.downloader.image.pullPolicy }}
      command: ["tpserve-fetch-model"]
      env:
        {{- include "tpserve.noGpuEnv" . | nindent 8 }}
        - name: TPSERVE_MODEL
          value: {{ .Values.model.path | quote }}
        - name: TPSERVE_MODEL_URL
          value: {{ .Values.model.download.url | quote }}
        {{- with .Values.model.download.sha256 }}
        - name: TPSERVE_MODEL_SHA256
          value: {{ . | quote }}
        {{- end }}
        - name: TPSERVE_MODEL_INCLUDE
          value: {{ join " " .Values.model.download.include | quote }}
        - name: HOME
          value: /tmp
        - name: PIP_NO_CACHE_DIR
          value: "1"
        {{- with .Values.downloader.env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      securityContext:
        {{- toYaml .Values.securityContext | nindent 8 }}
      resources:
        {{- toYaml .Values.downloader.resources | nindent 8 }}
      volumeMounts:
        - name: model
          mountPath: {{ .Values.model.mountPath }}
        - name: tmp
          mountPath: /tmp
  {{- end }}
  containers:
    # The coordinator: HTTP API, scheduler, KV block table.
    {{- if $etcdMode }}
    # It waits in etcd for the tensorParallelSize ranks of its cluster (this pod's name), forms
    # the group and serves.
    {{- else }}
    # It starts the tensorParallelSize ranks itself, as child processes on loopback.
    {{- end }}
    - name: server
      image: {{ include "tpserve.image" . }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      command: ["tpserve", "serve"]
      args:
        - --model
        - {{ .Values.model.path | quote }}
        {{- with .Values.model.servedModelName }}
        - --served-model-name
        - {{ . | quote }}
        {{- end }}
        - --load-format
        - {{ .Values.model.loadFormat | quote }}
        - --tensor-parallel-size
        - {{ $tp | quote }}
        - --dtype
        - {{ .Values.server.dtype | quote }}
        {{- with .Values.server.maxModelLen }}
        - --max-model-len
        - {{ . | int64 | quote }}
        {{- end }}
        - --gpu-memory-utilization
        - {{ .Values.server.gpuMemoryUtilization | quote }}
        - --engine-stall-timeout
        - {{ .Values.server.engineStallTimeoutSeconds | quote }}
        - --host
        - "0.0.0.0"
        - --port
        - {{ .Values.server.port | int | quote }}
        {{- if $etcdMode }}
        - --etcd-endpoints
        - "$(TPSERVE_ETCD_ENDPOINTS)"
        - --cluster
        - "$(TPSERVE_CLUSTER)"
        {{- else }}
        - --device
        - {{ .Values.worker.device | quote }}
        {{- end }}
        - --shutdown-timeout
        - {{ .Values.server.shutdownTimeoutSeconds | int | quote }}
        {{- range .Values.server.extraArgs }}
        - {{ . | quote }}
        {{- end }}
      env:
        {{- include "tpserve.commonEnv" . | nindent 8 }}
        {{- if or $etcdMode (eq .Values.worker.device "cpu") }}
        {{- include "tpserve.noGpuEnv" . | nindent 8 }}
        {{- else }}
        {{- include "tpserve.gpuEnv" . | nindent 8 }}
        {{- end }}
        - name: OTEL_SERVICE_NAME
          value: {{ include "tpserve.otelServiceName" . | quote }}
        {{- if $apiKeySecret }}
        - name: TPSERVE_API_KEY
          valueFrom:
            secretKeyRef:
              name: {{ $apiKeySecret }}
              key: {{ .Values.apiKey.secretKey }}
        {{- end }}
        {{- with .Values.server.env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      ports:
        - name: http
          containerPort: {{ .Values.server.port }}
          protocol: TCP
      # Start-up: GET /health until the group serves, for up to modelLoadTimeoutSeconds.
      startupProbe:
        httpGet:
          path: /health
          port: http
        periodSeconds: {{ .Values.server.probes.startup.periodSeconds }}
        failureThreshold: {{ include "tpserve.startupThreshold" . }}
        timeoutSeconds: {{ .Values.server.probes.startup.timeoutSeconds }}
      # Readiness: /health follows the workers (503 while one is down or the group re-forms).
      readinessProbe:
        httpGet:
          path: /health
          port: http
        periodSeconds: {{ .Values.server.probes.readiness.periodSeconds }}
        failureThreshold: {{ .Values.server.probes.readiness.failureThreshold }}
        timeoutSeconds: {{ .Values.server.probes.readiness.timeoutSeconds }}
      # Liveness: /live follows the engine loop's heartbeat, not the workers.
      livenessProbe:
        httpGet:
          path: /live
          port: http
        periodSeconds: {{ .Values.server.probes.liveness.periodSeconds }}
        failureThreshold: {{ .Values.server.probes.liveness.failureThreshold }}
        timeoutSeconds: {{ .Values.server.probes.liveness.timeoutSeconds }}
      {{- if gt (int .Values.server.preStopSleepSeconds) 0 }}
      lifecycle:
        preStop:
          exec:
            command: ["sleep", {{ .Values.server.preStopSleepSeconds | int | quote }}]
      {{- end }}
      securityContext:
        {{- toYaml .Values.securityContext | nindent 8 }}
      resources:
        {{- if $etcdMode }}
        {{- toYaml .Values.server.resources | nindent 8 }}
        {{- else }}
        {{- include "tpserve.rankResources" . | nindent 8 }}
        {{- end }}
      volumeMounts:
        {{- include "tpserve.commonMounts" . | nindent 8 }}
    {{- if $etcdMode }}
    # The tensorParallelSize ranks of this pod's group, one tpserve-worker process per GPU.
    - name: workers
      image: {{ include "tpserve.image" . }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      command: ["bash", "-c"]
      args:
        - |
          {{- include "tpserve.workersScript" . | nindent 10 }}
      env:
        {{- include "tpserve.commonEnv" . | nindent 8 }}
        {{- if eq .Values.worker.device "cuda" }}
        {{- include "tpserve.gpuEnv" . | nindent 8 }}
        {{- else }}
        {{- include "tpserve.noGpuEnv" . | nindent 8 }}
        {{- end }}
        - name: OTEL_SERVICE_NAME
          value: {{ printf "%s-worker" (include "tpserve.otelServiceName" .) | quote }}
        {{- with .Values.worker.env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      # Fails only while the pod's coordinator reports its engine stuck on a step from these
      # ranks (GET /live on loopback: workers_stalled), so a hung collective restarts them.
      livenessProbe:
        exec:
          command: ["tpserve-probe", "workers", {{ .Values.server.port | int | quote }}]
        periodSeconds: {{ .Values.worker.probes.liveness.periodSeconds }}
        failureThreshold: {{ .Values.worker.probes.liveness.failureThreshold }}
        timeoutSeconds: {{ .Values.worker.probes.liveness.timeoutSeconds }}
      securityContext:
        {{- toYaml .Values.securityContext | nindent 8 }}
      resources:
        {{- include "tpserve.rankResources" . | nindent 8 }}
      volumeMounts:
        {{- include "tpserve.commonMounts" . | nindent 8 }}
    {{- end }}
  volumes:
    {{- if not (include "tpserve.perReplicaModel" .) }}
    - name: model
      {{- if eq .Values.model.source "pvc" }}
      persistentVolumeClaim:
        claimName: {{ .Values.model.pvc.claimName }}
        readOnly: {{ .Values.model.pvc.readOnly }}
      {{- else if eq .Values.model.source "hostPath" }}
      hostPath:
        path: {{ .Values.model.hostPath.path }}
        type: {{ .Values.model.hostPath.type }}
      {{- else if eq .Values.model.download.storage "sharedClaim" }}
      persistentVolumeClaim:
        claimName: {{ .Values.model.pvc.claimName }}
      {{- else }}
      emptyDir:
        sizeLimit: {{ .Values.model.download.sizeLimit }}
      {{- end }}
    {{- else if eq .Values.workload.kind "Deployment" }}
    # A claim per pod, made with the pod and deleted with it: the download survives container
    # restarts and needs no node disk.
    - name: model
      ephemeral:
        volumeClaimTemplate:
          metadata:
            labels:
              {{- include "tpserve.server.selectorLabels" . | nindent 14 }}
          spec:
            {{- include "tpserve.modelClaimSpec" . | nindent 12 }}
    {{- end }}
    - name: shm
      emptyDir:
        medium: Memory
        sizeLimit: {{ .Values.shm.sizeLimit }}
    - name: cache
      emptyDir: {}
    - name: tmp
      emptyDir: {}
    {{- if and $etcdMode $clientTls }}
    - name: etcd-tls
      secret:
        secretName: {{ $clientTls }}
        defaultMode: 0440
    {{- end }}
    {{- with .Values.worker.tls.secret }}
    - name: worker-tls
      secret:
        secretName: {{ . }}
        defaultMode: 0440
    {{- end }}
  {{- with .Values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.topologySpreadConstraints }}
  topologySpreadConstraints:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}

{{/* The spec of a per-replica model claim. */}}
{{- define "tpserve.modelClaimSpec" -}}
accessModes: ["ReadWriteOnce"]
{{- with .Values.model.download.perReplica.storageClass }}
storageClassName: {{ . }}
{{- end }}
resources:
  requests:
    storage: {{ .Values.model.download.perReplica.size }}
{{- end }}
