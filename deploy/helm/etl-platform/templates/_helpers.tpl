{{/* Names and labels shared by every object of the release. */}}
{{- define "etl.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "etl.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Selector labels of one component: pass (dict "ctx" $ "component" "query"). */}}
{{- define "etl.selector" -}}
app.kubernetes.io/name: {{ .ctx.Chart.Name }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "etl.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "etl.databaseSecret" -}}
{{- .Values.database.existingSecret | default (printf "%s-database" (include "etl.fullname" .)) -}}
{{- end -}}

{{/* Environment every pod gets: the database URL from the Secret, the sources file, logs, traces. */}}
{{- define "etl.env" -}}
- name: DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "etl.databaseSecret" . }}
      key: {{ .Values.database.existingSecretKey }}
{{ include "etl.databaseTlsEnv" . }}
- name: DATABASE_POOL_MAX_SIZE
  value: {{ .Values.database.poolMaxSize | quote }}
- name: SOURCES_FILE
  value: /etc/etl/sources.toml
- name: RUST_LOG
  value: {{ .Values.logLevel | quote }}
- name: LOG_FORMAT
  value: {{ .Values.logFormat | quote }}
{{- if .Values.otel.endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ .Values.otel.endpoint | quote }}
- name: OTEL_EXPORTER_OTLP_PROTOCOL
  value: {{ .Values.otel.protocol | quote }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* TLS to Postgres: PGSSLMODE and PGSSLROOTCERT (the mounted CA), when set. */}}
{{- define "etl.databaseTlsEnv" -}}
{{- with .Values.database.sslmode }}
- name: PGSSLMODE
  value: {{ . | quote }}
{{- end }}
{{- if include "etl.caCert" . }}
- name: PGSSLROOTCERT
  value: /etc/etl-postgres-ca/{{ .Values.database.caCert.key }}
{{- end }}
{{- end -}}

{{/* Non-empty when a CA certificate for Postgres is configured. */}}
{{- define "etl.caCert" -}}
{{- if or .Values.database.caCert.secretName .Values.database.caCert.configMapName -}}
yes
{{- end -}}
{{- end -}}

{{/* Non-root always; the uid and gid only when set (OpenShift assigns its own: set both null). */}}
{{- define "etl.podSecurity" -}}
securityContext:
  runAsNonRoot: true
  {{- with .Values.podSecurityContext.runAsUser }}
  runAsUser: {{ . }}
  {{- end }}
  {{- with .Values.podSecurityContext.runAsGroup }}
  runAsGroup: {{ . }}
  {{- end }}
  seccompProfile:
    type: RuntimeDefault
{{- end -}}

{{- define "etl.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- .Values.serviceAccount.name | default (include "etl.fullname" .) -}}
{{- else -}}
{{- .Values.serviceAccount.name | default "default" -}}
{{- end -}}
{{- end -}}

{{/* What every pod spec shares: the service account (no API token: nothing here calls the
Kubernetes API), pull secrets, scheduling and security. Pass (dict "ctx" $ "component" "query");
a spread constraint without a labelSelector gets the component's. The migration hook runs
before the chart's own account exists: it takes the namespace's default account, or the
existing one named when the chart makes none. */}}
{{- define "etl.podSpec" -}}
{{- $ := .ctx -}}
{{- $selector := include "etl.selector" . | fromYaml -}}
{{- if and (eq .component "migrate") $.Values.serviceAccount.create }}
serviceAccountName: default
{{- else }}
serviceAccountName: {{ include "etl.serviceAccountName" $ }}
{{- end }}
automountServiceAccountToken: false
{{- with $.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $.Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $.Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $.Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $.Values.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- range . }}
  - {{- toYaml (merge (dict) . (dict "labelSelector" (dict "matchLabels" $selector))) | nindent 4 }}
  {{- end }}
{{- end }}
{{ include "etl.podSecurity" $ }}
{{- end -}}

{{/* The pod template's annotations: podAnnotations, and the sources checksum when asked
(pods that read the sources file roll when it changes). Pass (dict "ctx" $ "sources" true). */}}
{{- define "etl.podAnnotations" -}}
{{- $annotations := dict -}}
{{- if .sources -}}
{{- $_ := set $annotations "checksum/sources" (.ctx.Values.sources | sha256sum) -}}
{{- end -}}
{{- $annotations = merge $annotations .ctx.Values.podAnnotations -}}
{{- with $annotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "etl.containerSecurity" -}}
securityContext:
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities:
    drop: ["ALL"]
{{- end -}}

{{/* The sources file, and the Postgres CA when configured. */}}
{{- define "etl.volumes" -}}
volumes:
  - name: sources
    configMap:
      name: {{ include "etl.fullname" . }}-sources
{{- include "etl.caVolume" . }}
{{- end -}}

{{- define "etl.volumeMounts" -}}
volumeMounts:
  - name: sources
    mountPath: /etc/etl
    readOnly: true
{{- include "etl.caMount" . }}
{{- end -}}

{{/* The ingester's /tmp, where large REST pages are spooled (the root filesystem is read-only). */}}
{{- define "etl.spoolVolume" -}}
- name: spool
  emptyDir:
    sizeLimit: {{ .Values.ingester.spoolSizeLimit }}
{{- end -}}

{{- define "etl.spoolMount" -}}
- name: spool
  mountPath: /tmp
{{- end -}}

{{- define "etl.caVolume" -}}
{{- with .Values.database.caCert }}
{{- if .secretName }}
  - name: postgres-ca
    secret:
      secretName: {{ .secretName }}
{{- else if .configMapName }}
  - name: postgres-ca
    configMap:
      name: {{ .configMapName }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "etl.caMount" -}}
{{- if include "etl.caCert" . }}
  - name: postgres-ca
    mountPath: /etc/etl-postgres-ca
    readOnly: true
{{- end }}
{{- end -}}

{{/* Liveness and readiness probes on a port's /health/live and /health/ready: pass
(dict "port" "admin") or (dict "port" "http" "scheme" "HTTPS"). */}}
{{- define "etl.probes" -}}
livenessProbe:
  httpGet: {path: /health/live, port: {{ .port }}, scheme: {{ .scheme | default "HTTP" }}}
  periodSeconds: 10
  failureThreshold: 3
readinessProbe:
  httpGet: {path: /health/ready, port: {{ .port }}, scheme: {{ .scheme | default "HTTP" }}}
  periodSeconds: 5
  failureThreshold: 2
{{- end -}}
