{{/* Names and labels. */}}
{{- define "joulegate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "joulegate.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "joulegate.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "joulegate.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "joulegate.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "joulegate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels of one component: gateway, redis, llamacpp, vllm-moe, vllm-dense. */}}
{{- define "joulegate.selector" -}}
app.kubernetes.io/name: {{ include "joulegate.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "joulegate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "joulegate.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "joulegate.secretName" -}}
{{- default (printf "%s-keys" (include "joulegate.fullname" .)) .Values.secret.existingSecret -}}
{{- end -}}

{{/* The Redis URL the ledger uses, or "" for the embedded ledger. */}}
{{- define "joulegate.redisUrl" -}}
{{- if .Values.redis.enabled -}}
{{- printf "redis://%s-redis:6379/0" (include "joulegate.fullname" .) -}}
{{- else -}}
{{- .Values.redis.url -}}
{{- end -}}
{{- end -}}

{{/* The policy the gateway loads: values.policy plus what the chart manages. */}}
{{- define "joulegate.policy" -}}
{{- $fullname := include "joulegate.fullname" . -}}
{{- $policy := deepCopy (.Values.policy | default (.Files.Get "files/default-policy.yaml" | fromYaml)) -}}
{{- $server := merge (dict "host" "0.0.0.0" "port" (int .Values.containerPort)) (get $policy "server" | default dict) -}}
{{- $_ := set $server "host" "0.0.0.0" -}}
{{- $_ := set $server "port" (int .Values.containerPort) -}}
{{- if .Values.secret.metricsTokenKey -}}
{{- $_ := set $server "metrics_token" (printf "env:%s" .Values.secret.metricsTokenKey) -}}
{{- end -}}
{{- $_ := set $policy "server" $server -}}
{{- $_ := set $policy "state_dir" "/var/lib/joulegate" -}}
{{- $url := include "joulegate.redisUrl" . -}}
{{- if $url -}}
{{- $_ := set $policy "ledger" (dict "kind" "redis" "url" $url "on_unavailable" .Values.redis.onUnavailable) -}}
{{- else -}}
{{- $_ := set $policy "ledger" (dict "kind" "embedded") -}}
{{- end -}}
{{- $backends := get $policy "backends" | default dict -}}
{{- with .Values.backends.llamacpp -}}
{{- if .enabled -}}
{{- $_ := set $backends .policyName (dict "kind" "openai" "base_url" (printf "http://%s-llamacpp:8080/v1" $fullname)) -}}
{{- end -}}
{{- end -}}
{{- range $key, $component := dict "vllmMoe" "vllm-moe" "vllmDense" "vllm-dense" -}}
{{- $b := get $.Values.backends $key -}}
{{- if $b.enabled -}}
{{- $spec := dict "kind" "vllm" "base_url" (printf "http://%s-%s:8000/v1" $fullname $component) -}}
{{- if $b.maxWaiting -}}
{{- $_ := set $spec "max_waiting" (int $b.maxWaiting) -}}
{{- end -}}
{{- if $b.energy.dcgmUrl -}}
{{- $_ := set $spec "energy" (dict "meter" "prometheus" "prometheus_url" $b.energy.dcgmUrl "prometheus_series" $b.energy.series "prometheus_unit" $b.energy.unit) -}}
{{- end -}}
{{- $_ := set $backends $b.policyName $spec -}}
{{- end -}}
{{- end -}}
{{- $_ := set $policy "backends" $backends -}}
{{- toYaml $policy -}}
{{- end -}}

{{/* More than one gateway needs a shared ledger. */}}
{{- define "joulegate.checkLedger" -}}
{{- $many := or .Values.autoscaling.enabled (gt (int .Values.replicaCount) 1) -}}
{{- if and $many (not (include "joulegate.redisUrl" .)) -}}
{{- fail "joulegate: more than one gateway replica (replicaCount > 1 or autoscaling.enabled) needs a shared budget ledger: set redis.enabled=true or redis.url" -}}
{{- end -}}
{{- end -}}
