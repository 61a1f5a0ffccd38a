"""pgsidecar.backup without running pgBackRest: settings validation, pgbackrest.conf rendering, the
quoting of archive_command/restore_command, the options each operation passes, info parsing, and
that secrets stay out of logs, records and errors."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import stat
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from pgsidecar.backup import (
    BackupError,
    BackupSettings,
    BackupSettingsError,
    PgBackRest,
    PgInstance,
    RecoveryTarget,
    Schedule,
    parse_info,
)
from tests.support.pgtestutil import RecordingLog, make_root

KEY = "AKIAEXAMPLEKEY0001"
SECRET = "s3cr3t/with+chars=="

# `pgbackrest info --output=json` from pgBackRest 2.45 after a full and a diff backup
INFO_JSON = json.dumps(
    [
        {
            "archive": [
                {
                    "database": {"id": 1, "repo-key": 1},
                    "id": "15-1",
                    "max": "000000010000000000000005",
                    "min": "000000010000000000000001",
                }
            ],
            "backup": [
                {
                    "archive": {
                        "start": "000000010000000000000003",
                        "stop": "000000010000000000000003",
                    },
                    "backrest": {"format": 5, "version": "2.45"},
                    "database": {"id": 1, "repo-key": 1},
                    "error": False,
                    "info": {
                        "delta": 22967556,
                        "repository": {"delta": 4520304, "size": 4520304},
                        "size": 22967556,
                    },
                    "label": "20261203-103054F",
                    "lsn": {"start": "0/3000028", "stop": "0/3000100"},
                    "prior": None,
                    "reference": None,
                    "timestamp": {"start": 1796293854, "stop": 1796293859},
                    "type": "full",
                },
                {
                    "archive": {
                        "start": "000000010000000000000005",
                        "stop": "000000010000000000000005",
                    },
                    "backrest": {"format": 5, "version": "2.45"},
                    "database": {"id": 1, "repo-key": 1},
                    "error": False,
                    "info": {
                        "delta": 598282,
                        "repository": {"delta": 83336, "size": 4520311},
                        "size": 22967556,
                    },
                    "label": "20261203-103054F_20261203-103100D",
                    "lsn": {"start": "0/5000028", "stop": "0/5000100"},
                    "prior": "20261203-103054F",
                    "reference": ["20261203-103054F"],
                    "timestamp": {"start": 1796293860, "stop": 1796293861},
                    "type": "diff",
                },
            ],
            "cipher": "none",
            "db": [{"id": 1, "repo-key": 1, "system-id": 7715023328020171572, "version": "15"}],
            "name": "main",
            "repo": [{"cipher": "none", "key": 1, "status": {"code": 0, "message": "ok"}}],
            "status": {"code": 0, "lock": {"backup": {"held": False}}, "message": "ok"},
        }
    ]
)


@pytest.fixture
def root() -> Iterator[Path]:
    path = make_root()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def s3_settings(root: Path, **kw: Any) -> BackupSettings:
    (root / "key").write_text(KEY + "\n")
    (root / "secret").write_text(SECRET + "\n")
    repo = {
        "type": "s3",
        "bucket": "pg-backups",
        "endpoint": "s3.example.test",
        "region": "eu-west-1",
        "key_file": str(root / "key"),
        "secret_file": str(root / "secret"),
    }
    return BackupSettings.model_validate({"repository": repo, **kw})


def posix_settings(root: Path, **kw: Any) -> BackupSettings:
    return BackupSettings.model_validate(
        {"repository": {"type": "posix", "path": str(root / "repo")}, **kw}
    )


def member(settings: BackupSettings, root: Path, log: Any = None) -> PgBackRest:
    return PgBackRest(
        settings,
        "main",
        PgInstance(data_dir=root / "m1" / "data", port=5433),
        state_dir=root / "m1" / "state",
        os_user="postgres",
        passfile=root / "m1" / "state" / "pgpass",
        log=log or RecordingLog(),
    )


def conf_dict(text: str) -> dict[str, dict[str, str]]:
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, value = line.split("=", 1)
        assert key not in current, f"{key} twice"
        current[key] = value
    return sections


def validation_messages(data: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as err:
        BackupSettings.model_validate(data)
    return "\n".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.value.errors())


# ----------------------------------------------------------------------------- settings


def test_defaults_and_a_full_posix_config(root: Path) -> None:
    s = posix_settings(root)
    assert s.retention.full == 2 and s.retention.diff is None
    assert s.compression == "lz4" and s.process_max == 1 and s.schedule is None

    br = member(
        posix_settings(
            root,
            retention={"full": 3, "diff": 4},
            compression="zst",
            compression_level=5,
            process_max=4,
            archive_timeout=90,
        ),
        root,
    )
    conf = conf_dict(br.render_config())
    state = root / "m1" / "state" / "pgbackrest"
    assert conf["global"] == {
        "repo1-type": "posix",
        "repo1-path": str(root / "repo"),
        "repo1-retention-full-type": "count",
        "repo1-retention-full": "3",
        "repo1-retention-diff": "4",
        "compress-type": "zst",
        "compress-level": "5",
        "process-max": "4",
        "start-fast": "y",
        "archive-timeout": "90",
        "log-path": str(state / "log"),
        "lock-path": str(state / "lock"),
        "spool-path": str(state / "spool"),
        "log-level-file": "info",
        "log-level-console": "off",
        "log-level-stderr": "error",
    }
    assert conf["main"] == {
        "pg1-path": str(root / "m1" / "data"),
        "pg1-port": "5433",
        "pg1-user": "postgres",
    }


def test_a_socket_directory_host_becomes_pg1_socket_path(root: Path) -> None:
    br = PgBackRest(
        posix_settings(root),
        "main",
        PgInstance(data_dir=Path("/d"), port=5432, host="/run/postgresql", user="admin"),
        state_dir=root / "state",
        log=RecordingLog(),
    )
    assert conf_dict(br.render_config())["main"] == {
        "pg1-path": "/d",
        "pg1-port": "5432",
        "pg1-user": "admin",
        "pg1-socket-path": "/run/postgresql",
    }


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({}, "repository: Field required"),
        ({"repository": {"type": "nfs", "path": "/x"}}, "repository: Input tag 'nfs'"),
        ({"repository": {"type": "posix", "path": "repo"}}, "must be an absolute path"),
        ({"repository": {"type": "posix", "path": "/r"}, "retention": {"full": 0}}, "full"),
        ({"repository": {"type": "posix", "path": "/r"}, "compression": "xz"}, "compression"),
        ({"repository": {"type": "posix", "path": "/r"}, "process_max": 0}, "process_max"),
        ({"repository": {"type": "posix", "path": "/r"}, "retain": 3}, "Extra inputs"),
        (
            {
                "repository": {"type": "posix", "path": "/r"},
                "compression": "gz",
                "compression_level": 12,
            },
            "out of range for gz (0..9)",
        ),
        (
            {"repository": {"type": "posix", "path": "/r"}, "schedule": {"full": "61 * * * *"}},
            "is neither an interval",
        ),
        (
            {"repository": {"type": "posix", "path": "/r"}, "schedule": {"full": "30s"}},
            "too short",
        ),
        (
            {"repository": {"type": "posix", "path": "/r"}, "schedule": {"incr": "1h"}},
            "set schedule.full",
        ),
        (
            {
                "repository": {"type": "posix", "path": "/r"},
                "schedule": {"full": "1d", "weekly": "1d"},
            },
            "schedule.weekly: Extra inputs",
        ),
    ],
)
def test_settings_errors_name_the_field(data: dict[str, Any], expected: str) -> None:
    assert expected in validation_messages(data)


def test_s3_secrets_are_files_never_inline() -> None:
    base = {
        "type": "s3",
        "bucket": "b",
        "endpoint": "e",
        "region": "r",
        "key_file": "/k",
        "secret_file": "/s",
    }
    for inline in ({"key": KEY}, {"secret": SECRET}, {"key_secret": SECRET}):
        msgs = validation_messages({"repository": {**base, **inline}})
        assert "Extra inputs are not permitted" in msgs
        assert KEY not in msgs and SECRET not in msgs
    msgs = validation_messages({"repository": {**base, "bucket": "b c=d"}})
    assert "repository.s3.bucket" in msgs


def test_unreadable_credentials_file_is_a_clear_error(root: Path) -> None:
    s = s3_settings(root)
    os.unlink(root / "secret")
    with pytest.raises(BackupSettingsError, match=r"backup.repository.secret_file .*secret"):
        member(s, root).render_config()


def test_schedule_slots_are_the_same_on_every_member() -> None:
    sched = Schedule(full="0 3 * * 0", diff="6h")
    after = datetime(2026, 12, 3, 10, 15, 30, tzinfo=UTC)  # a Thursday
    assert sched.next_slot("full", after) == datetime(2026, 12, 6, 3, 0, tzinfo=UTC)
    # intervals count from the Unix epoch: 12:00 UTC is the next 6-hour boundary
    assert sched.next_slot("diff", after) == datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
    # strictly after: a slot's own time gives the next one
    assert sched.next_slot("diff", datetime(2026, 12, 3, 12, 0, tzinfo=UTC)) == datetime(
        2026, 12, 3, 18, 0, tzinfo=UTC
    )
    assert sched.next_slot("incr", after) is None


# ----------------------------------------------------------------------------- commands


def test_archive_and_restore_commands_quote_paths() -> None:
    # a state dir with a space, a quote and a '%' (PostgreSQL's placeholder character)
    state = Path("/var/lib/pg sidecar/it's 100%")
    br = PgBackRest(
        BackupSettings.model_validate({"repository": {"type": "posix", "path": "/r"}}),
        "main",
        PgInstance(data_dir=Path("/d"), port=5432),
        state_dir=state,
        log=RecordingLog(),
    )
    config = f"--config={state}/pgbackrest/pgbackrest.conf"
    # PostgreSQL turns %% into % and %p/%f into the file, then hands the line to /bin/sh
    archive = br.archive_command().replace("%p", "pg_wal/000000010000000000000003")
    assert shlex.split(archive.replace("%%", "%")) == [
        "/usr/bin/pgbackrest",
        config,
        "--stanza=main",
        "archive-push",
        "pg_wal/000000010000000000000003",
    ]
    restore = (
        br.restore_command()
        .replace("%f", "00000002.history")
        .replace("%p", "pg_wal/RECOVERYHISTORY")
    )
    assert shlex.split(restore.replace("%%", "%")) == [
        "/usr/bin/pgbackrest",
        config,
        "--stanza=main",
        "archive-get",
        "00000002.history",
        "pg_wal/RECOVERYHISTORY",
    ]
    assert "100%%" in br.archive_command()
    plain = member(posix_settings(Path("/r")), Path("/srv"))
    assert plain.archive_command() == (
        "/usr/bin/pgbackrest --config=/srv/m1/state/pgbackrest/pgbackrest.conf --stanza=main "
        "archive-push %p"
    )
    assert plain.restore_command().endswith(' --stanza=main archive-get %f "%p"')
    assert plain.archive_parameters() == {
        "archive_mode": "on",
        "archive_command": plain.archive_command(),
    }


def test_bad_stanza_name_and_recovery_targets() -> None:
    with pytest.raises(BackupError, match="stanza"):
        PgBackRest(
            posix_settings(Path("/r")),
            "a b",
            PgInstance(Path("/d"), 1),
            state_dir=Path("/s"),
            log=RecordingLog(),
        )
    with pytest.raises(ValueError, match="timezone-aware"):
        RecoveryTarget.time(datetime(2026, 1, 1))
    assert RecoveryTarget.time(datetime(2026, 1, 1, 5, tzinfo=UTC)).target == (
        "2026-01-01 05:00:00.000000+00"
    )
    with pytest.raises(ValueError, match="not an LSN"):
        RecoveryTarget.lsn("0/3000060; rm -rf /")
    with pytest.raises(ValueError, match="needs a target"):
        RecoveryTarget("time")
    with pytest.raises(ValueError, match="takes no target"):
        RecoveryTarget("immediate", "x")
    assert RecoveryTarget.restore_point("before upgrade").target == "before upgrade"
    with pytest.raises(ValueError, match="cannot hold a quote"):
        RecoveryTarget.restore_point("x'; DROP")
    with pytest.raises(ValueError, match="cannot be exclusive"):
        RecoveryTarget.restore_point("p1", inclusive=False)


class Captured(PgBackRest):
    """Records what each operation would run instead of running pgbackrest."""

    calls: list[tuple[str, list[str], list[PgInstance] | None]]

    async def run(
        self,
        command: str,
        options: Sequence[str] = (),
        *,
        timeout: float,  # noqa: ASYNC109 - the signature of PgBackRest.run
        pgs: Sequence[PgInstance] | None = None,
    ) -> str:
        self.calls.append((command, list(options), list(pgs) if pgs is not None else None))
        return INFO_JSON if command == "info" else ""


def captured(root: Path) -> Captured:
    br = Captured(
        posix_settings(root),
        "main",
        PgInstance(data_dir=root / "replica", port=5434),
        state_dir=root / "state",
        log=RecordingLog(),
    )
    br.calls = []
    return br


async def test_operations_map_to_pgbackrest_options(root: Path) -> None:
    br = captured(root)
    await br.stanza_create()
    assert [c[0] for c in br.calls] == ["stanza-create", "check"]

    br.calls.clear()
    master = PgInstance(data_dir=Path("/pg/master"), port=5432)
    taken = await br.backup("incr", standby=br.pg, primary=master)
    command, options, pgs = br.calls[0]
    assert command == "backup" and pgs == [master, br.pg]
    assert options == [
        "--type=incr",
        "--backup-standby",
        "--pg1-path=/pg/master",
        "--pg1-port=5432",
        "--pg1-user=postgres",
        f"--pg2-path={root / 'replica'}",
        "--pg2-port=5434",
        "--pg2-user=postgres",
    ]
    assert taken.label == "20261203-103054F_20261203-103100D"  # the newest, as info lists it

    br.calls.clear()
    await br.restore(root / "new", RecoveryTarget.lsn("0/5000100", inclusive=False))
    command, options, _ = br.calls[0]
    assert command == "restore"
    assert options == [
        f"--pg1-path={root / 'new'}",
        "--type=lsn",
        "--target=0/5000100",
        "--target-exclusive",
        "--target-action=promote",
    ]
    assert stat.S_IMODE((root / "new").stat().st_mode) == 0o700

    br.calls.clear()
    await br.restore(root / "named", RecoveryTarget.restore_point("before upgrade"))
    assert br.calls[0][1] == [
        f"--pg1-path={root / 'named'}",
        "--type=name",
        "--target=before upgrade",
        "--target-action=promote",
    ]

    br.calls.clear()
    await br.restore(root / "new", standby=True, delta=True, backup_set="20261203-103054F")
    assert br.calls[0][1][1:] == ["--delta", "--set=20261203-103054F", "--type=standby"]

    auto = (root / "new" / "postgresql.auto.conf").read_text()
    assert auto.count("restore_command") == 1
    (root / "new" / "PG_VERSION").write_text("15\n")
    with pytest.raises(BackupError, match="not empty"):
        await br.restore(root / "new")
    with pytest.raises(BackupError, match="takes no target"):
        await br.restore(root / "other", RecoveryTarget.xid(1234), standby=True)


def test_parse_info() -> None:
    (st,) = parse_info(INFO_JSON)
    assert st.name == "main" and st.ok and not st.backup_running
    assert st.system_ids == [7715023328020171572]
    full, diff = st.backups
    assert full.type == "full" and full.prior is None
    assert full.start == datetime.fromtimestamp(1796293854, UTC)
    assert (full.size, full.delta, full.repo_size) == (22967556, 22967556, 4520304)
    assert (full.wal_start, full.wal_stop) == ("000000010000000000000003",) * 2
    assert (full.lsn_start, full.lsn_stop) == ("0/3000028", "0/3000100")
    assert diff.type == "diff" and diff.prior == full.label and diff.repo_delta == 83336
    assert st.latest() == diff and st.latest("full") == full and st.latest("incr") is None
    (arch,) = st.archives
    assert (arch.id, arch.min, arch.max) == (
        "15-1",
        "000000010000000000000001",
        "000000010000000000000005",
    )
    missing = json.dumps(
        [{"name": "x", "status": {"code": 1, "message": "missing stanza path"}, "backup": []}]
    )
    (st,) = parse_info(missing)
    assert not st.ok and st.status_message == "missing stanza path" and st.backups == []
    with pytest.raises(BackupError, match="no JSON"):
        parse_info("ERROR: oops")


def test_a_repository_another_member_creates_meanwhile_is_used_not_an_error(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two members sharing a posix repository start together: each looks, sees no directory,
    and makes it; the second mkdir finds it made. That must not stop the agent (it did: exit 2,
    "cannot write pgbackrest.conf", one member of a local cluster in a CI run)."""
    settings = posix_settings(root)
    br = member(settings, root)
    repo = settings.repository.path  # type: ignore[union-attr]
    real_is_dir = Path.is_dir
    looked: list[Path] = []

    def is_dir_then_made(self: Path) -> bool:
        if self == repo and not looked:
            looked.append(self)
            self.mkdir(parents=True)  # the other member, between our look and our mkdir
            return False
        return real_is_dir(self)

    monkeypatch.setattr(Path, "is_dir", is_dir_then_made)
    assert br.write_config().exists()
    assert looked == [repo] and real_is_dir(repo)


