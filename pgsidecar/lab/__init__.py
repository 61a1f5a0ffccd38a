"""The lab: local clusters, fault injection and chaos, benchmarks, the workload (writer, prober),
network namespaces, the HAProxy helper, the Kafka broker launcher and the deterministic
simulator (``sim``).

Tools for trying, testing and measuring pgsidecar, never part of the running agent: nothing in
fsm/, events/ or the agent's runtime imports this package, and the CLI imports it only for the
commands that need it (``local``, ``bench``, ``chaos``, ``--dir`` of a local cluster).
tests/unit/test_layers.py checks both.
"""
