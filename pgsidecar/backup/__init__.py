"""Data protection on pgBackRest: a cluster's backup settings and the operations the agent and
the CLI run (archiving, stanza, backup, info, restore, expire)."""

from pgsidecar.backup.pgbackrest import (
    ArchiveRange,
    BackupError,
    BackupSet,
    PgBackRest,
    PgInstance,
    RecoveryTarget,
    StanzaInfo,
    parse_info,
)
from pgsidecar.backup.settings import (
    BackupSettings,
    BackupSettingsError,
    PosixRepository,
    Retention,
    S3Repository,
    Schedule,
)

__all__ = [
    "ArchiveRange",
    "BackupError",
    "BackupSet",
    "BackupSettings",
    "BackupSettingsError",
    "PgBackRest",
    "PgInstance",
    "PosixRepository",
    "RecoveryTarget",
    "Retention",
    "S3Repository",
    "Schedule",
    "StanzaInfo",
    "parse_info",
]
