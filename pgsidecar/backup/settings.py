"""A cluster's backup settings: where the pgBackRest repository is, what it keeps, how it compresses,
and when backups run.

The style of pgsidecar/config.py: unknown fields are refused, a bad value names the field. Secrets
(an S3 key and secret) are never values in this model: it holds the paths of the files that hold
them, so the model can be printed, logged and put in a record as it is. The files are read only when
pgbackrest.conf is rendered (``S3Repository.read_credentials``).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Literal

from cronsim import CronSim, CronSimError
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

BackupType = Literal["full", "diff", "incr"]

# a bucket, region or endpoint is written as one pgbackrest.conf line: no spaces, no '=' tricks
_TOKEN_RE = r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$"
_INTERVAL_RE = re.compile(r"^\s*(\d+)\s*(s|m|h|d)\s*$")
_INTERVAL_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# the shortest interval a schedule and its grace take
_MIN_INTERVAL = timedelta(minutes=1)


class BackupSettingsError(Exception):
    """A backup setting cannot be used (a credentials file that cannot be read, ...)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PosixRepository(_Strict):
    """A repository on a file system the members can all write (a local path, NFS, a volume)."""

    type: Literal["posix"] = "posix"
    path: Path

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        if not value.is_absolute():
            raise ValueError(f"must be an absolute path, not {str(value)!r}")
        return value


class S3Credentials(_Strict):
    """The access key and secret, read from their files (each file holds the value alone)."""

    key: str
    secret: str

    def __repr__(self) -> str:  # never print the values, whatever prints this object
        return "S3Credentials(key=****, secret=****)"

    __str__ = __repr__


class S3Repository(_Strict):
    """An S3-compatible bucket. The access key and secret come from files (a Kubernetes Secret
    mounted as files, a 0600 file on a VM): never inline in the config."""

    type: Literal["s3"] = "s3"
    bucket: str = Field(pattern=_TOKEN_RE)
    endpoint: str = Field(pattern=_TOKEN_RE)
    region: str = Field(pattern=_TOKEN_RE)
    key_file: Path
    secret_file: Path
    # where the repository lives inside the bucket
    path: str = Field(default="/pgbackrest", pattern=r"^/[A-Za-z0-9._/-]*$")
    # "path" for MinIO-like servers that do not serve bucket names as host names
    uri_style: Literal["host", "path"] = "host"
    port: int | None = Field(default=None, ge=1, le=65535)
    verify_tls: bool = True
    ca_file: Path | None = None

    def read_credentials(self) -> S3Credentials:
        values = []
        for what, path in (("key_file", self.key_file), ("secret_file", self.secret_file)):
            try:
                value = path.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise BackupSettingsError(
                    f"cannot read backup.repository.{what} {path}: {exc.strerror}; "
                    f"fix the path or mount the Secret there"
                ) from None
            if not value or "\n" in value or "\r" in value:
                raise BackupSettingsError(
                    f"backup.repository.{what} {path} must hold one non-empty line"
                )
            values.append(value)
        return S3Credentials(key=values[0], secret=values[1])


class Retention(_Strict):
    """How many backups the repository keeps; WAL older than the oldest kept full backup goes
    with it (pgBackRest's expire)."""

    full: int = Field(default=2, ge=1, le=9999999)
    # differential backups kept (a diff also expires with its full); None: as many as full allows
    diff: int | None = Field(default=None, ge=1, le=9999999)


def parse_interval(text: str) -> timedelta | None:
    """'90s', '30m', '6h', '1d' -> timedelta; None if ``text`` is not an interval."""
    match = _INTERVAL_RE.match(text)
    if not match:
        return None
    return timedelta(seconds=int(match.group(1)) * _INTERVAL_UNITS[match.group(2)])


def _check_when(value: str | None) -> str | None:
    if value is None:
        return None
    interval = parse_interval(value)
    if interval is not None:
        if interval < _MIN_INTERVAL:
            raise ValueError(f"an interval of {value!r} is too short: at least 1m")
        return value.strip()
    try:
        CronSim(value, datetime(2000, 1, 1))
    except CronSimError as exc:
        raise ValueError(
            f"{value!r} is neither an interval ('6h', '30m', '1d') nor a cron expression "
            f"('0 3 * * 0' = Sundays 03:00 UTC): {exc}"
        ) from None
    return value.strip()


