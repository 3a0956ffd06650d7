{{/* Names ---------------------------------------------------------------------- */}}
{{- define "fruitdask.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "fruitdask.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "fruitdask.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "fruitdask.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Labels: app.kubernetes.io/* on every object ------------------------------------ */}}
{{- define "fruitdask.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fruitdask.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "fruitdask.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "fruitdask.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: fruitdask
{{- end }}

{{/* Image (GPU variant for GPU workers) -------------------------------------------- */}}
{{- define "fruitdask.image" -}}
{{- $img := .Values.image -}}
{{- if $img.digest -}}
{{ $img.repository }}@{{ $img.digest }}
{{- else -}}
{{ $img.repository }}:{{ $img.tag }}
{{- end -}}
{{- end }}

{{/* GPU workers never use image.digest: it pins the CPU image, which has no CUDA build. */}}
{{- define "fruitdask.workerImage" -}}
{{- $img := .Values.image -}}
{{- if and .Values.worker.gpu.enabled $img.gpuDigest -}}
{{ $img.repository }}@{{ $img.gpuDigest }}
{{- else if .Values.worker.gpu.enabled -}}
{{ $img.repository }}:{{ $img.tag }}{{ $img.gpuTagSuffix }}
{{- else -}}
{{ include "fruitdask.image" . }}
{{- end -}}
{{- end }}

{{/* Scheduler address -------------------------------------------------------------- */}}
{{- define "fruitdask.protocol" -}}
{{- if .Values.tls.enabled }}tls{{ else }}tcp{{ end }}
{{- end }}

{{/* The Secret with ca.crt, tls.crt and tls.key: the user's, or the one the chart's
pre-install hook makes with a CA dedicated to this release (templates/tls-setup.yaml). */}}
{{- define "fruitdask.tlsSecretName" -}}
{{- default (printf "%s-dask-tls" (include "fruitdask.fullname" .)) .Values.tls.existingSecret }}
{{- end }}

{{- define "fruitdask.schedulerAddress" -}}
{{ include "fruitdask.protocol" . }}://{{ include "fruitdask.fullname" . }}-scheduler:{{ .Values.scheduler.service.port }}
{{- end }}

{{/* Worker sizing from resources --------------------------------------------------- */}}
{{/* Whole cores of limits.cpu, at least 1: "2" -> 2, "1500m" -> 1. */}}
{{- define "fruitdask.workerThreads" -}}
{{- $cpu := toString .Values.worker.resources.limits.cpu -}}
{{- $cores := 0 -}}
{{- if hasSuffix "m" $cpu -}}
{{- $cores = div (atoi (trimSuffix "m" $cpu)) 1000 -}}
{{- else -}}
{{- $cores = floor (float64 $cpu) | int -}}
{{- end -}}
{{- max 1 $cores -}}
{{- end }}

{{/* Bytes in a memory quantity (Ki/Mi/Gi/Ti, k/M/G/T or plain bytes). */}}
{{- define "fruitdask.bytes" -}}
{{- $q := toString . -}}
{{- $units := dict "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776 "k" 1000 "M" 1000000 "G" 1000000000 "T" 1000000000000 -}}
{{- $unit := regexFind "(Ki|Mi|Gi|Ti|k|M|G|T)$" $q -}}
{{- if $unit -}}
{{- mulf (float64 (trimSuffix $unit $q)) (get $units $unit) | int64 -}}
{{- else -}}
{{- float64 $q | int64 -}}
{{- end -}}
{{- end }}

{{/* --memory-limit in bytes: limits.memory times worker.memoryFraction. */}}
{{- define "fruitdask.workerMemoryLimit" -}}
{{- $bytes := include "fruitdask.bytes" .Values.worker.resources.limits.memory -}}
{{- mulf (float64 $bytes) .Values.worker.memoryFraction | int64 -}}
{{- end }}

{{/* Pod hardening ------------------------------------------------------------------ */}}
{{- define "fruitdask.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurity.runAsUser }}
runAsGroup: {{ .Values.podSecurity.runAsGroup }}
fsGroup: {{ .Values.podSecurity.runAsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "fruitdask.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
privileged: false
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "fruitdask.regionAffinity" -}}
nodeAffinity:
  requiredDuringSchedulingIgnoredDuringExecution:
    nodeSelectorTerms:
      - matchExpressions:
          - key: topology.kubernetes.io/region
            operator: In
            values: [{{ .Values.region | quote }}]
{{- end }}

{{/* Environment of every container: writable HOME/TMPDIR, TF settings, TLS (the Active Memory Manager keeps
   Dask's default: nothing a run needs exists only as scattered data).
The region, the region allow-list and the S3 endpoint come after tfEnv/extraEnv: when
a name appears twice Kubernetes keeps the last one, so even values that skipped the
schema (helm --skip-schema-validation) cannot override them. */}}
{{- define "fruitdask.env" -}}
{{ include "fruitdask.storageEnv" . }}
{{- include "fruitdask.tlsEnv" . }}
{{- end }}

{{/* fruitdask.env without the Dask TLS settings: for the serve pods, which are no Dask client. */}}
{{- define "fruitdask.storageEnv" -}}
- name: HOME
  value: /home/fruitdask
- name: TMPDIR
  value: /tmp
{{- range $k, $v := .Values.tfEnv }}
- name: {{ $k }}
  value: {{ $v | quote }}
{{- end }}
{{- range $k, $v := .Values.extraEnv }}
- name: {{ $k }}
  value: {{ $v | quote }}
{{- end }}
- name: AWS_REGION
  value: {{ .Values.region | quote }}
- name: AWS_DEFAULT_REGION
  value: {{ .Values.region | quote }}
- name: FRUITDASK_STORAGE_ALLOWED_REGIONS
  value: {{ join "," .Values.s3.allowedRegions | quote }}
{{- with .Values.s3.endpointUrl }}
- name: FRUITDASK_STORAGE_ENDPOINT_URL
  value: {{ . | quote }}
- name: AWS_ENDPOINT_URL_S3
  value: {{ . | quote }}
{{- end }}
{{- end }}

{{- define "fruitdask.tlsEnv" -}}
{{- if .Values.tls.enabled }}
- name: DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION
  value: "True"
- name: DASK_DISTRIBUTED__COMM__TLS__CA_FILE
  value: /etc/dask/tls/ca.crt
{{- range $role := list "SCHEDULER" "WORKER" "CLIENT" }}
- name: DASK_DISTRIBUTED__COMM__TLS__{{ $role }}__CERT
  value: /etc/dask/tls/tls.crt
- name: DASK_DISTRIBUTED__COMM__TLS__{{ $role }}__KEY
  value: /etc/dask/tls/tls.key
{{- end }}
{{- end }}
{{- end }}

{{/* S3 credentials for the pods that use S3 (workers, Job) when IRSA is not used. */}}
{{- define "fruitdask.s3EnvFrom" -}}
{{- with .Values.s3.credentialsSecret }}
envFrom:
  - secretRef:
      name: {{ . }}
{{- end }}
{{- end }}

{{- define "fruitdask.volumeMounts" -}}
{{ include "fruitdask.scratchVolumeMounts" . }}
{{- if .Values.tls.enabled }}
- name: tls
  mountPath: /etc/dask/tls
  readOnly: true
{{- end }}
{{- end }}

{{/* The writable scratch folders (the root filesystem is read-only), without the Dask TLS key. */}}
{{- define "fruitdask.scratchVolumeMounts" -}}
- name: home
  mountPath: /home/fruitdask
- name: tmp
  mountPath: /tmp
{{- end }}

{{- define "fruitdask.scratchVolumes" -}}
- name: home
  emptyDir:
    sizeLimit: 1Gi
- name: tmp
  emptyDir:
    sizeLimit: 2Gi
{{- end }}

{{- define "fruitdask.volumes" -}}
{{ include "fruitdask.scratchVolumes" . }}
{{- if .Values.tls.enabled }}
- name: tls
  secret:
    secretName: {{ include "fruitdask.tlsSecretName" . }}
    defaultMode: 0440
{{- end }}
{{- end }}

{{/* The scheduler's service account: never the IRSA one (any client of the scheduler can
run code on it, so it must not hold the S3 role). */}}
{{- define "fruitdask.schedulerServiceAccountName" -}}
{{- if .Values.scheduler.serviceAccount.create }}
{{- default (printf "%s-scheduler" (include "fruitdask.fullname" .)) .Values.scheduler.serviceAccount.name }}
{{- else }}
{{- required "scheduler.serviceAccount.name is required when scheduler.serviceAccount.create is false" .Values.scheduler.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Shared pod fields: service account (the IRSA one), hardening, region affinity. */}}
{{- define "fruitdask.podCommon" -}}
serviceAccountName: {{ include "fruitdask.serviceAccountName" . }}
{{ include "fruitdask.podHardening" . }}
{{- end }}

{{/* Shared pod fields without the service account. */}}
{{- define "fruitdask.podHardening" -}}
automountServiceAccountToken: false
{{ include "fruitdask.podPlacement" . }}
{{- end }}

{{/* Pod hardening, region affinity and pull secrets, without the token setting: the daily
pod alone mounts its API token (it creates its DaskCluster). */}}
{{- define "fruitdask.podPlacement" -}}
securityContext:
  {{- include "fruitdask.podSecurityContext" . | nindent 2 }}
affinity:
  {{- include "fruitdask.regionAffinity" . | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* "true" when the static scheduler and worker Deployments are rendered: always without the
schedule, and beside it only with schedule.keepStaticCluster (the daily run makes its own). */}}
{{- define "fruitdask.staticCluster" -}}
{{- if or (not .Values.schedule.enabled) .Values.schedule.keepStaticCluster }}true{{ end }}
{{- end }}

{{/* CronJob names: at most 52 characters (the Job controller appends 11). */}}
{{- define "fruitdask.dailyName" -}}
{{ include "fruitdask.fullname" . | trunc 46 | trimSuffix "-" }}-daily
{{- end }}

{{- define "fruitdask.maintenanceName" -}}
{{ include "fruitdask.fullname" . | trunc 40 | trimSuffix "-" }}-maintenance
{{- end }}

{{/* Labels of the scheduled pods: the release's, their component, and the client labels
(networkPolicy.clientLabels and fruitdask.io/client, which the DaskCluster's own
NetworkPolicies admit with app.kubernetes.io/instance: the release's name). */}}
{{- define "fruitdask.scheduledPodLabels" -}}
{{ include "fruitdask.labels" . }}
{{ toYaml (merge (dict "fruitdask.io/client" "true") .Values.networkPolicy.clientLabels) }}
{{- end }}

{{/* The Job spec shared by the daily and maintenance CronJobs: retries, and exit codes
1-3 (the command's own verdict) failing at once, as for the run Job. */}}
{{- define "fruitdask.scheduledJobSpec" -}}
backoffLimit: {{ .Values.schedule.backoffLimit }}
podFailurePolicy:
  rules:
    - action: FailJob
      onExitCodes:
        operator: In
        values: [1, 2, 3]
    - action: Ignore
      onPodConditions:
        - type: DisruptionTarget
          status: "True"
ttlSecondsAfterFinished: {{ .Values.schedule.ttlSecondsAfterFinished }}
{{- end }}

{{/* The CronJob fields shared by the daily and maintenance schedules. */}}
{{- define "fruitdask.cronJobPolicy" -}}
timeZone: {{ .Values.schedule.timeZone | quote }}
# One at a time: a run still going when the next is due makes the next one wait its turn
# (skipped), never two on the same table.
concurrencyPolicy: Forbid
startingDeadlineSeconds: {{ .Values.schedule.startingDeadlineSeconds }}
successfulJobsHistoryLimit: {{ .Values.schedule.successfulJobsHistoryLimit }}
failedJobsHistoryLimit: {{ .Values.schedule.failedJobsHistoryLimit }}
{{- end }}
