{{/* Names and labels, as `helm create` makes them. */}}
{{- define "observe-r1.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "observe-r1.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "observe-r1.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "observe-r1.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector labels of one component: include "observe-r1.selector" (list . "server") */}}
{{- define "observe-r1.selector" -}}
{{- $ctx := index . 0 -}}
app.kubernetes.io/name: {{ include "observe-r1.name" $ctx }}
app.kubernetes.io/instance: {{ $ctx.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "observe-r1.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "observe-r1.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "observe-r1.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "observe-r1.modelDir" -}}
/data/{{ .Values.model.path | trimPrefix "/" }}
{{- end }}

{{- define "observe-r1.claimName" -}}
{{- .Values.data.existingClaim | default (printf "%s-data" (include "observe-r1.fullname" .)) }}
{{- end }}

{{/* The API key's Secret and key, or nothing when the server takes no key. */}}
{{- define "observe-r1.apiKeySecret" -}}
{{- if .Values.apiKey.existingSecret }}{{ .Values.apiKey.existingSecret }}
{{- else if .Values.apiKey.value }}{{ include "observe-r1.fullname" . }}-api-key
{{- end }}
{{- end }}

{{/* Environment variables every container of the chart gets. */}}
{{- define "observe-r1.commonEnv" -}}
{{- if include "observe-r1.apiKeySecret" . }}
- name: OBSERVE_R1_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "observe-r1.apiKeySecret" . }}
      key: {{ .Values.apiKey.secretKey }}
{{- end }}
{{- if .Values.hub.tokenSecret.name }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .Values.hub.tokenSecret.name }}
      key: {{ .Values.hub.tokenSecret.key }}
{{- end }}
{{- end }}

{{/* The volumes every pod mounts: /data, and the writable places a read-only root file system needs. */}}
{{- define "observe-r1.volumes" -}}
{{- $ctx := index . 0 -}}
- name: data
{{- if eq $ctx.Values.data.type "pvc" }}
  persistentVolumeClaim:
    claimName: {{ include "observe-r1.claimName" $ctx }}
{{- else if eq $ctx.Values.data.type "hostPath" }}
  hostPath:
    path: {{ $ctx.Values.data.hostPath }}
    type: DirectoryOrCreate
{{- else }}
  emptyDir: {}
{{- end }}
- name: home
  emptyDir: {}
- name: tmp
  emptyDir: {}
- name: shm
  emptyDir:
    medium: Memory
    sizeLimit: {{ index . 1 }}
{{- end }}

{{- define "observe-r1.volumeMounts" -}}
- {name: data, mountPath: /data}
- {name: home, mountPath: /home/observe}
- {name: tmp, mountPath: /tmp}
- {name: shm, mountPath: /dev/shm}
{{- end }}

{{/* Resources with the GPUs added: include "observe-r1.resources" (list $resources $gpus $gpuResource) */}}
{{- define "observe-r1.resources" -}}
{{- $resources := deepCopy (index . 0) }}
{{- $gpus := index . 1 | int }}
{{- if gt $gpus 0 }}
{{- $gpu := dict (index . 2) $gpus }}
{{- $_ := set $resources "requests" (merge (dict) ($resources.requests | default dict) $gpu) }}
{{- $_ := set $resources "limits" (merge (dict) ($resources.limits | default dict) $gpu) }}
{{- end }}
{{- toYaml $resources }}
{{- end }}

{{/* Scheduling and security fields of a pod spec: include "observe-r1.podCommon" (list . $section) */}}
{{- define "observe-r1.podCommon" -}}
{{- $ctx := index . 0 }}
{{- $s := index . 1 -}}
serviceAccountName: {{ include "observe-r1.serviceAccountName" $ctx }}
automountServiceAccountToken: false
securityContext:
  {{- toYaml $ctx.Values.podSecurityContext | nindent 2 }}
{{- with $ctx.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $s.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $s.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $s.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* An init container that waits until an OpenAI-compatible server answers /ready (it may still be
loading its model), so a Job that needs it does not fail first: include "observe-r1.waitForServer"
(list . $baseUrl), $baseUrl ending in /v1 */}}
{{- define "observe-r1.waitForServer" -}}
{{- $ctx := index . 0 }}
{{- $url := index . 1 -}}
- name: wait-for-server
  image: {{ include "observe-r1.image" $ctx }}
  imagePullPolicy: {{ $ctx.Values.image.pullPolicy }}
  securityContext:
    {{- toYaml $ctx.Values.securityContext | nindent 4 }}
  command:
    - python
    - -c
    - |
      import sys, time, urllib.request
      url = sys.argv[1]
      while True:
          try:
              urllib.request.urlopen(url, timeout=5)
              break
          except OSError as e:
              print(f"waiting for {url}: {e}", flush=True)
              time.sleep(10)
    - {{ trimSuffix "/v1" $url }}/ready
  volumeMounts:
    {{- include "observe-r1.volumeMounts" $ctx | nindent 4 }}
{{- end }}
