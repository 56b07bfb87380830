{{/*
Expand the name of the chart.
*/}}
{{- define "baton-coordinator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Create a default fully qualified app name.
We truncate at 63 chars because some Kubernetes name fields are limited to this (by the DNS naming spec).
If release name contains chart name it will be used as a full name.
*/}}
{{- define "baton-coordinator.fullname" -}}
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

{{/*
Create chart name and version as used by the chart label.
*/}}
{{- define "baton-coordinator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels
*/}}
{{- define "baton-coordinator.labels" -}}
helm.sh/chart: {{ include "baton-coordinator.chart" . }}
{{ include "baton-coordinator.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Selector labels
*/}}
{{- define "baton-coordinator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "baton-coordinator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Create the name of the service account to use
*/}}
{{- define "baton-coordinator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "baton-coordinator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The Secrets the coordinator cannot run without.
*/}}
{{- define "baton-coordinator.databaseSecret" -}}
{{- required "database.existingSecret is required: a Secret holding the PostgreSQL URL" .Values.database.existingSecret }}
{{- end }}

{{- define "baton-coordinator.tlsSecret" -}}
{{- required "tls.existingSecret is required: a Secret with tls.crt, tls.key and ca.crt" .Values.tls.existingSecret }}
{{- end }}