def _check_grace(value: str) -> str:
    interval = parse_interval(value)
    if interval is None or interval < _MIN_INTERVAL:
        raise ValueError(f"{value!r} is not an interval of at least 1m ('30m', '6h', '1d')")
    return value.strip()


# when a type of backup runs: an interval or a cron expression; None: that type is not scheduled
_When = Annotated[str | None, AfterValidator(_check_when)]
_Grace = Annotated[str, AfterValidator(_check_grace)]


class Schedule(_Strict):
    """When backups run, per type: a cron expression (5 fields, UTC) or an interval ('6h').
    Every member computes the same slots from the same settings (intervals count from the Unix
    epoch), so the agent can take each slot exactly once through the DCS."""

    full: _When = None
    diff: _When = None
    incr: _When = None
    # how long after its time a slot still runs when no member could take it then (all down):
    # the first member back takes it, once; an older missed slot is skipped
    grace: _Grace = "1h"

    @property
    def grace_period(self) -> timedelta:
        interval = parse_interval(self.grace)
        assert interval is not None  # checked by the validator
        return interval

    def kinds(self) -> list[BackupType]:
        """The scheduled types, the one that covers the others first (full, diff, incr)."""
        return [k for k in ("full", "diff", "incr") if getattr(self, k) is not None]

    @model_validator(mode="after")
    def _something(self) -> Schedule:
        if self.full is None and self.diff is None and self.incr is None:
            raise ValueError("a schedule names at least one of full, diff, incr")
        if self.full is None:
            raise ValueError(
                "a schedule without full backups never renews its base: set schedule.full"
            )
        return self

    def next_slot(self, kind: BackupType, after: datetime) -> datetime | None:
        """The first slot of ``kind`` strictly after ``after`` (aware, UTC), or None if that type
        is not scheduled."""
        return self._slot(kind, after, later=True)

    def last_slot(self, kind: BackupType, now: datetime) -> datetime | None:
        """The latest slot of ``kind`` at or before ``now`` (aware, UTC), or None if that type
        is not scheduled."""
        return self._slot(kind, now, later=False)

    def _slot(self, kind: BackupType, at: datetime, *, later: bool) -> datetime | None:
        when: str | None = getattr(self, kind)
        if when is None:
            return None
        at = at.astimezone(UTC)
        interval = parse_interval(when)
        if interval is not None:
            step = interval.total_seconds()
            n = (at - _EPOCH).total_seconds() // step + (1 if later else 0)
            return _EPOCH + timedelta(seconds=n * step)
        # cronsim works on naive datetimes here: it steps through UTC wall time
        naive = at.replace(tzinfo=None, microsecond=0)
        if later:
            slot: datetime = next(CronSim(when, naive))
        else:
            # cronsim's reverse walk yields times strictly before its start: start a second after
            slot = next(CronSim(when, naive + timedelta(seconds=1), reverse=True))
        return slot.replace(tzinfo=UTC)


class BackupSettings(_Strict):
    """The ``backup`` section of a member's config (the same on every member of a cluster)."""

    repository: PosixRepository | S3Repository = Field(discriminator="type")
    retention: Retention = Retention()
    compression: Literal["none", "gz", "bz2", "lz4", "zst"] = "lz4"
    compression_level: int | None = Field(default=None, ge=0, le=22)
    # parallel processes for backup and restore (pgBackRest's process-max)
    process_max: int = Field(default=1, ge=1, le=64)
    # start a backup with an immediate checkpoint rather than waiting for the next one
    start_fast: bool = True
    # how long a backup or check waits for the WAL it needs to reach the repository (seconds)
    archive_timeout: float = Field(default=60.0, gt=0, le=86400)
    schedule: Schedule | None = None

    @model_validator(mode="after")
    def _levels(self) -> BackupSettings:
        if self.compression_level is not None:
            top = {"none": 0, "gz": 9, "bz2": 9, "lz4": 12, "zst": 22}[self.compression]
            if self.compression_level > top:
                raise ValueError(
                    f"compression_level {self.compression_level} is out of range for "
                    f"{self.compression} (0..{top})"
                )
        return self


_STANZA_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
_LSN_PATTERN = r"^[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}$"


