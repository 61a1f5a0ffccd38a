{{/* The cluster's name: clusterName, or the release name. */}}
{{- define "pgsidecar.cluster" -}}
{{- .Values.clusterName | default .Release.Name -}}
{{- end -}}

{{/* The labels every member carries and every selector uses (as in deploy/kubernetes). */}}
{{- define "pgsidecar.selectorLabels" -}}
app.kubernetes.io/name: pgsidecar
app.kubernetes.io/instance: {{ include "pgsidecar.cluster" . }}
{{- end -}}

{{/* Object labels: the selector labels plus Helm's bookkeeping. */}}
{{- define "pgsidecar.labels" -}}
{{ include "pgsidecar.selectorLabels" . }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "pgsidecar.image" -}}
{{- if .digest -}}
{{ .repository }}:{{ .tag }}@{{ .digest }}
{{- else -}}
{{ .repository }}:{{ .tag }}
{{- end -}}
{{- end -}}

{{/* The agent's configuration file (schema: pgsidecar/config.py, AgentConfig). What differs
from pod to pod comes from the environment (statefulset.yaml); secrets are files. */}}
{{- define "pgsidecar.agentConfig" -}}
{{- $cluster := include "pgsidecar.cluster" . -}}
cluster: {{ $cluster }}
state_dir: /var/lib/postgresql/data/agent
postgresql:
  bin_dir: /usr/lib/postgresql/15/bin
  data_dir: /var/lib/postgresql/data/pgdata
  listen: 0.0.0.0
  port: 5432
  superuser:
    username: postgres
    password_file: /etc/pgsidecar-secrets/superuser-password
  replication:
    username: replicator
    password_file: /etc/pgsidecar-secrets/replication-password
{{- if .Values.exporter.enabled }}
  monitoring:
    username: {{ .Values.exporter.username }}
    password_file: /etc/pgsidecar-secrets/monitor-password
{{- end }}
  hba_networks: ["0.0.0.0/0", "::/0"]
  parameters:
    {{- toYaml .Values.postgresql.parameters | nindent 4 }}
  stop_timeout: 30
  log_destination: stderr
log_rotation:
  max_bytes: 67108864
  backups: 4
dcs:
  type: {{ .Values.dcs.type }}
  prefix: {{ .Values.dcs.prefix }}
{{- if eq .Values.dcs.type "consul" }}
  consul:
    url: {{ .Values.dcs.consul.url }}
    ca_cert: /etc/pgsidecar-consul/ca.pem
    token_file: /etc/pgsidecar-secrets/consul-token
    register_service: false
{{- else if eq .Values.dcs.type "etcd" }}
{{- if not .Values.dcs.etcd.endpoints }}
{{- fail "dcs.etcd.endpoints: list the etcd members' client URLs" }}
{{- end }}
  etcd:
    endpoints:
      {{- toYaml .Values.dcs.etcd.endpoints | nindent 6 }}
{{- else }}
{{- fail "dcs.type must be consul or etcd" }}
{{- end }}
settings:
  {{- toYaml .Values.settings | nindent 2 }}
api:
  listen: 0.0.0.0
  port: 8008
  token_file: /etc/pgsidecar-secrets/api-token
kafka:
  bootstrap_servers: {{ .Values.kafka.bootstrapServers | toJson }}
  partitions: {{ .Values.kafka.partitions }}
kubernetes:
  enabled: true
  label_selector: app.kubernetes.io/name=pgsidecar,app.kubernetes.io/instance={{ $cluster }}
  kill_unhealthy_pods: false
  unhealthy_pod_timeout: 300
  pod_kill_interval: 600
{{- end -}}

{{/* pgbouncer.ini: every database to the master's Service; SCRAM with the users of the auth
Secret; TCP only (no socket directory on a read-only root); logs to stderr. */}}
{{- define "pgsidecar.pgbouncerIni" -}}
[databases]
* = host={{ include "pgsidecar.cluster" . }}-primary.{{ .Release.Namespace }}.svc port=5432

[pgbouncer]
listen_addr = 0.0.0.0
listen_port = 6432
unix_socket_dir =
auth_type = scram-sha-256
auth_file = /etc/pgbouncer-auth/userlist.txt
pool_mode = {{ .Values.pgbouncer.poolMode }}
max_client_conn = {{ .Values.pgbouncer.maxClientConn }}
default_pool_size = {{ .Values.pgbouncer.defaultPoolSize }}
; a failover: give up on a dead master's address quickly and retry soon
server_connect_timeout = 5
server_login_retry = 1
server_check_query = select 1
server_check_delay = 10
ignore_startup_parameters = extra_float_digits
{{- end -}}
