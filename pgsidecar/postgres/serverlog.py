"""PostgreSQL's server log, read by the agent from a pipe on the postmaster's stderr and written
on: as JSON lines on the agent's stderr, tagged with the member and cluster
(``postgresql.log_destination: stderr``: ``kubectl logs`` shows them, nothing lands on the data
volume), or as the server wrote them to ``<state_dir>/postgresql.log``, size-bounded and rotated
(``file``).

Why a pipe on stderr and not PostgreSQL's ``jsonlog``: jsonlog needs ``logging_collector``, whose
syslogger writes files into ``log_directory`` (on the data volume, or into a FIFO that it would
block on, and every backend behind it), and is one more process to supervise. The pipe keeps the
log off every disk, and it cannot stall PostgreSQL or outlive the agent's design:

* The pipe's write end is O_NONBLOCK, a flag of the open file that the postmaster and every
  backend share: a server process never waits for the agent. If the pipe is full (the agent
  frozen or starved), PostgreSQL's write fails with EAGAIN and it drops that message (it ignores
  errors writing to stderr). The pipe is enlarged to 1 MiB where the kernel allows it.
* A reader thread drains the pipe as it fills into a bounded queue; when the queue is full whole
  lines are dropped and counted, and a notice with the count follows once there is room. A writer
  thread writes the queue out: a slow or blocked stderr (the container runtime) stalls only it.
  A line longer than ``MAX_LINE_BYTES`` is cut there (the record says how much was cut), so
  memory stays bounded too.
* The agent keeps the write end open for its life: the pipe never reaches end of file between
  two postmasters, and what orphaned backends write after their postmaster died still arrives.
* When the agent dies the read end closes with it. The kernel SIGQUITs the postmaster (the
  parent-death signal, process.py) and the server's writes to the pipe fail with EPIPE:
  PostgreSQL ignores SIGPIPE (and inherits the agent's SIG_IGN of it besides), so nothing is
  killed by the pipe; the shutdown is the parent-death signal's, as before.
* Every line is redacted before it leaves (``redact``): a statement that sets a password
  (``log_statement = 'ddl'`` logs ``ALTER ROLE ... PASSWORD '...'``), a ``password=`` in a
  connection string, and the configured passwords themselves wherever they appear.
"""

from __future__ import annotations

import collections
import datetime as dt
import fcntl
import json
import os
import queue
import re
import termios
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from prometheus_client.core import CounterMetricFamily

from events.rotation import DEFAULT_BACKUPS, DEFAULT_MAX_BYTES, RotatingLines

Destination = Literal["stderr", "file"]

REDACTED = "********"
# a record's message is cut here; container runtimes split longer lines anyway (16 KiB)
MAX_LINE_BYTES = 8192
# lines waiting for the writer: at most QUEUE_LINES * MAX_LINE_BYTES of memory
QUEUE_LINES = 1000
PIPE_BYTES = 1 << 20
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)

# PASSWORD 'literal' (CREATE/ALTER ROLE, also ENCRYPTED PASSWORD), E'' strings included
_PASSWORD_LITERAL = re.compile(r"(?i)(\bpassword\s+)(E?'(?:[^'\\]|''|\\.)*'?)")
# password=value in a connection string (primary_conninfo, dblink, a DSN in an error)
_PASSWORD_KEYWORD = re.compile(r"(?i)(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'?|[^\s']+)")

