"""Inputs and outputs of the agent: the DCS backends (events.dcs), the record sinks (journal,
Kafka), and Kubernetes pod events. Everything that talks to the outside world lives here or in
pgsidecar/; the decision core (fsm/) does no I/O."""
