"""Which servers a backup copies from: the master (pgBackRest starts and stops the backup
there) and, where one is at hand, a streaming replica to copy the files from (less load on the
master). Shared by ``pgsidecar backup`` and the agent's scheduled backups."""

from __future__ import annotations

from events.dcs import ClusterView
from pgsidecar.backup.pgbackrest import BackupError


def choose_source(view: ClusterView, local: set[str]) -> tuple[str, str | None]:
    """(master, replica to copy from or None). The replica is a streaming one whose config is
    at hand (the smallest name, so repeated runs pick the same one); raises BackupError when the
    master's server is not on this host (pgBackRest must reach it to start and stop the backup)."""
    if view.leader is None:
        raise BackupError("the cluster has no master now: a backup needs one")
    master = view.leader.name
    if master not in local:
        raise BackupError(
            f"the master {master} is not on this host (no config for it here): run "
            f"`pgsidecar backup --config` with the master's config, on its host"
        )
    replicas = sorted(
        name
        for name, m in view.members.items()
        if name != master
        and name in local
        and isinstance(m, dict)
        and m.get("role") == "replica"
        and m.get("running")
        and m.get("streaming")
    )
    return master, replicas[0] if replicas else None
