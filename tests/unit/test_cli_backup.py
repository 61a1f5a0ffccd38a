"""`pgsidecar backup`: which member the files come from, how a backup is listed, and the parser
(no server here; tests/e2e/test_backup_cluster.py runs the commands against a real cluster)."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from pathlib import Path

import pytest

from events.dcs import ClusterView, Leader
from pgsidecar.backup import BackupError, BackupSet
from pgsidecar.backup.source import choose_source
from pgsidecar.cli import build_parser
from pgsidecar.cli.backup import backup_document, render_backups


def view(**members: dict[str, object]) -> ClusterView:
    return ClusterView(leader=Leader("pg1", 3), members={"pg1": {"role": "master"}, **members})


def replica(streaming: bool = True, running: bool = True) -> dict[str, object]:
    return {"role": "replica", "running": running, "streaming": streaming}


def test_a_streaming_replica_at_hand_is_the_source() -> None:
    v = view(pg2=replica(streaming=False), pg3=replica(), pg4=replica())
    assert choose_source(v, {"pg1", "pg2", "pg3", "pg4"}) == ("pg1", "pg3")


def test_the_master_when_no_replica_streams_or_none_is_at_hand() -> None:
    v = view(pg2=replica(streaming=False), pg3=replica(running=False))
    assert choose_source(v, {"pg1", "pg2", "pg3"}) == ("pg1", None)
    assert choose_source(view(pg2=replica()), {"pg1"}) == ("pg1", None)


def test_refused_without_a_master_or_with_the_master_elsewhere() -> None:
    with pytest.raises(BackupError, match="no master"):
        choose_source(ClusterView(members={"pg2": replica()}), {"pg2"})
    with pytest.raises(BackupError, match="master pg1 is not on this host"):
        choose_source(view(pg2=replica()), {"pg2"})


def backup_set(label: str, kind: str, size: int) -> BackupSet:
    return BackupSet(
        label=label,
        type=kind,  # type: ignore[arg-type]
        start=datetime(2026, 12, 3, 5, 0, 0, tzinfo=UTC),
        stop=datetime(2026, 12, 3, 5, 0, 9, tzinfo=UTC),
        size=size,
        delta=size,
        repo_size=size // 8,
        repo_delta=size // 8,
        wal_start="000000020000000000000005",
        wal_stop="000000020000000000000006",
        lsn_start="0/5000028",
        lsn_stop="0/6000100",
        prior=None,
        error=False,
    )


def test_the_listing_shows_label_type_times_sizes_and_wal() -> None:
    text = render_backups("local", [backup_set("20261203-050000F", "full", 164 * 1024 * 1024)])
    row = next(ln for ln in text.splitlines() if ln.startswith("| 2026"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells == [
        "20261203-050000F",
        "full",
        "2026-12-03 05:00:00",
        "2026-12-03 05:00:09",
        "164.0 MiB",
        "20.5 MiB",
        "000000020000000000000005",
        "000000020000000000000006",
    ]
    assert "(no backups)" in render_backups("local", [])
    doc = backup_document(backup_set("L", "incr", 10))
    assert doc["start"] == "2026-12-03T05:00:00+00:00" and doc["type"] == "incr"


def parse(*argv: str) -> argparse.Namespace:
    return build_parser(list(argv)).parse_args(list(argv))


def test_the_parser() -> None:
    a = parse("backup", "--dir", "/x")
    assert (a.type, a.dir, a.backup_cmd) == ("full", "/x", None)
    assert parse("backup", "--type", "incr", "--config", "c.yaml").type == "incr"
    # the target before or after `list`
    for argv in (
        ("backup", "--dir", "/x", "list", "--json"),
        ("backup", "list", "--json", "--dir", "/x"),
    ):
        a = parse(*argv)
        assert (a.backup_cmd, a.json, a.dir) == ("list", True, "/x")
    with pytest.raises(SystemExit):
        parse("backup", "--type", "weekly", "--dir", "/x")


def test_local_up_backup_schedule_options_are_checked_before_anything_is_created() -> None:
    from pgsidecar.cli.local import backup_schedule, target_time
    from pgsidecar.config import ConfigError

    args = build_parser().parse_args(
        ["local", "up", "--backup-schedule", "full=0 3 * * 0", "--backup-schedule", "diff=1d"]
    )
    assert backup_schedule(args.backup_schedule) == {"full": "0 3 * * 0", "diff": "1d"}
    assert backup_schedule([]) is None
    with pytest.raises(ConfigError, match="TYPE=WHEN"):
        backup_schedule(["weekly=1d"])
    with pytest.raises(ConfigError, match="set schedule.full"):
        backup_schedule(["diff=1d"])
    with pytest.raises(ConfigError, match=r"full: '61 \* \* \* \*' is neither an interval"):
        backup_schedule(["full=61 * * * *"])
    assert target_time("2026-12-03T05:00:00Z") == datetime(2026, 12, 3, 5, tzinfo=UTC)
    with pytest.raises(ConfigError, match="time zone"):
        target_time("2026-12-03T05:00:00")


@pytest.mark.parametrize(
    ("flag", "value", "field", "expected"),
    [
        ("--target-lsn", "0/3000060", "lsn", "0/3000060"),
        ("--target-xid", "4711", "xid", 4711),
        ("--target-name", "before-upgrade", "name", "before-upgrade"),
        ("--target-time", "2026-12-03T05:00:00Z", "time", datetime(2026, 12, 3, 5, tzinfo=UTC)),
    ],
)
def test_local_up_restore_takes_one_target_of_each_kind(
    flag: str, value: str, field: str, expected: object
) -> None:
    from pgsidecar.cli.local import restore_target

    target = restore_target(parse("local", "up", "--restore-from", "/src", flag, value))
    assert target is not None
    set_fields = {
        k: v for k, v in target.model_dump().items() if v is not None and k != "inclusive"
    }
    assert set_fields == {field: expected}
    assert target.inclusive is True


def test_local_up_restore_targets_are_exclusive_and_need_a_source(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from pgsidecar.cli.local import restore_target
    from pgsidecar.config import ConfigError

    with pytest.raises(SystemExit):
        parse("local", "up", "--restore-from", "/s", "--target-lsn", "0/1", "--target-xid", "9")
    assert "--target-xid: not allowed with argument --target-lsn" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse("local", "up", "--target-time", "2026-12-03T05:00:00Z", "--target-name", "x")
    assert "--target-name: not allowed with argument --target-time" in capsys.readouterr().err

    with pytest.raises(ConfigError, match="--target-xid needs --restore-from DIR"):
        restore_target(parse("local", "up", "--target-xid", "9"))
    with pytest.raises(ConfigError, match="--restore-from needs a target: one of --target-time"):
        restore_target(parse("local", "up", "--restore-from", "/s"))
    assert restore_target(parse("local", "up")) is None


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--target-lsn", "3", "--target-lsn '3': not an LSN"),
        ("--target-lsn", "0/1; rm -rf /", "not an LSN"),
        ("--target-xid", "abc", "--target-xid 'abc': not a transaction id"),
        ("--target-xid", "2", "not a transaction id"),
        ("--target-name", "it's", "cannot hold a quote"),
        ("--target-name", "x" * 64, "at most 63 bytes"),
        ("--target-name", " ", "cannot be empty"),
        ("--target-time", "2026-12-03T05:00:00", "needs a time zone"),
    ],
)
def test_local_up_refuses_a_bad_target_before_anything_is_created(
    flag: str, value: str, message: str
) -> None:
    from pgsidecar.cli.local import restore_target
    from pgsidecar.config import ConfigError

    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        restore_target(parse("local", "up", "--restore-from", "/s", flag, value))


def test_local_up_with_a_bad_target_exits_2_and_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pgsidecar.cli import main

    dst = tmp_path / "dst"
    argv = ["local", "up", "--dir", str(dst), "--restore-from", str(tmp_path / "src")]
    assert main([*argv, "--target-lsn", "nope"]) == 2
    assert "--target-lsn 'nope': not an LSN" in capsys.readouterr().err
    assert not dst.exists()
