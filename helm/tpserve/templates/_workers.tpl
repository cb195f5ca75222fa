{{/*
The workers container's script: it starts the tensorParallelSize ranks of this pod's group, one
`tpserve-worker` process each, all in one container so that every rank sees every GPU of the pod
(NVLink peer-to-peer and CUDA IPC between ranks need that; see the README).

- Rank R listens on 127.0.0.1:(worker.basePort + R) and uses --device cuda:R (or cpu); it
  registers that address in etcd under the cluster name "$TPSERVE_CLUSTER" (the pod's name), where
  the pod's coordinator finds it. The ports are on loopback: nothing outside the pod reaches them.
- When any rank exits, the others are stopped and the container exits with that rank's status;
  the kubelet restarts it and the coordinator re-forms the group (a lost rank breaks the group's
  communicator anyway).
- On SIGTERM the ranks keep serving while the coordinator drains: the script waits until no
  connection to rank 0's port is ESTABLISHED (the coordinator has exited), at most the drain time,
  then stops them.
The script must not contain "$(NAME)" for a NAME of the container's environment (the kubelet would
substitute it) nor "$$" (which the kubelet turns into "$").
*/}}
{{- define "tpserve.workersScript" -}}
{{- $tp := int .Values.tensorParallelSize -}}
{{- $base := int .Values.worker.basePort -}}
{{- $drain := add (int .Values.server.shutdownTimeoutSeconds) (int .Values.server.preStopSleepSeconds) 10 -}}
set -u
pids=()
stop_ranks() {
  deadline=$((SECONDS + {{ $drain }}))
  while [ "$SECONDS" -lt "$deadline" ] && grep -qE '^ *[0-9]+: [0-9A-F]+:{{ printf "%04X" $base }} [0-9A-F]+:[0-9A-F]+ 01 ' /proc/net/tcp /proc/net/tcp6 2>/dev/null; do
    sleep 1
  done
  kill -TERM "${pids[@]}" 2>/dev/null
}
trap 'stop_ranks; wait; exit 143' TERM INT
{{- range $rank := until $tp }}
tpserve-worker --etcd-endpoints "$TPSERVE_ETCD_ENDPOINTS" --cluster "$TPSERVE_CLUSTER" --rank {{ $rank }} --tensor-parallel-size {{ $tp }} --listen 127.0.0.1:{{ add $base $rank }} --device {{ if eq $.Values.worker.device "cuda" }}cuda:{{ $rank }}{{ else }}cpu{{ end }}{{ range $.Values.worker.extraArgs }} {{ squote . }}{{ end }} &
pids+=("$!")
{{- end }}
wait -n
rc=$?
echo "tpserve-workers: a rank exited with status $rc; stopping the others" >&2
kill -TERM "${pids[@]}" 2>/dev/null
wait
exit "$rc"
{{- end }}