# the agent's log_line_prefix '%m [%p] %q%u@%d ' (postgres/config.py): time, pid, and for a
# session process user@database; then the severity and two spaces
_PREFIX = re.compile(
    r"(?s)(?P<time>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?(?: \S+)?) \[(?P<pid>\d+)\] "
    r"(?:(?P<user>[^@\s]*)@(?P<database>\S*) )?"
    r"(?P<severity>DEBUG[1-5]|INFO|NOTICE|WARNING|ERROR|LOG|FATAL|PANIC|DETAIL|HINT|QUERY"
    r"|CONTEXT|STATEMENT|LOCATION):  (?P<message>.*)"
)
_LEVELS = {"WARNING": "warning", "ERROR": "error", "FATAL": "critical", "PANIC": "critical"}


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with password literals, ``password=`` values and each of ``secrets`` replaced."""
    text = _PASSWORD_LITERAL.sub(lambda m: m.group(1) + "'" + REDACTED + "'", text)
    text = _PASSWORD_KEYWORD.sub(lambda m: m.group(1) + REDACTED, text)
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return text


def parse_line(line: str) -> dict[str, Any]:
    """The fields of a server log line written with the agent's prefix; a line in another form
    (a custom log_line_prefix, output before logging is set up) is its message alone."""
    m = _PREFIX.fullmatch(line)
    if m is None:
        return {"level": "info", "message": line}
    severity = m.group("severity")
    fields: dict[str, Any] = {
        "level": "debug" if severity.startswith("DEBUG") else _LEVELS.get(severity, "info"),
        "severity": severity,
        "log_time": m.group("time"),
        "pid": int(m.group("pid")),
    }
    if m.group("user") is not None:
        fields["user"] = m.group("user")
        fields["database"] = m.group("database")
    fields["message"] = m.group("message")
    return fields


class LineSplitter:
    """Bytes in, whole lines out (without the newline), each at most ``max_bytes``: the rest of
    a longer line is counted, not kept, so memory stays bounded whatever is written."""

    def __init__(self, max_bytes: int = MAX_LINE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._buf = bytearray()
        self._cut = 0

    def feed(self, data: bytes) -> list[tuple[bytes, int]]:
        """The lines completed by ``data``, each with the number of bytes cut off it."""
        out: list[tuple[bytes, int]] = []
        pos = 0
        while pos < len(data):
            nl = data.find(b"\n", pos)
            end = len(data) if nl < 0 else nl
            take = min(self.max_bytes - len(self._buf), end - pos)
            self._buf += data[pos : pos + take]
            self._cut += end - pos - take
            if nl < 0:
                break
            out.append(self._take())
            pos = nl + 1
        return out

    @property
    def partial(self) -> bool:
        return bool(self._buf) or self._cut > 0

    def finish(self) -> list[tuple[bytes, int]]:
        """A last line without its newline (at end of file)."""
        return [self._take()] if self.partial else []

    def _take(self) -> tuple[bytes, int]:
        line, cut = bytes(self._buf), self._cut
        self._buf.clear()
        self._cut = 0
        return line, cut


class ServerLog:
    """The pipe the postmaster writes its log to, and the two threads that carry it out.
    Created idle; ``spawn_fd()`` (the fd a postmaster's stdout and stderr get) starts it."""

    def __init__(
        self,
        destination: Destination,
        *,
        member: str,
        cluster: str | None,
        path: Path,
        max_bytes: int = DEFAULT_MAX_BYTES,
        backups: int = DEFAULT_BACKUPS,
        secrets: Sequence[str] = (),
        out_fd: int = 2,
        queue_lines: int = QUEUE_LINES,
        max_line_bytes: int = MAX_LINE_BYTES,
    ) -> None:
        self.destination = destination
        self.member = member
        self.cluster = cluster
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self.secrets = [s for s in secrets if s]
        self.out_fd = out_fd
        self.max_line_bytes = max_line_bytes
        self.dropped = 0  # lines lost in the agent: queue full, or the output failed
        self._unreported = 0  # dropped for a full queue, not yet told in a notice
        self._queue: queue.Queue[str | None] = queue.Queue(maxsize=queue_lines)
        self._tail: collections.deque[tuple[int, str]] = collections.deque(maxlen=50)
        self._lines_seen = 0
        self._lock = threading.Lock()
        self._read_fd: int | None = None
        self._write_fd: int | None = None
        self._reader: threading.Thread | None = None
        self._writer: threading.Thread | None = None
        self._reading = False  # the reader holds bytes it has read but not yet queued
        # stderr is shared with the agent's own log lines: a write of at most PIPE_BUF bytes to a
        # pipe is never interleaved with another's, so batches stay within it there (a record
        # longer than that goes alone, and only it could be). A file takes larger batches,
        # within a fraction of the rotation size.
        self._batch_bytes = 4096 if destination == "stderr" else min(65536, max_bytes // 8)

    # ------------------------------------------------------------------ the agent's side

    def spawn_fd(self) -> int:
        """The pipe's write end, for the postmaster's stdout and stderr (dup2 in posix_spawn
        clears its close-on-exec flag in the child only)."""
        with self._lock:
            if self._write_fd is None:
                self._open()
            assert self._write_fd is not None
            return self._write_fd

    def _open(self) -> None:
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        try:
            fcntl.fcntl(write_fd, _F_SETPIPE_SZ, PIPE_BYTES)
        except OSError:
            pass  # over /proc/sys/fs/pipe-max-size for an unprivileged agent: the default 64 KiB
        flags = fcntl.fcntl(write_fd, fcntl.F_GETFL)
        fcntl.fcntl(write_fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
        self._read_fd, self._write_fd = read_fd, write_fd
        self._writer = threading.Thread(target=self._write_loop, name="pg-log-writer", daemon=True)
        self._reader = threading.Thread(
            target=self._read_loop, args=(read_fd,), name="pg-log-reader", daemon=True
        )
        self._writer.start()
        self._reader.start()

    def write_text(self, text: str) -> None:
        """Lines the agent got from a server run of its own (single-user crash recovery) go the
        same way as the postmaster's."""
        self.spawn_fd()  # started
        for line in text.splitlines():
            self._emit(line, 0)

    def mark(self) -> int:
        """A position in the stream of lines, for ``tail(since=...)``."""
        return self._lines_seen

    def tail(self, lines: int = 10, since: int = 0) -> str:
        """The last ``lines`` lines (redacted) after ``mark()`` returned ``since``."""
        picked = [text for n, text in list(self._tail) if n > since][-lines:]
        return "\n".join(picked) if picked else "(no log)"

    def flush(self, timeout: float = 1.0) -> bool:
        """Wait until what the server wrote so far has been written out (bounded by ``timeout``;
        for a stop, so that its last lines are out before the agent reads or exits)."""
        if self._read_fd is None:
            return True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._reading and self._pipe_bytes() == 0 and self._queue.unfinished_tasks == 0:
                return True
            time.sleep(0.005)
        return False

    def close(self) -> None:
        """Close the agent's write end: the threads end once every server process has (their
        copies of the write end close with them)."""
        with self._lock:
            if self._write_fd is not None:
                os.close(self._write_fd)
                self._write_fd = None

    def _pipe_bytes(self) -> int:
        fd = self._read_fd
        if fd is None:
            return 0
        try:
            buf = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
        except OSError:
            return 0
        return int.from_bytes(buf, "little")

    # ------------------------------------------------------------------ the reader thread

    def _read_loop(self, fd: int) -> None:
        splitter = LineSplitter(self.max_line_bytes)
        pending: list[bytes] = []  # a record and its continuation lines (a tab after a newline)
        pending_cut = 0

        def emit_pending() -> None:
            nonlocal pending_cut
            if pending:
                joined = b"\n".join(pending)
                cut = pending_cut + max(0, len(joined) - self.max_line_bytes)
                self._emit(joined[: self.max_line_bytes].decode(errors="replace"), cut)
                pending.clear()
                pending_cut = 0

        try:
            while True:
                try:
                    chunk = os.read(fd, 65536)
                except InterruptedError:
                    continue
                self._reading = True
                if not chunk:
                    for line, cut in splitter.finish():
                        pending.append(line)
                        pending_cut += cut
                    emit_pending()
                    break
                for line, cut in splitter.feed(chunk):
                    # PostgreSQL writes a multi-line message in one write, each line after the
                    # first starting with a tab: one record
                    if not (pending and line.startswith(b"\t")):
                        emit_pending()
                    pending.append(line)
                    pending_cut += cut
                if not splitter.partial:
                    emit_pending()
                self._reading = False
        finally:
            self._reading = False
            os.close(fd)
            self._read_fd = None
            self._queue.put(None)  # blocking: the writer is told to end once it has written all

    def _emit(self, line: str, cut: int) -> None:
        line = redact(line, self.secrets)
        with self._lock:
            self._lines_seen += 1
            self._tail.append((self._lines_seen, line))
            if self._unreported:
                notice = self._format(
                    f"{self._unreported} server log lines dropped: the agent's output was slower "
                    "than the server's log",
                    0,
                    notice=True,
                )
                try:
                    self._queue.put_nowait(notice)
                    self._unreported = 0
                except queue.Full:
                    pass
            try:
                self._queue.put_nowait(self._format(line, cut))
            except queue.Full:
                self.dropped += 1
                self._unreported += 1

    def _format(self, line: str, cut: int, notice: bool = False) -> str:
        if self.destination == "file":
            if notice:
                return f"pgsidecar: {line}"
            return line if not cut else f"{line} [{cut} bytes cut]"
        record: dict[str, Any] = {
            "source": "postgresql",
            "member": self.member,
            "cluster": self.cluster,
            "timestamp": dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z"),
        }
        if notice:
            record.update(level="warning", event="pg_log_dropped", message=line)
        else:
            record.update(parse_line(line))
        if cut:
            record["truncated_bytes"] = cut
        # ASCII: its length is its size in bytes, which the batches of the writer count
        return json.dumps(record, separators=(",", ":"))

    # ------------------------------------------------------------------ the writer thread

    def _write_loop(self) -> None:
        rotating: RotatingLines | None = None
        carry: str | None = None
        ended = False
        while not ended:
            # what is waiting goes out together: one write per batch keeps up with a burst
            batch = [carry if carry is not None else self._queue.get()]
            carry = None
            size = len(batch[0] or "")
            while batch[-1] is not None:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None and size + len(item) + 1 > self._batch_bytes:
                    carry = item  # the first of the next batch
                    break
                batch.append(item)
                size += len(item or "") + 1
            ended = batch[-1] is None
            lines = [line for line in batch if line is not None]
            try:
                if not lines:
                    pass
                elif self.destination == "file":
                    if rotating is None:
                        rotating = RotatingLines(self.path, self.max_bytes, self.backups)
                    rotating.write("\n".join(lines))
                else:
                    _write_all(self.out_fd, ("\n".join(lines) + "\n").encode())
            except (OSError, ValueError):
                with self._lock:
                    self.dropped += len(lines)
            finally:
                for _ in batch:
                    self._queue.task_done()
        if rotating is not None:
            rotating.close()


class ServerLogMetrics:
    """A collector for the agent's /metrics registry: the server log lines it dropped."""

    def __init__(self, server_log: ServerLog) -> None:
        self.server_log = server_log

    def collect(self) -> Iterable[CounterMetricFamily]:
        yield CounterMetricFamily(
            "pgsidecar_postgresql_log_dropped",
            "PostgreSQL log lines the agent dropped: its output could not keep up, or failed",
            value=self.server_log.dropped,
        )


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
