{{/* Helpers of the `serve` Deployment (templates/serve.yaml). */}}

{{/* Whole cores of serve.resources.limits.cpu, at least 1: TensorFlow's intra-op threads. */}}
{{- define "fruitdask.serveThreads" -}}
{{- $cpu := toString .Values.serve.resources.limits.cpu -}}
{{- $cores := 0 -}}
{{- if hasSuffix "m" $cpu -}}
{{- $cores = div (atoi (trimSuffix "m" $cpu)) 1000 -}}
{{- else -}}
{{- $cores = floor (float64 $cpu) | int -}}
{{- end -}}
{{- max 1 $cores -}}
{{- end }}

{{- define "fruitdask.serveSelectorLabels" -}}
{{ include "fruitdask.selectorLabels" . }}
app.kubernetes.io/component: serve
{{- end }}

{{/* The serve pods' own service account: read-only on the model (never the workers' role). */}}
{{- define "fruitdask.serveServiceAccountName" -}}
{{- if .Values.serve.serviceAccount.create }}
{{- default (printf "%s-serve" (include "fruitdask.fullname" .)) .Values.serve.serviceAccount.name }}
{{- else }}
{{- required "serve.serviceAccount.name is required when serve.serviceAccount.create is false" .Values.serve.serviceAccount.name }}
{{- end }}
{{- end }}
