"""The real agent, built from its config: the DCS backend, PostgresControl, the fencing
Watchdog, the journal, log and Kafka sinks, the system clock, and the Kubernetes and Kafka peer
services. A test builds an Agent from in-memory ports instead (loop.Agent)."""

from __future__ import annotations

import functools
import os

import structlog
from prometheus_client import CollectorRegistry

from events.dcs.factory import create_dcs
from events.privatefiles import make_private_dir
from events.sinks import JournalSink, LogSink, Sink
from pgsidecar.agent.backups import ScheduledBackup, server_data_directory
from pgsidecar.agent.loop import Agent, Inbox, Services
from pgsidecar.agent.membership import KubernetesGlue
from pgsidecar.agent.ports import Ports, SystemClock
from pgsidecar.agent.recorder import Recorder, SeqStore
from pgsidecar.agent.sources import PeerFeed, watchdog_fired
from pgsidecar.backup.member import member_bootstrap, member_instance, member_pgbackrest
from pgsidecar.config import AgentConfig
from pgsidecar.postgres.control import PostgresControl
from pgsidecar.postgres.serverlog import ServerLogMetrics
from pgsidecar.procutil import os_user_ids
from pgsidecar.syncrep import ReplicationStats
from pgsidecar.watchdog import Watchdog

log = structlog.get_logger("pgsidecar.agent")


def build_agent(cfg: AgentConfig, extra_sinks: list[Sink] | None = None) -> Agent:
    clock = SystemClock()
    inbox = Inbox(clock)
    state_dir = cfg.state_dir
    # 0700: the journal, the spool and the passfile live here. Owned by PostgreSQL's OS user when
    # the agent runs as root, because PostgreSQL's tools read the passfile in it.
    make_private_dir(state_dir, owner=_postgres_owner(cfg))
    sinks: list[Sink] = [
        JournalSink(
            state_dir / "journal.jsonl", cfg.log_rotation.max_bytes, cfg.log_rotation.backups
        ),
        LogSink(log),
        *(extra_sinks or []),
    ]
    recorder = Recorder(cfg.cluster, cfg.name, SeqStore(state_dir / "state.json"), sinks, clock)
    # one registry for everything /metrics serves (the API's gauges and the Kafka sink's)
    registry = CollectorRegistry()
    peer_feed = None
    if cfg.kafka.bootstrap_servers:
        from events.kafka import KafkaSink

        # the spool drop is itself recorded (an action with our own seq)
        recorder.sinks.append(
            KafkaSink.from_settings(
                cfg.kafka,
                cfg.cluster,
                cfg.name,
                state_dir,
                on_drop=recorder.spool_dropped,
                registry=registry,
            )
        )
        peer_feed = PeerFeed(cfg.kafka, cfg.cluster, cfg.name, inbox.post)
    pg = PostgresControl(
        cfg.postgresql,
        state_dir,
        cfg.name,
        log,
        cluster=cfg.cluster,
        log_max_bytes=cfg.log_rotation.max_bytes,
        log_backups=cfg.log_rotation.backups,
    )
    registry.register(ServerLogMetrics(pg.server_log))
    watchdog = Watchdog(
        fence=pg.fence,
        on_fired=functools.partial(watchdog_fired, inbox.post_threadsafe),
        postmaster_pid=lambda: pg.postmaster_pid,
        state_dir=state_dir,
        device=cfg.fencing.device if cfg.fencing.mode != "off" else None,
        device_required=cfg.fencing.mode == "required",
        safety_margin=cfg.fencing.safety_margin,
        log_max_bytes=cfg.log_rotation.max_bytes,
        log_backups=cfg.log_rotation.backups,
    )

    async def replication_stats() -> ReplicationStats:
        # through PostgresControl's one connection path (timeouts, error mapping)
        state = await pg.replication_state()
        standbys = {n: (s.state, s.sync_state, s.flush_lsn) for n, s in state.standbys.items()}
        return standbys, state.flush_lsn

    ports = Ports(
        clock=clock,
        dcs=create_dcs(cfg.dcs, cfg.cluster),
        pg=pg,
        fence=watchdog,
        sinks=recorder.sinks,
        replication_stats=replication_stats,
    )
    kubernetes = None
    if cfg.kubernetes.enabled:
        kubernetes = KubernetesGlue(
            cfg.kubernetes, cfg.cluster, cfg.name, inbox.post, recorder.action_body
        )
    pgbackrest = member_pgbackrest(cfg, log)
    scheduled_backup = None
    if pgbackrest is not None and cfg.backup is not None and cfg.backup.schedule is not None:
        scheduled_backup = ScheduledBackup(
            pgbackrest,
            member_instance(cfg),
            cfg.name,
            functools.partial(server_data_directory, pg, pg.passfile),
        )
    services = Services(
        serve_api=bool(cfg.api.port),
        pgbackrest=pgbackrest,
        scheduled_backup=scheduled_backup,
        bootstrap=member_bootstrap(cfg, log),
        archiver_stats=pg.archiver_stats,
        metrics_registry=registry,
        peer_feed=peer_feed,
        kubernetes=kubernetes,
    )
    return Agent(cfg, ports, inbox=inbox, recorder=recorder, services=services)


def _postgres_owner(cfg: AgentConfig) -> tuple[int, int] | None:
    """(uid, gid) of PostgreSQL's OS user when the agent runs as root (PostgreSQL refuses root),
    else None: the agent's own user owns its state."""
    if os.geteuid() != 0:
        return None
    uid, gid = os_user_ids(cfg.postgresql.os_user or "postgres")
    return uid, gid
