"""pgBackRest for one member, from its agent config: the same stanza (the cluster's name), the
same files (state_dir/pgbackrest/) whether the agent or the CLI builds it; and the restore of a
new cluster's data from another cluster's repository (the bootstrap section), whose files are
under state_dir/bootstrap/."""

from __future__ import annotations

from typing import Any

from pgsidecar.backup.pgbackrest import PgBackRest, PgInstance
from pgsidecar.backup.pitr import RecoveryServer, RepositoryBootstrap
from pgsidecar.config import AgentConfig
from pgsidecar.postgres.conf import local_host


def member_instance(cfg: AgentConfig) -> PgInstance:
    """The member's own PostgreSQL as pgBackRest reaches it (the agent's local address)."""
    pg = cfg.postgresql
    return PgInstance(
        data_dir=pg.data_dir,
        port=pg.port,
        host=local_host(pg.listen),
        user=pg.superuser.username,
    )


def member_pgbackrest(cfg: AgentConfig, log: Any) -> PgBackRest | None:
    """The member's PgBackRest, or None when its config has no backup section."""
    if cfg.backup is None:
        return None
    return PgBackRest(
        cfg.backup,
        cfg.cluster,
        member_instance(cfg),
        state_dir=cfg.state_dir,
        os_user=cfg.postgresql.os_user,
        # the agent writes it at start (PostgresControl.write_passfile)
        passfile=cfg.state_dir / "pgpass",
        log=log,
    )


def member_bootstrap(cfg: AgentConfig, log: Any) -> RepositoryBootstrap | None:
    """The restore the member runs if it initialises the cluster, or None when the bootstrap
    section's method is initdb. The recovery's server listens on the member's local address
    and port (nothing connects to it)."""
    if cfg.bootstrap.method != "pgbackrest":
        return None
    pg = cfg.postgresql
    server = RecoveryServer(
        bin_dir=pg.bin_dir,
        data_dir=pg.data_dir,
        port=pg.port,
        listen=local_host(pg.listen),
        os_user=pg.os_user,
    )
    return RepositoryBootstrap(cfg.bootstrap, server, cfg.state_dir / "bootstrap", log)