# ----------------------------------------------------------------------------- secrets


def test_s3_config_holds_secrets_only_in_the_0600_file(root: Path) -> None:
    log = RecordingLog()
    settings = s3_settings(root, process_max=2)
    br = member(settings, root, log)
    conf = conf_dict(br.render_config())["global"]
    assert conf["repo1-s3-key"] == KEY and conf["repo1-s3-key-secret"] == SECRET
    assert conf["repo1-type"] == "s3" and conf["repo1-s3-bucket"] == "pg-backups"
    assert conf["repo1-s3-endpoint"] == "s3.example.test"
    assert conf["repo1-s3-region"] == "eu-west-1" and conf["repo1-path"] == "/pgbackrest"
    assert conf["repo1-storage-verify-tls"] == "y" and conf["repo1-s3-uri-style"] == "host"

    redacted = br.render_config(redact=True)
    assert KEY not in redacted and SECRET not in redacted and "********" in redacted

    path = br.write_config()
    st = path.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600
    if os.geteuid() == 0:
        import pwd

        assert st.st_uid == pwd.getpwnam("postgres").pw_uid
    assert SECRET in path.read_text()
    for d in (br.log_dir, br.lock_dir, br.spool_dir):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700

    # what can be logged or recorded: the log events, the settings (dump and repr), errors
    assert log.events and KEY not in log.text() and SECRET not in log.text()
    dumped = settings.model_dump_json() + repr(settings) + str(settings.model_dump())
    assert KEY not in dumped and SECRET not in dumped
    creds = settings.repository.read_credentials()  # type: ignore[union-attr]
    assert KEY not in repr(creds) and SECRET not in str(creds)
    # a fresh object (another process: the CLI) knows the secrets to scrub without rendering
    error = member(settings, root)._error(
        "backup", 41, f"ERROR: [041]: S3 refused key {KEY} secret {SECRET}\n", ""
    )
    assert error.code == 41
    assert KEY not in str(error) and SECRET not in str(error) and "S3 refused" in str(error)


