{{/*
Names, labels, the image and the Redis URL: each fact is computed here once and used by every
template.
*/}}

{{- define "pdserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Release-wide prefix of every object name. Kept short enough that StatefulSet and LeaderWorkerSet
pod names (prefix + "-decode-<group>-<index>") stay within Kubernetes' 63-character label limit.
*/}}
{{- define "pdserve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else if contains (include "pdserve.name" .) .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "pdserve.name" .) | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/* Name of one component's objects. Call with (dict "root" $ "component" "router"). */}}
{{- define "pdserve.componentName" -}}
{{- printf "%s-%s" (include "pdserve.fullname" .root) .component }}
{{- end }}

{{/* Labels that select one component's pods. Call with (dict "root" $ "component" "router"). */}}
{{- define "pdserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pdserve.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Labels of every object. Call with (dict "root" $ "component" "router"). */}}
{{- define "pdserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: pdserve
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
{{ include "pdserve.selectorLabels" . }}
{{- end }}

{{- define "pdserve.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/*
The one Redis URL every router and node registers with: the chart's own Redis, or an external one.
*/}}
{{- define "pdserve.redisUrl" -}}
{{- if .Values.redis.enabled }}
{{- printf "redis://%s:%d/0" (include "pdserve.componentName" (dict "root" . "component" "redis")) (int .Values.redis.port) }}
{{- else }}
{{- required "redis.url is required when redis.enabled is false (e.g. redis://my-redis:6379/0)" .Values.redis.url }}
{{- end }}
{{- end }}

{{/*
`--ep-size` of a node: every GPU of its group is one expert-parallel rank, and a LeaderWorkerSet
group spans `leaderWorkerSet.size` hosts. Call with the role's values.
*/}}
{{- define "pdserve.epSize" -}}
{{- $hosts := ternary .leaderWorkerSet.size 1 .leaderWorkerSet.enabled }}
{{- mul .gpusPerPod $hosts }}
{{- end }}

{{/*
Container resources of a node: the user's cpu/memory plus the GPUs and the optional RDMA devices.
Extended resources need only limits; Kubernetes sets the requests equal to them.
*/}}
{{- define "pdserve.nodeResources" -}}
{{- $limits := dict "nvidia.com/gpu" .gpusPerPod }}
{{- if .rdma.enabled }}
{{- $_ := set $limits .rdma.resource .rdma.count }}
{{- end }}
{{- $limits = merge $limits (.resources.limits | default dict) -}}
limits:
  {{- toYaml $limits | nindent 2 }}
{{- with .resources.requests }}
requests:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
