"""PostgreSQL 15's server log forwarded by the agent (``postgresql.log_destination: stderr``): a
failed statement arrives on the agent's stderr as a JSON line tagged with the member and the
cluster, a password in a logged statement does not, and no log file is written anywhere: not in
the data directory (the volume), not in the state directory."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from pgsidecar.postgres.control import PostgresControl
from tests.support.pgtestutil import SU_PASSWORD, Lab, free_port, make_settings

MARKER = "no_such_table_for_the_log"


@pytest.fixture
async def lab() -> AsyncIterator[Lab]:
    lab = Lab()
    try:
        yield lab
    finally:
        await lab.close()


def forwarding_control(lab: Lab) -> PostgresControl:
    base = lab.root / "pg-1"
    base.mkdir()
    os.chmod(base, 0o755)
    ctl = PostgresControl(
        make_settings(base / "data", free_port(), log_destination="stderr"),
        base / "state",
        "pg-1",
        lab.log,
        cluster="shop",
    )
    ctl.write_passfile()
    lab.controls.append(ctl)
    return ctl


def files_holding(root: Path, needle: bytes) -> list[Path]:
    found = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            try:
                if needle in path.read_bytes():
                    found.append(path)
            except OSError:
                continue
    return found


async def test_a_failed_statement_reaches_the_agents_stderr_as_a_json_line(
    lab: Lab, capfd: pytest.CaptureFixture[str]
) -> None:
    ctl = forwarding_control(lab)
    await ctl.initdb()
    ctl.write_config("primary", None, None)
    await ctl.start(30)
    async with await psycopg.AsyncConnection.connect(
        ctl.superuser_conninfo().dsn(ctl.passfile, connect_timeout=3), autocommit=True
    ) as conn:
        with pytest.raises(psycopg.errors.UndefinedTable):
            await conn.execute(f"SELECT * FROM {MARKER}")
        # a statement that carries a password, logged in full
        await conn.execute("SET log_statement = 'all'")
        await conn.execute(
            sql.SQL("ALTER ROLE postgres PASSWORD {}").format(sql.Literal(SU_PASSWORD))
        )
    await ctl.stop("fast")  # returns once the server's last lines are out

    err = capfd.readouterr().err
    records = []
    for line in err.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("source") == "postgresql":
            records.append(rec)
    assert records, f"no forwarded server line on stderr:\n{err[-2000:]}"
    assert all(r["member"] == "pg-1" and r["cluster"] == "shop" for r in records)

    failed = [r for r in records if f'relation "{MARKER}" does not exist' in r["message"]]
    assert len(failed) == 1
    assert (failed[0]["level"], failed[0]["severity"]) == ("error", "ERROR")
    assert (failed[0]["user"], failed[0]["database"]) == ("postgres", "postgres")
    statement = [r for r in records if r.get("severity") == "STATEMENT" and MARKER in r["message"]]
    assert statement and statement[0]["pid"] == failed[0]["pid"]
    assert any("database system is shut down" in r["message"] for r in records)

    altered = [r for r in records if "ALTER ROLE postgres PASSWORD" in r["message"]]
    assert altered, "the statement was logged (so the check below means something)"
    # the password is quoted in the statement (su:pa\ss''word): none of it may pass
    assert SU_PASSWORD.startswith("su:pa")
    assert not any("su:pa" in r["message"] for r in records)

    # nothing on disk: the data directory (the volume) and the state directory hold no log
    assert files_holding(ctl.data_dir, MARKER.encode()) == []
    assert not (ctl.data_dir / "log").exists()
    assert not ctl.log_path.exists()
    assert files_holding(ctl.state_dir, MARKER.encode()) == []
