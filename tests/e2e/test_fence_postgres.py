"""The fence process against real PostgreSQL 15: at the deadline writes stop (SIGQUIT), a stopped
postmaster and its stopped backends are killed, backends exit when the postmaster is SIGKILLed, and
an agent's whole process group SIGSTOPped still fences. Every test picks its own /tmp directory
and ports, and kills and reaps every process it started, by pid. The fence process alone:
tests/unit/test_fence.py."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time

import psycopg
import pytest

from pgsidecar.postgres.control import PostgresControl
from pgsidecar.procutil import pid_alive
from tests.support.fenceutil import FenceProc, Procs, proc_state, start_child_agent, wait_until
from tests.support.pgtestutil import Lab

# ------------------------------------------------------------------------------ real PostgreSQL


async def primary(lab: Lab) -> tuple[PostgresControl, psycopg.AsyncConnection]:
    ctl = lab.control("pg")
    ctl.write_config("primary", None, None)
    await ctl.start(30)
    conn = await psycopg.AsyncConnection.connect(
        ctl.superuser_conninfo().dsn(ctl.passfile, connect_timeout=3), autocommit=True
    )
    await conn.execute("CREATE TABLE t (x int)")
    await conn.execute("INSERT INTO t VALUES (1)")  # it can write
    return ctl, conn


async def cannot_write(conn: psycopg.AsyncConnection) -> bool:
    try:
        await asyncio.wait_for(conn.execute("INSERT INTO t VALUES (2)"), 5)
    except psycopg.OperationalError:
        return True
    return False


def pg_log(ctl: PostgresControl) -> str:
    ctl.server_log.flush(2)  # the agent writes the file: what the server said so far is in it
    return ctl.log_path.read_text(errors="replace")


def shm_id(ctl: PostgresControl) -> int:
    """The SysV segment of a running postmaster (postmaster.pid line 7: key, id)."""
    return int((ctl.data_dir / "postmaster.pid").read_text().splitlines()[6].split()[1])


def drop_shm(shmid: int) -> None:
    """A SIGKILLed postmaster leaves its (56-byte) SysV segment: remove it once unattached."""
    with open("/proc/sysvipc/shm") as fh:
        for line in fh.read().splitlines()[1:]:
            f = line.split()
            if int(f[1]) == shmid and int(f[6]) == 0:
                subprocess.run(["ipcrm", "-m", str(shmid)], check=False)


@pytest.mark.integration
async def test_a_fence_process_alone_sigquits_postgres_at_the_deadline(
    lab: Lab, procs: Procs
) -> None:
    """Armed, then nothing from the agent side (frozen): fence.py fences on its own."""
    ctl, conn = await primary(lab)
    pm = ctl.postmaster_pid
    fp = FenceProc(procs)
    deadline = time.monotonic() + 1.0
    fp.arm(deadline, pm)
    await asyncio.sleep(max(0.0, deadline - time.monotonic() - 0.15))
    assert ctl.running and pid_alive(pm), "fenced before the deadline"
    rc = await asyncio.wait_for(ctl.wait_exit(), 5)
    exited = time.monotonic()
    _, fired = fp.expect("fired")
    late = float(fired[2])
    assert fired[1] == str(pm) and fired[4] == "sigquit"
    # bound: the minimum fencing margin (0.5 s) between the deadline and the earliest expiry
    assert 0 <= late < 0.5, f"SIGQUIT {late:.3f}s after the deadline"
    assert exited - deadline < 0.5, f"postmaster gone {exited - deadline:.3f}s after"
    assert rc == 0 and "received immediate shutdown request" in pg_log(ctl)
    assert await cannot_write(conn)
    print(f"\nfence.py: SIGQUIT {late * 1000:.1f} ms late, exit seen {exited - deadline:.3f}s")
    fp.send("exit")
    assert fp.p.wait(timeout=5) == 0


@pytest.mark.integration
async def test_b_agent_process_group_sigstopped_the_fence_process_still_fences(
    lab: Lab, procs: Procs
) -> None:
    ctl, conn = await primary(lab)
    pm = ctl.postmaster_pid
    assert pm is not None
    child, fence_pid, deadline = await asyncio.to_thread(
        start_child_agent, procs, lab.root, pm, 3.0
    )
    assert os.getsid(fence_pid) != os.getsid(child.pid)
    os.killpg(child.pid, signal.SIGSTOP)  # the agent and its whole process group
    try:
        assert wait_until(lambda: proc_state(child.pid) == "T", 2)
        assert proc_state(fence_pid) in ("S", "R")
        await conn.execute("INSERT INTO t VALUES (3)")  # still the writable master
        rc = await asyncio.wait_for(ctl.wait_exit(), deadline - time.monotonic() + 3)
        gone = time.monotonic()
        assert proc_state(child.pid) == "T", "the agent was frozen all along"
        assert rc == 0 and "received immediate shutdown request" in pg_log(ctl)
        assert gone - deadline < 0.5, f"postmaster gone {gone - deadline:.3f}s after"
        assert await cannot_write(conn)
        fence_log = (lab.root / "state" / "fence.log").read_text()
        assert f"postmaster {pm}: sigquit" in fence_log
    finally:
        os.killpg(child.pid, signal.SIGCONT)
    # once it runs again, the client learns of the fencing from the fence process
    assert child.stdout is not None
    assert child.stdout.readline().decode().strip() == "on_fired"
    child.kill()
    child.wait(timeout=5)
    # its fence process sees the end of its stdin and exits
    assert wait_until(lambda: not pid_alive(fence_pid), 5)


async def backend_pid(conn: psycopg.AsyncConnection) -> int:
    cur = await conn.execute("SELECT pg_backend_pid()")
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.integration
async def test_d_postgres_backends_exit_when_the_postmaster_is_sigkilled(lab: Lab) -> None:
    """What the SIGKILL relies on, checked against PostgreSQL 15 itself: a stopped postmaster
    leaves its backends writable; once it is SIGKILLed they exit (postmaster death)."""
    ctl, conn = await primary(lab)
    pm = ctl.postmaster_pid
    assert pm is not None
    backend = await backend_pid(conn)
    shmid = shm_id(ctl)
    os.kill(pm, signal.SIGSTOP)
    try:
        await conn.execute("INSERT INTO t VALUES (4)")  # still commits
        os.kill(pm, signal.SIGQUIT)  # pending: a stopped process does not act on it
        await asyncio.sleep(0.3)
        await conn.execute("INSERT INTO t VALUES (5)")  # and still commits
        os.kill(pm, signal.SIGKILL)
        assert await asyncio.wait_for(ctl.wait_exit(), 5) == -signal.SIGKILL
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pm, signal.SIGCONT)
    assert wait_until(lambda: not pid_alive(backend), 3), "backend outlived the postmaster"
    assert await cannot_write(conn)
    drop_shm(shmid)


@pytest.mark.integration
async def test_d_fence_kills_a_stopped_postmaster_and_its_stopped_backends(
    lab: Lab, procs: Procs
) -> None:
    ctl, conn = await primary(lab)
    pm = ctl.postmaster_pid
    assert pm is not None
    other = await psycopg.AsyncConnection.connect(
        ctl.superuser_conninfo().dsn(ctl.passfile, connect_timeout=3), autocommit=True
    )
    running, stopped = await backend_pid(conn), await backend_pid(other)
    shmid = shm_id(ctl)
    os.kill(pm, signal.SIGSTOP)
    os.kill(stopped, signal.SIGSTOP)
    try:
        await conn.execute("INSERT INTO t VALUES (4)")  # a stopped postmaster: still writable
        fp = FenceProc(procs)
        deadline = time.monotonic() + 0.3
        fp.arm(deadline, pm)
        rc = await asyncio.wait_for(ctl.wait_exit(), 5)
        gone = time.monotonic()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pm, signal.SIGCONT)
    # a stopped postmaster is SIGKILLed at once, not after the 1 s SIGQUIT gets to act
    assert rc == -signal.SIGKILL
    assert gone - deadline < 0.5, f"postmaster gone {gone - deadline:.3f}s after the deadline"
    assert wait_until(lambda: not pid_alive(running), 3), "backend outlived the postmaster"
    # the stopped backend is still stopped (nobody sent SIGCONT): it cannot exit by itself, so
    # if it is gone, SIGKILL took it (it needs a moment of CPU to die: wait for it)
    try:
        assert wait_until(lambda: not pid_alive(stopped), 3), "a stopped backend was not killed"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(stopped, signal.SIGKILL)
    assert await cannot_write(conn)
    with contextlib.suppress(psycopg.Error):
        await other.close()
    drop_shm(shmid)
    fp.send("exit")
    assert fp.p.wait(timeout=5) == 0
    assert f"postmaster {pm} is stopped: SIGKILL to it and its" in fp.stderr()
