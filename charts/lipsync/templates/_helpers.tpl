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

{{- define "lipsync.tests.selectorLabels" -}}
app.kubernetes.io/name: lipsync-test
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "lipsync.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (printf "%s-operator" (include "lipsync.fullname" .)) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* repository@digest when a digest is given (the tag is then ignored), else repository:tag.
     Called with (dict "image" .Values.x.image "defaultTag" "...") */}}
{{- define "lipsync.imageRef" -}}
{{- if .image.digest -}}
{{- printf "%s@%s" .image.repository .image.digest -}}
{{- else -}}
{{- printf "%s:%s" .image.repository (default .defaultTag .image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "lipsync.operator.image" -}}
{{- include "lipsync.imageRef" (dict "image" .Values.operator.image "defaultTag" .Chart.AppVersion) -}}
{{- end -}}

{{- define "lipsync.inference.image" -}}
{{- include "lipsync.imageRef" (dict "image" .Values.inference.image "defaultTag" .Chart.AppVersion) -}}
{{- end -}}

{{- define "lipsync.redis.image" -}}
{{- include "lipsync.imageRef" (dict "image" .Values.redis.image "defaultTag" .Values.redis.image.tag) -}}
{{- end -}}

{{- define "lipsync.tests.image" -}}
{{- if .Values.tests.image.repository -}}
{{- include "lipsync.imageRef" (dict "image" .Values.tests.image "defaultTag" "latest") -}}
{{- else -}}
{{- include "lipsync.operator.image" . -}}
{{- end -}}
{{- end -}}

{{/* true when the operator serves a list of namespaces (a Role in each) instead of all (a ClusterRole). */}}
{{- define "lipsync.namespaceScoped" -}}
{{- if and (eq .Values.rbac.scope "cluster") .Values.operator.watchNamespaces -}}
{{- fail "operator.watchNamespaces is set but rbac.scope is cluster (all namespaces): set rbac.scope=namespace, or leave operator.watchNamespaces empty" -}}
{{- end -}}
{{- if eq .Values.rbac.scope "namespace" -}}true{{- end -}}
{{- end -}}

{{/* The namespaces the operator serves with rbac.scope namespace, as a JSON list (fromJsonArray). */}}
{{- define "lipsync.watchNamespaces" -}}
{{- default (list .Release.Namespace) .Values.operator.watchNamespaces | toJson -}}
{{- end -}}

{{/* The Secret holding the chart's Redis password (key: password). */}}
{{- define "lipsync.redis.secretName" -}}
{{- default (printf "%s-redis" (include "lipsync.fullname" .)) .Values.redis.auth.existingSecret -}}
{{- end -}}

{{/* The Redis every LipSyncModel without its own uses: the chart's, or an external one. */}}
{{- define "lipsync.redis.url" -}}
{{- if .Values.redis.enabled -}}
{{- /* $(VAR): the kubelet puts in the password from the Secret (the operator's env, operator-deployment.yaml) */ -}}
{{- printf "redis://:$(LIPSYNC_OPERATOR_DEFAULT_REDIS_PASSWORD)@%s-redis.%s.svc:6379/0" (include "lipsync.fullname" .) .Release.Namespace -}}
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
