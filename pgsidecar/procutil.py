"""Small process and port helpers shared by the agent, the local cluster and the tests."""

from __future__ import annotations

import contextlib
import ctypes
import os
import pwd
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any


def pid_alive(pid: int) -> bool:
    """True if ``pid`` runs and is not a zombie. A zombie (exited, not yet reaped: on these
    machines PID 1 reaps orphans 1-2 s late) counts as dead."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            stat = fh.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # the state is the field after the ")" that closes the command name
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state not in ("Z", "X")


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def terminate(
    pid: int, sig: int = signal.SIGTERM, timeout: float = 30.0, escalate: bool = True
) -> bool:
    """Send ``sig`` and wait until the process is gone (or a zombie); SIGKILL after ``timeout``
    if ``escalate``. Reaps it if it is our child. Returns True if it is gone."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _reap(pid)
        if not pid_alive(pid):
            return True
        time.sleep(0.02)
    if escalate:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return True
        for _ in range(500):
            _reap(pid)
            if not pid_alive(pid):
                return True
            time.sleep(0.02)
    return not pid_alive(pid)


def die_with_parent() -> None:
    """A ``preexec_fn`` for a child the caller stops itself: SIGKILL it if the caller dies
    first without stopping it (PR_SET_PDEATHSIG), so a crashed run leaves no server behind."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def stop_child(
    proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 10.0
) -> None:
    """Stop a child started with ``subprocess.Popen`` and reap it: ``sig`` unless it has exited
    already, SIGKILL if it is still there after ``timeout``."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port_range(
    count: int, start: int = 20000, end: int = 60000, host: str = "127.0.0.1"
) -> int:
    """First port p in [start, end) such that p .. p+count-1 are all free now. Randomised start
    so that concurrent test runs rarely collide."""
    import random

    span = end - start - count
    base = start + random.randrange(0, max(1, span))
    for offset in range(0, span, count):
        p = start + (base - start + offset) % span
        if all(port_free(p + i, host) for i in range(count)):
            return p
    raise RuntimeError(f"no {count} consecutive free ports in [{start}, {end})")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def os_user_ids(user: str) -> tuple[int, int]:
    """(uid, gid) of an OS user; raises KeyError with a clear message if it does not exist."""
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise KeyError(
            f"OS user {user!r} does not exist: PostgreSQL refuses to run as root, so the agent runs it "
            f"as an unprivileged user; create it (Debian's postgresql package creates 'postgres') or set "
            f"postgresql.os_user"
        ) from None
    return pw.pw_uid, pw.pw_gid


def chown_tree(path: Path, uid: int, gid: int) -> None:
    os.chown(path, uid, gid)
    for root, dirs, files in os.walk(path):
        for n in dirs + files:
            try:
                os.chown(os.path.join(root, n), uid, gid, follow_symlinks=False)
            except FileNotFoundError:
                pass


def traversable_by(path: Path, uid: int, gid: int) -> Path | None:
    """Return the first ancestor of ``path`` that user (uid, gid) cannot enter, or None."""
    import stat as st

    p = path.resolve()
    for parent in [*reversed(p.parents), p]:
        try:
            s = parent.stat()
        except FileNotFoundError:
            break
        if s.st_uid == uid:
            ok = bool(s.st_mode & st.S_IXUSR)
        elif s.st_gid == gid:
            ok = bool(s.st_mode & st.S_IXGRP)
        else:
            ok = bool(s.st_mode & st.S_IXOTH)
        if not ok and uid != 0:
            return parent
    return None