async def test_restore_command_in_auto_conf_is_quoted_for_postgresql(root: Path) -> None:
    """pgBackRest's own restore_command line is replaced by the member's, quoted for
    postgresql.conf even when the command holds quotes (a state dir with a space or a quote)."""
    br = Captured(
        posix_settings(root),
        "main",
        PgInstance(data_dir=root / "d", port=5434),
        state_dir=root / "it's state",
        log=RecordingLog(),
    )
    br.calls = []
    data = root / "new"
    data.mkdir()
    (data / "postgresql.auto.conf").write_text(
        "# Do not edit\nwork_mem = '8MB'\n"
        "restore_command = 'pgbackrest --stanza=main archive-get %f \"%p\"'\n"
        "recovery_target_time = '2026-01-01 00:00:00+00'\n"
    )
    await br.restore(data, RecoveryTarget.time(datetime(2026, 1, 1, tzinfo=UTC)), delta=True)
    lines = (data / "postgresql.auto.conf").read_text().splitlines()
    assert lines[:3] == [
        "# Do not edit",
        "work_mem = '8MB'",
        "recovery_target_time = '2026-01-01 00:00:00+00'",
    ]
    expected = br.restore_command().replace("'", "''")
    assert lines[3] == f"restore_command = '{expected}'"
    assert "'\"'\"'" in br.restore_command()  # shlex quoted the quote
