"""Point-in-time recovery of a local cluster's first member from another cluster's pgBackRest
repository, before any agent starts (``pgsidecar local up --restore-from DIR --target-time TS``).

The work is the runtime's (pgsidecar/backup/pitr.py, which the agent's ``bootstrap`` section
uses too): the data directory is restored from the source's latest backup before the target,
PostgreSQL replays the source's archive up to the target with ``archive_mode=off`` and promotes
(a new timeline), and it is left stopped cleanly as a primary's data directory with nothing of
the recovery in it. The new cluster's agents then start as usual: the first member holds the
only data, the others clone from it once it leads; the new cluster archives into its own
repository.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from pgsidecar.backup.pitr import RecoveryError, RecoveryServer, RepositoryBootstrap
from pgsidecar.backup.settings import BootstrapSettings, PosixRepository, RecoveryTargetSettings


class PitrError(Exception):
    pass


class _Quiet:
    def info(self, *_: Any, **__: Any) -> None:
        return None

    warning = error = info


def restore_to_target(
    *,
    repository: Path,
    stanza: str,
    data_dir: Path,
    port: int,
    target: RecoveryTargetSettings,
    pg_bin: Path,
    pg_user: str | None,
    work_dir: Path,
    timeout: float = 600.0,
) -> None:
    """Restore ``data_dir`` (absent or empty) to ``target`` (a time, an LSN, a transaction id or
    a restore point) from ``stanza`` in ``repository``, recover and promote it, stop it. Raises
    PitrError with PostgreSQL's last log lines when the target cannot be reached (after the end
    of the archive, before the first backup, a restore point the archive does not hold)."""
    settings = BootstrapSettings(
        method="pgbackrest",
        repository=PosixRepository(path=repository),
        stanza=stanza,
        target=target,
        restore_timeout=timeout,
        recovery_timeout=timeout,
    )
    server = RecoveryServer(bin_dir=pg_bin, data_dir=data_dir, port=port, os_user=pg_user)
    try:
        asyncio.run(RepositoryBootstrap(settings, server, work_dir, _Quiet()).restore())
    except RecoveryError as exc:
        raise PitrError(str(exc)) from None
