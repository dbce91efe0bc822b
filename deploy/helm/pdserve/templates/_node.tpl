{{/*
Pod template of a prefill or decode node, shared by its StatefulSet and its LeaderWorkerSet.
Call with (dict "root" $ "role" "prefill").

The node registers itself in Redis under its pod name and pod IP, so the router finds it without
a Service in between; the gRPC health service tells the kubelet when the engine is ready.
*/}}
{{- define "pdserve.nodePodTemplate" -}}
{{- $root := .root }}
{{- $role := .role }}
{{- $node := index $root.Values $role }}
{{- $ports := $root.Values.nodePorts -}}
metadata:
  labels:
    {{- include "pdserve.labels" (dict "root" $root "component" $role) | nindent 4 }}
  {{- with $node.podAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  terminationGracePeriodSeconds: {{ $node.terminationGracePeriodSeconds }}
  containers:
    - name: {{ $role }}
      image: {{ include "pdserve.image" $root }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      command: ["pdserve"]
      args:
        - {{ $role }}
        - --host
        - "0.0.0.0"
        - --port
        - {{ $ports.grpc | quote }}
        - --metrics-port
        - {{ $ports.metrics | quote }}
        - --redis-url
        - {{ include "pdserve.redisUrl" $root | quote }}
        - --advertise-host
        - $(POD_IP)
        - --node-name
        - $(POD_NAME)
        - --ep-size
        - {{ include "pdserve.epSize" $node | quote }}
        {{- if $node.leaderWorkerSet.enabled }}
        # One EP group over the LWS group's pods: this pod's index and the leader's rendezvous.
        - --ep-nnodes
        - {{ $node.leaderWorkerSet.size | quote }}
        - --ep-node-rank
        - $(LWS_WORKER_INDEX)
        - --ep-master
        - $(LWS_LEADER_ADDRESS):{{ $ports.epRendezvous }}
        {{- end }}
        - --model
        - {{ $root.Values.model | quote }}
        - --load-format
        - {{ $root.Values.loadFormat | quote }}
        {{- range $node.extraArgs }}
        - {{ . | quote }}
        {{- end }}
      env:
        - name: POD_IP
          valueFrom:
            fieldRef:
              fieldPath: status.podIP
        - name: POD_NAME
          valueFrom:
            fieldRef:
              fieldPath: metadata.name
        {{- with $node.env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      ports:
        - name: grpc
          containerPort: {{ $ports.grpc }}
        - name: metrics
          containerPort: {{ $ports.metrics }}
      # Loading weights and warming up can take many minutes; the startup probe holds off the
      # liveness probe until then.
      startupProbe:
        grpc:
          port: {{ $ports.grpc }}
        periodSeconds: 10
        failureThreshold: {{ div $node.startupTimeoutSeconds 10 | max 1 }}
      readinessProbe:
        grpc:
          port: {{ $ports.grpc }}
        periodSeconds: 5
      livenessProbe:
        grpc:
          port: {{ $ports.grpc }}
        periodSeconds: 10
        failureThreshold: 6
      resources:
        {{- include "pdserve.nodeResources" $node | nindent 8 }}
      {{- if $node.rdma.enabled }}
      securityContext:
        capabilities:
          # RDMA memory registration pins the KV pool's pages: the process needs locked memory.
          add: ["IPC_LOCK"]
      {{- end }}
      volumeMounts:
        # NCCL and the expert-parallel all-to-all exchange buffers through /dev/shm; the
        # container runtime's 64 MiB default is far too small.
        - name: dshm
          mountPath: /dev/shm
        {{- with $node.extraVolumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    - name: dshm
      emptyDir:
        medium: Memory
        sizeLimit: {{ $node.shmSizeLimit }}
    {{- with $node.extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $node.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $node.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $node.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
