# The pgsidecar agents' token (deploy/consul/acl-bootstrap.sh). Only what events/dcs/consul.py
# does for the cluster "pg" with dcs.prefix "pgsidecar":
#   - read and write the cluster's keys (leader, members, config, switchover, sync, ...);
#   - create, renew and destroy sessions: a session belongs to the node of the server that
#     answered, and the servers' node names are their pod names;
#   - register the cluster's service, if dcs.consul.register_service is turned on.
# Nothing else: no other key, no ACL, operator, agent or node write.
key_prefix "pgsidecar/pg/" {
  policy = "write"
}
session_prefix "consul-server-" {
  policy = "write"
}
service "pg" {
  policy = "write"
}
