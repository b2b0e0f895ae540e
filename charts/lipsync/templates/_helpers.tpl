{{/* Names, labels and derived values shared by the templates. */}}

{{- define "lipsync.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "lipsync.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/part-of: lipsync
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "lipsync.operator.selectorLabels" -}}
app.kubernetes.io/name: lipsync-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "lipsync.redis.selectorLabels" -}}
app.kubernetes.io/name: lipsync-redis
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "lipsync.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (printf "%s-operator" (include "lipsync.fullname" .)) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "lipsync.operator.image" -}}
{{- printf "%s:%s" .Values.operator.image.repository (default .Chart.AppVersion .Values.operator.image.tag) -}}
{{- end -}}

{{- define "lipsync.inference.image" -}}
{{- printf "%s:%s" .Values.inference.image.repository (default .Chart.AppVersion .Values.inference.image.tag) -}}
{{- end -}}

{{- define "lipsync.tests.image" -}}
{{- if .Values.tests.image.repository -}}
{{- printf "%s:%s" .Values.tests.image.repository (default "latest" .Values.tests.image.tag) -}}
{{- else -}}
{{- include "lipsync.operator.image" . -}}
{{- end -}}
{{- end -}}

{{/* The Redis every LipSyncModel without its own uses: the chart's, or an external one. */}}
{{- define "lipsync.redis.url" -}}
{{- if .Values.redis.enabled -}}
{{- printf "redis://%s-redis.%s.svc:6379/0" (include "lipsync.fullname" .) .Release.Namespace -}}
{{- else -}}
{{- .Values.redis.externalUrl -}}
{{- end -}}
{{- end -}}

{{/* k1=v1,k2=v2 for LIPSYNC_OPERATOR_MONITOR_LABELS */}}
{{- define "lipsync.monitorLabels" -}}
{{- $pairs := list -}}
{{- range $key, $value := .Values.monitoring.podMonitorLabels -}}
{{- $pairs = append $pairs (printf "%s=%s" $key $value) -}}
{{- end -}}
{{- join "," $pairs -}}
{{- end -}}

{{- define "lipsync.restrictedSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: [ALL]
{{- end -}}

{{/* The operator's rules in a namespace it serves (a ClusterRole when it serves all). */}}
{{- define "lipsync.namespacedRules" -}}
- apiGroups: [synctalk.io]
  resources: [lipsyncmodels]
  verbs: [get, list, watch, patch]
- apiGroups: [synctalk.io]
  resources: [lipsyncmodels/status]
  verbs: [get, patch]
- apiGroups: [synctalk.io]
  resources: [lipsyncmodels/finalizers]
  verbs: [update]
- apiGroups: [synctalk.io]
  resources: [lipsyncpools]
  verbs: [get, list, watch, patch]
- apiGroups: [synctalk.io]
  resources: [lipsyncpools/status]
  verbs: [get, patch]
- apiGroups: [synctalk.io]
  resources: [lipsyncpools/finalizers]
  verbs: [update]
- apiGroups: [""]
  resources: [pods]
  verbs: [list, patch]
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [""]
  resources: [services]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [autoscaling]
  resources: [horizontalpodautoscalers]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [monitoring.coreos.com]
  resources: [podmonitors]
  verbs: [get, list, watch, create, patch, delete]
{{- if .Values.rbac.readPackageSecrets }}
- apiGroups: [""]
  resources: [secrets]
  verbs: [get]
{{- end }}
- apiGroups: ["", events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- end -}}
