{{/*
Names. The operator's objects are named after the release: "<release>-operator", or the
release name itself when it already ends in "operator" (release "dbportal" gives
"dbportal-operator"). Cluster-scoped objects add the release namespace, since two releases
of the same name may live in two namespaces.
*/}}
{{- define "dbportal.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if hasSuffix "operator" .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-operator" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "dbportal.clusterName" -}}
{{- printf "%s-%s" (include "dbportal.fullname" .) .Release.Namespace -}}
{{- end -}}

{{- define "dbportal.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- .Values.serviceAccount.name | default (include "dbportal.fullname" .) -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "dbportal.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}
{{- end -}}

{{- define "dbportal.labels" -}}
app.kubernetes.io/name: dbportal
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "dbportal.selectorLabels" -}}
app.kubernetes.io/name: dbportal
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{/* Labels of objects made for the monitoring stack, plus the ones the user asked for. */}}
{{- define "dbportal.monitoringLabels" -}}
{{ include "dbportal.labels" .root }}
{{- with .extra }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The portal pods of every DatabasePortal (labels the operator puts on them). */}}
{{- define "dbportal.portalSelectorLabels" -}}
app.kubernetes.io/name: dbportal
app.kubernetes.io/component: portal
app.kubernetes.io/managed-by: dbportal-operator
{{- end -}}
