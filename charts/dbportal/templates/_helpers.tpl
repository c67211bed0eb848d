{{- define "dbportal.name" -}}dbportal-operator{{- end -}}

{{- define "dbportal.labels" -}}
app.kubernetes.io/name: dbportal
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "dbportal.selectorLabels" -}}
app.kubernetes.io/name: dbportal
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}
