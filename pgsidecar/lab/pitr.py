"""Point-in-time recovery of a local cluster's first member from another cluster's pgBackRest
repository, before any agent starts (``pgsidecar local up --restore-from DIR --target-time TS``).

The data directory is restored from the source's latest backup before the target, then PostgreSQL
runs once on its own to replay the source's archive up to the target and promote (a new timeline);
it is stopped cleanly and left as a primary's data directory with nothing of the recovery left in
it (no restore_command, no recovery target). The new cluster's agents then start as usual: the
first member holds the only data, the others clone from it once it leads.

The recovery run never archives (``archive_mode=off``): the restored server must not push its new
timeline into the source's stanza. The new cluster archives into its own repository.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from pgsidecar.backup import BackupSettings, PgBackRest, PgInstance, PosixRepository, RecoveryTarget
from pgsidecar.procutil import os_user_ids

_RECOVERY_SETTING = re.compile(r"^\s*(restore_command|recovery_target\w*)\s*=", re.I)


class PitrError(Exception):
    pass


class _Quiet:
    def info(self, *_: Any, **__: Any) -> None:
        return None

    warning = error = info


def _as_user(argv: list[str], pg_user: str | None) -> list[str]:
    if pg_user is None:
        return argv
    uid, gid = os_user_ids(pg_user)
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--init-groups", "--", *argv]


def _cluster_state(pg_bin: Path, data_dir: Path, pg_user: str | None) -> str:
    out = subprocess.run(
        _as_user([str(pg_bin / "pg_controldata"), str(data_dir)], pg_user),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"},
    ).stdout
    m = re.search(r"^Database cluster state:\s*(.+)$", out, re.M)
    return m.group(1).strip() if m else ""


def restore_to_time(
    *,
    repository: Path,
    stanza: str,
    data_dir: Path,
    port: int,
    target: datetime,
    pg_bin: Path,
    pg_user: str | None,
    work_dir: Path,
    timeout: float = 600.0,
) -> None:
    """Restore ``data_dir`` (absent or empty) to ``target`` from ``stanza`` in ``repository``,
    recover and promote it, stop it. Raises PitrError with PostgreSQL's last log lines when the
    target cannot be reached (after the end of the archive, before the first backup)."""
    br = PgBackRest(
        BackupSettings(repository=PosixRepository(path=repository)),
        stanza,
        PgInstance(data_dir=data_dir, port=port),
        state_dir=work_dir,
        os_user=pg_user,
        log=_Quiet(),
    )
    br.write_config()
    # the backup to start from: pgBackRest picks the latest one that ended before the target
    asyncio.run(br.restore(data_dir, RecoveryTarget.time(target, action="promote")))
    log = work_dir / "recovery.log"
    log.touch()
    if pg_user is not None:
        uid, gid = os_user_ids(pg_user)
        os.chown(log, uid, gid)
    options = f"-c port={port} -c listen_addresses=127.0.0.1 -c archive_mode=off -c hot_standby=on"
    pg_ctl = str(pg_bin / "pg_ctl")
    env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"}
    subprocess.run(
        _as_user([pg_ctl, "-D", str(data_dir), "-o", options, "-l", str(log), "start"], pg_user),
        check=True,
        timeout=60,
        env=env,
        capture_output=True,
    )
    deadline = time.monotonic() + timeout
    try:
        while True:
            state = _cluster_state(pg_bin, data_dir, pg_user)
            if state == "in production":
                break
            alive = subprocess.run(
                _as_user([pg_ctl, "-D", str(data_dir), "status"], pg_user),
                capture_output=True,
                timeout=30,
                check=False,
                env=env,
            )
            if alive.returncode != 0 or time.monotonic() > deadline:
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-8:])
                raise PitrError(
                    f"recovery to {target.isoformat()} did not complete ({state or 'no state'}):"
                    f"\n{tail}"
                )
            time.sleep(0.5)
    finally:
        subprocess.run(
            _as_user([pg_ctl, "-D", str(data_dir), "-m", "fast", "-w", "stop"], pg_user),
            timeout=120,
            check=False,
            env=env,
            capture_output=True,
        )
    _forget_recovery(data_dir)


def _forget_recovery(data_dir: Path) -> None:
    """postgresql.auto.conf without the recovery's restore_command and target: it outranks the
    agent's postgresql.conf, and a target left there would stop a later standby's replay."""
    auto = data_dir / "postgresql.auto.conf"
    if not auto.exists():
        return
    st = auto.stat()
    kept = [ln for ln in auto.read_text().splitlines() if not _RECOVERY_SETTING.match(ln)]
    auto.write_text("\n".join(kept) + "\n")
    os.chown(auto, st.st_uid, st.st_gid)
