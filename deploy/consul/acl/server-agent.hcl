# The Consul servers' own agent token: each server registers its node and reads the catalog
# (anti-entropy). Node names are the pod names (statefulset.yaml, -node).
node_prefix "consul-server-" {
  policy = "write"
}
service_prefix "" {
  policy = "read"
}
