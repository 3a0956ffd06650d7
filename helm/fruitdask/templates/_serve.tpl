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
