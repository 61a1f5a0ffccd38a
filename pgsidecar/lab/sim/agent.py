"""The real agent in the simulator: ``agent_factory(member_name, ports)`` builds
``pgsidecar.agent.loop.Agent`` from a member's in-memory ports (its SimDCS client, SimPostgres,
SimClock, SimFence) with no REST API, no Kubernetes, no Kafka and no signal handlers.

What a real agent keeps in its state directory (state.json: the instance id and the reserved
seq block; the journal) is kept in memory per member's host, so a restarted agent finds it as a
restarted process would: :class:`MemberState` lives as long as the member's SimPostgres (a weak
mapping: nothing outlives the seed's run). Every record goes to the member's journal in memory;
when an incarnation ends (stopped or killed), its recorded inputs are replayed and must give its
recorded transitions (the explainability invariant).

Module-level and importable by reference: ``run_seeds``' worker processes import it.
"""

from __future__ import annotations

import logging
import weakref
from pathlib import Path
from typing import Any

import structlog

from events.sinks import Sink
from fsm.records import Record
from pgsidecar.agent.loop import Agent, Inbox
from pgsidecar.agent.ports import Ports
from pgsidecar.agent.recorder import Recorder, SeqStore
from pgsidecar.config import AgentConfig
from pgsidecar.lab.sim.cluster import MemberPorts
from pgsidecar.lab.sim.postgres import PORT, SimPostgres
from pgsidecar.replay import replay
from pgsidecar.syncrep import ReplicationStats


def quiet_logs() -> None:
    """The agent's log lines carry real time and cost more than the simulation itself: only
    errors of the harness matter here; the trace and the journal say what the agents did."""
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL),
        cache_logger_on_first_use=False,
    )


class MemorySeqStore(SeqStore):
    """The state file in memory: the same instance id and ever-growing seq for every
    incarnation on one member (the real one reserves blocks in state.json)."""

    def __init__(self, instance_id: str) -> None:  # no file: nothing of SeqStore's __init__
        self.path = Path("/sim/state.json")
        self.instance_id = instance_id
        self._next = 0
        self._reserved = 0

    def _reserve(self) -> None:
        self._reserved = self._next + 1_000_000_000


class JournalSink(Sink):
    """The member's journal, in memory: every record of every incarnation, in order."""

    def __init__(self, records: list[Record]) -> None:
        self.records = records

    def emit(self, record: Record) -> None:
        self.records.append(record)


class MemberState:
    """What survives an agent's restart on one member: its seqs and its journal."""

    def __init__(self, name: str) -> None:
        self.seqs = MemorySeqStore(f"sim-{name}")
        self.records: list[Record] = []
        self.replayed = 0  # records up to here already passed the replay check


_STATE: weakref.WeakKeyDictionary[SimPostgres, MemberState] = weakref.WeakKeyDictionary()


def member_state(pg: SimPostgres) -> MemberState:
    state = _STATE.get(pg)
    if state is None:
        state = _STATE[pg] = MemberState(pg.name)
    return state


def agent_config(name: str, ports: MemberPorts) -> AgentConfig:
    """The member's config: the cluster's settings, its address as the simulated network
    knows it (the member's name), no API, no Kafka, no Kubernetes, no watchdog device."""
    s = ports.settings
    return AgentConfig.model_validate(
        {
            "name": name,
            "cluster": s.cluster,
            "state_dir": f"/sim/{name}/state",
            "postgresql": {
                "data_dir": f"/sim/{name}/data",
                "listen": name,
                "connect_address": name,
                "port": PORT,
            },
            "cluster_settings": {
                "ttl": s.ttl,
                "synchronous_mode": s.synchronous_mode,
                "maximum_lag_on_failover": s.maximum_lag_on_failover,
                "clock_drift": s.clock_drift,
            },
        }
    )


class SimRealAgent:
    """One incarnation of the real agent on a member: ``run()`` and ``request_stop()`` as the
    harness expects; the replay check when the incarnation ends."""

    def __init__(self, name: str, ports: MemberPorts) -> None:
        quiet_logs()
        self.name = name
        self.ports = ports
        self.state = member_state(ports.postgres)
        cfg = agent_config(name, ports)
        pg = ports.postgres

        async def replication_stats() -> ReplicationStats:
            return await pg.replication_status()

        sinks: list[Sink] = [JournalSink(self.state.records)]
        agent_ports = Ports(
            clock=ports.clock,
            dcs=ports.dcs,
            pg=pg,
            fence=ports.fence,
            sinks=sinks,
            replication_stats=replication_stats,
        )
        inbox = Inbox(ports.clock)
        recorder = Recorder(cfg.cluster, name, self.state.seqs, sinks, ports.clock)
        self.agent = Agent(cfg, agent_ports, inbox=inbox, recorder=recorder, handle_signals=False)
        # the fence hook fires on the loop's thread (the real one posts from its own thread)
        ports.fence.on_fired = lambda: inbox.post("lease", held=False, term=None)

    async def run(self) -> None:
        try:
            await self.agent.run()
        finally:
            self.check_replay()

    def request_stop(self) -> None:
        self.agent.request_stop()

    def check_replay(self) -> None:
        """Explainability: the member's recorded inputs replay to its recorded transitions."""
        records = self.state.records
        checked = self.state.replayed
        if len(records) == checked:
            return
        self.state.replayed = len(records)
        result = replay(records[unchecked_run(records, checked) :], self.name)
        if not result.ok:
            first = result.divergences[0]
            self.ports.violation(
                "explainability", f"{self.name}: replay diverges {first.describe()}"
            )


def unchecked_run(records: list[Record], checked: int) -> int:
    """Where the replay check of ``records`` may start when those before ``checked`` have
    passed it: at the ``start`` input of the first run not yet checked, if nothing the replay
    compares (an input, a transition) lies between ``checked`` and it; otherwise at the
    beginning. Replay resets its machine at every ``start``, and a check that passed left
    nothing pending, so the verdict is the one a replay of the whole journal gives, at the
    cost of the new run alone rather than of every run of the member so far."""
    for index in range(checked, len(records)):
        rec = records[index]
        if rec.kind == "input" and rec.body.get("type") == "start":
            return index
        if rec.kind != "action":
            return 0
    return 0


def agent_factory(member_name: str, ports: MemberPorts) -> Any:
    """The real agent for ``run_seeds`` and ``SimCluster`` (importable by reference)."""
    return SimRealAgent(member_name, ports)
