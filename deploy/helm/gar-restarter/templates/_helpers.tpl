{{/* Labels on every object (never in selectors: a Deployment's selector is immutable). */}}
{{- define "gar-restarter.labels" -}}
app.kubernetes.io/name: gar-restarter
app.kubernetes.io/component: controller
app.kubernetes.io/part-of: gar-restarter
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end }}

{{/* The selector: the same two labels as deploy/base. */}}
{{- define "gar-restarter.selector" -}}
app.kubernetes.io/name: gar-restarter
app.kubernetes.io/component: controller
{{- end }}

{{/* Name of a cluster-scoped object: carries the namespace so releases do not collide. */}}
{{- define "gar-restarter.clusterName" -}}
gar-restarter-{{ .Release.Namespace }}
{{- end }}

{{/* REPOSITORY[:TAG][@DIGEST]; fails on a tag-only image unless image.requireDigest is false. */}}
{{- define "gar-restarter.image" -}}
{{- $tag := .Values.image.tag | default .Chart.AppVersion -}}
{{- if eq $tag "latest" -}}
{{- fail "image.tag: `latest` is not allowed; set image.digest (and a release tag)" -}}
{{- end -}}
{{- with .Values.image.digest -}}
{{- if not (regexMatch "^sha256:[0-9a-f]{64}$" .) -}}
{{- fail (printf "image.digest must be sha256:<64 lowercase hex>, got %q" .) -}}
{{- end -}}
{{- end -}}
{{- if and .Values.image.requireDigest (not .Values.image.digest) -}}
{{- fail "image.digest is required (sha256:...): the chart pins the image by digest. Set image.requireDigest=false to run a tag (not for production)" -}}
{{- end -}}
{{- .Values.image.repository -}}:{{- $tag -}}
{{- with .Values.image.digest -}}@{{ . }}{{- end -}}
{{- end }}

{{/* Sanity checks that the schema cannot express. */}}
{{- define "gar-restarter.validate" -}}
{{- if eq .Values.scope.mode "namespaced" -}}
{{- if not .Values.scope.namespaces -}}
{{- fail "scope.namespaces must list at least one namespace when scope.mode is namespaced" -}}
{{- end -}}
{{- else if .Values.scope.namespaces -}}
{{- fail "scope.namespaces must be empty when scope.mode is cluster (a ClusterRole with --namespace is not least privilege; use scope.mode=namespaced)" -}}
{{- end -}}
{{- end }}