def check_restore_point_name(value: str) -> None:
    """A restore point's name as ``pg_create_restore_point`` takes it (at most 63 bytes), and
    one that can go into postgresql.auto.conf and a pgBackRest option unquoted: no quote, no
    line break. Raises ValueError saying which."""
    if not value.strip():
        raise ValueError("a restore point name cannot be empty")
    if len(value.encode()) > 63:
        raise ValueError("a restore point name has at most 63 bytes (PostgreSQL's limit)")
    if any(c in value for c in "'\\\n\r"):
        raise ValueError("a restore point name cannot hold a quote, a backslash or a line break")


class RecoveryTargetSettings(_Strict):
    """Where the restore of a new cluster stops replaying the source's WAL: exactly one of a
    time (with a time zone), an LSN, a transaction id or the name of a restore point
    (``pg_create_restore_point``). ``inclusive``: the target's own transaction (or the record
    at the LSN) is kept (true) or not (false); a restore point is a position, not a
    transaction, so it takes no ``inclusive: false``."""

    time: datetime | None = None
    lsn: str | None = Field(default=None, pattern=_LSN_PATTERN)
    xid: int | None = Field(default=None, ge=3)
    name: str | None = None
    inclusive: bool = True

    @field_validator("name")
    @classmethod
    def _restore_point(cls, value: str | None) -> str | None:
        if value is None:
            return value
        check_restore_point_name(value)
        return value

    @field_validator("time")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError(
                "a target time needs a time zone: write it like 2026-12-03T05:00:00Z or "
                "2026-12-03 05:00:00+00:00"
            )
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> RecoveryTargetSettings:
        given = [k for k in ("time", "lsn", "xid", "name") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "a target is exactly one of time, lsn, xid or name"
                + (f" (this one sets {' and '.join(given)})" if given else " (none is set)")
                + "; leave the target out to replay the whole archive"
            )
        if self.name is not None and not self.inclusive:
            raise ValueError(
                "inclusive: false does not apply to a restore point (name): recovery stops at "
                "the point itself; leave inclusive out"
            )
        return self


class BootstrapSettings(_Strict):
    """How the member that initialises a new cluster makes its data directory. ``initdb``: an
    empty database. ``pgbackrest``: restored from another cluster's pgBackRest ``repository``
    (its ``stanza``, the source cluster's name) up to ``target`` (without one: the whole
    archive), then promoted on a timeline of its own. The section only acts when the cluster
    is initialised; a member that joins an initialised cluster clones from its master."""

    method: Literal["initdb", "pgbackrest"] = "initdb"
    repository: PosixRepository | S3Repository | None = Field(default=None, discriminator="type")
    stanza: str | None = Field(default=None, pattern=_STANZA_PATTERN)
    target: RecoveryTargetSettings | None = None
    # parallel processes of the restore (pgBackRest's process-max)
    process_max: int = Field(default=1, ge=1, le=64)
    # how long pgBackRest may take to copy the backup into the data directory (seconds)
    restore_timeout: float = Field(default=6 * 3600.0, gt=0, le=7 * 86400)
    # how long PostgreSQL may take to replay the source's WAL to the target and promote
    recovery_timeout: float = Field(default=6 * 3600.0, gt=0, le=7 * 86400)

    @model_validator(mode="after")
    def _method_fields(self) -> BootstrapSettings:
        source = [k for k in ("repository", "stanza", "target") if getattr(self, k) is not None]
        if self.method == "initdb" and source:
            raise ValueError(
                f"method initdb takes no {', '.join(source)}: set method: pgbackrest to restore "
                f"from a repository, or remove them"
            )
        if self.method == "pgbackrest":
            missing = [k for k in ("repository", "stanza") if getattr(self, k) is None]
            if missing:
                raise ValueError(
                    f"method pgbackrest needs {' and '.join(missing)}: the source cluster's "
                    f"repository and its stanza (the source cluster's name)"
                )
        return self


def same_repository(a: PosixRepository | S3Repository, b: PosixRepository | S3Repository) -> bool:
    """Whether two repository settings name the same repository (a posix path, or an S3
    endpoint, bucket and path inside it)."""
    if isinstance(a, PosixRepository) and isinstance(b, PosixRepository):
        return a.path.resolve() == b.path.resolve()
    if isinstance(a, S3Repository) and isinstance(b, S3Repository):
        return (a.endpoint, a.bucket, a.path.rstrip("/") or "/") == (
            b.endpoint,
            b.bucket,
            b.path.rstrip("/") or "/",
        )
    return False
