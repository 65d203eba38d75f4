{{/* Names and labels shared by every template. */}}
{{- define "meritrun.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "meritrun.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "meritrun.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "meritrun.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "meritrun.selectorLabels" -}}
app.kubernetes.io/name: {{ include "meritrun.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "meritrun.serviceAccountName" -}}
{{- default (include "meritrun.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "meritrun.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "meritrun.minioName" -}}
{{- printf "%s-minio" (include "meritrun.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Namespaced permissions: exactly what the operator calls (the RBAC test checks every request
it makes against these rules). No secrets: stage Jobs get S3 keys by secretKeyRef (resolved
by the kubelet) and the operator gets its own from its environment.
*/}}
{{- define "meritrun.namespacedRules" -}}
- apiGroups: ["merit.run"]
  resources: ["meritruns"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["merit.run"]
  resources: ["meritruns/status"]
  verbs: ["patch"]
# Owner references with blockOwnerDeletion need update on the owner's finalizers.
- apiGroups: ["merit.run"]
  resources: ["meritruns/finalizers"]
  verbs: ["update"]
# get (and patch for ConfigMaps): adopting what an earlier round created (409 AlreadyExists).
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "delete"]
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "list", "create", "patch", "delete"]
# Headless Services of multi-node train Jobs (training.nodes > 1): their pods' DNS names.
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "list", "create", "delete"]
# A failed stage's reason is its pod's termination message; a stuck one's, its pod's state
# (rounds read the pods from a watch).
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- if .Values.pullSites.enabled }}
# Pull sites' grant bundles (Secrets <run>-<partition>-grant, owned by the run); get also
# reads the kubeconfig Secrets of remote sites when those are enabled.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "create", "patch", "delete"]
{{- else if .Values.remoteSites.enabled }}
# kubeconfig Secrets of remote sites (sites[].secretRef).
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
{{- end }}
{{- end -}}
