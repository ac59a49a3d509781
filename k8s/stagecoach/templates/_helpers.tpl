{{/*
The chart's name, at most 63 characters (a DNS label).
*/}}
{{- define "stagecoach.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name that prefixes every resource: release-chart, or the release alone when it already
contains the chart's name. At most 40 characters: KubeRay derives pod and Service names from the
RayCluster's name (e.g. <name>-stage-worker-xxxxx, <name>-head-svc) and those must stay within 63.
*/}}
{{- define "stagecoach.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
chart-version, as the helm.sh/chart label.
*/}}
{{- define "stagecoach.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels on every object.
*/}}
{{- define "stagecoach.labels" -}}
helm.sh/chart: {{ include "stagecoach.chart" . }}
{{ include "stagecoach.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Labels that select this release's pods (all of them: head and stages).
*/}}
{{- define "stagecoach.selectorLabels" -}}
app.kubernetes.io/name: {{ include "stagecoach.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
The Secret with the API key and the stage-link token.
*/}}
{{- define "stagecoach.secretName" -}}
{{- default (include "stagecoach.fullname" .) .Values.auth.existingSecret }}
{{- end }}

{{/*
The image, tagged with the chart's appVersion unless image.tag says otherwise.
*/}}
{{- define "stagecoach.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
Where the checkpoint folder is inside every pod.
*/}}
{{- define "stagecoach.modelPath" -}}
{{- printf "%s/%s" (trimSuffix "/" .Values.model.mountPath) .Values.model.folder }}
{{- end }}

{{/*
The model volume: an existing claim, else a folder on the node.
*/}}
{{- define "stagecoach.modelVolume" -}}
- name: model
{{- if .Values.model.existingClaim }}
  persistentVolumeClaim:
    claimName: {{ .Values.model.existingClaim }}
    readOnly: true
{{- else }}
  hostPath:
    path: {{ .Values.model.hostPath }}
    type: Directory
{{- end }}
{{- end }}

{{/*
Environment of every container that runs Stagecoach: the API key and the link token, from the Secret.
*/}}
{{- define "stagecoach.secretEnv" -}}
- name: STAGECOACH_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "stagecoach.secretName" . }}
      key: api-key
- name: STAGECOACH_LINK_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "stagecoach.secretName" . }}
      key: link-token
{{- end }}

{{/*
The `stagecoach serve` command the submitter runs as a Ray job on the head.
*/}}
{{- define "stagecoach.serveCommand" -}}
- stagecoach
- serve
- --config
- /etc/stagecoach/stagecoach.yaml
- --host
- 0.0.0.0
- --port
- {{ .Values.serve.port | quote }}
- --api-key-env
- STAGECOACH_API_KEY
- --served-model-name
- {{ default .Values.model.folder .Values.model.servedModelName | quote }}
- --request-timeout
- {{ .Values.serve.requestTimeoutSeconds | quote }}
- --drain-timeout
- {{ .Values.serve.drainTimeoutSeconds | quote }}
{{- if gt (int .Values.serve.maxRunning) 0 }}
- --max-running
- {{ .Values.serve.maxRunning | quote }}
{{- end }}
{{- if ge (int .Values.serve.maxQueue) 0 }}
- --max-queue
- {{ .Values.serve.maxQueue | quote }}
{{- end }}
{{- if gt (int .Values.serve.maxModelLen) 0 }}
- --max-model-len
- {{ .Values.serve.maxModelLen | quote }}
{{- end }}
{{- range .Values.serve.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}
