#!/bin/sh
# Turn on the Consul ACL system of deploy/consul, once, after its servers are up:
#     deploy/consul/acl-bootstrap.sh [namespace]
# 1. bootstraps ACLs; the management token goes into the Secret consul-bootstrap-token (keep it
#    for administration, or move it to your vault and delete the Secret);
# 2. gives each server its agent token (policy acl/server-agent.hcl);
# 3. creates the pgsidecar agents' policy (acl/pgsidecar.hcl) and token, and stores the token as
#    key consul-token of the Secret pg-secrets, which deploy/kubernetes mounts.
# Tokens travel on stdin or in files readable by you only, never on a command line of your
# machine. Consul refuses a second bootstrap: after a failure half-way, see deploy/README.md.
set -eu
NS="${1:-pgsidecar}"
HERE="$(cd "$(dirname "$0")" && pwd)"
SERVERS="consul-server-0 consul-server-1 consul-server-2"
umask 077
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

secret_id() { awk '$1 == "SecretID:" { print $2 }'; }

# consul_run TOKEN_FILE SERVER ARGS...: the consul CLI in SERVER, the token passed on stdin
consul_run() {
  token_file="$1"
  server="$2"
  shift 2
  kubectl -n "$NS" exec -i "$server" -- \
    sh -ec 'CONSUL_HTTP_TOKEN="$(cat)" exec consul "$@"' consul "$@" < "$token_file"
}

# copy_policy FILE: into server 0's /tmp, for `-rules @FILE`
copy_policy() {
  kubectl -n "$NS" exec -i consul-server-0 -- sh -ec "cat > /tmp/$(basename "$1")" < "$1"
}

kubectl -n "$NS" exec consul-server-0 -- consul acl bootstrap | secret_id > "$WORK/management"
test -s "$WORK/management"
kubectl -n "$NS" create secret generic consul-bootstrap-token \
  --from-file=token="$WORK/management"

copy_policy "$HERE/acl/server-agent.hcl"
consul_run "$WORK/management" consul-server-0 \
  acl policy create -name consul-server-agent -rules @/tmp/server-agent.hcl
consul_run "$WORK/management" consul-server-0 \
  acl token create -description "Consul servers' agent token" -policy-name consul-server-agent \
  | secret_id > "$WORK/agent"
test -s "$WORK/agent"
for server in $SERVERS; do
  # set-agent-token takes the token as an argument: it appears only inside the server's container
  cat "$WORK/management" "$WORK/agent" | kubectl -n "$NS" exec -i "$server" -- sh -ec \
    'read -r m; read -r a || true; CONSUL_HTTP_TOKEN="$m" consul acl set-agent-token agent "$a"'
done

copy_policy "$HERE/acl/pgsidecar.hcl"
consul_run "$WORK/management" consul-server-0 \
  acl policy create -name pgsidecar-pg -rules @/tmp/pgsidecar.hcl
consul_run "$WORK/management" consul-server-0 \
  acl token create -description "pgsidecar agents of cluster pg" -policy-name pgsidecar-pg \
  | secret_id > "$WORK/pgsidecar"
test -s "$WORK/pgsidecar"
printf '{"stringData":{"consul-token":"%s"}}' "$(cat "$WORK/pgsidecar")" > "$WORK/patch.json"
kubectl -n "$NS" patch secret pg-secrets --type merge --patch-file "$WORK/patch.json"
echo "Consul ACLs are on; the agents' token is in Secret pg-secrets, key consul-token"
