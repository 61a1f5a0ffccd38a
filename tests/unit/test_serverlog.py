"""The server log's path out of PostgreSQL (pgsidecar/postgres/serverlog.py), against a fake
postmaster: a Python child whose stdout and stderr are the pipe, writing as the server does
(``%m [%p] %q%u@%d`` prefixes, a tab before each continuation line, one write per message,
write errors ignored)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from pgsidecar.config import AgentConfig
from pgsidecar.postgres import serverlog
from pgsidecar.postgres.serverlog import REDACTED, LineSplitter, ServerLog, parse_line, redact

SECRET = "s3cr3t-Passw0rd"

# writes like PostgreSQL's write_console: one os.write per message, errors (EAGAIN, EPIPE) ignored
FAKE_POSTMASTER = textwrap.dedent(
    """
    import os, sys
    def say(text):
        try:
            os.write(2, text.encode())
        except OSError:
            pass
    for line in sys.argv[1:]:
        if line.startswith("@burst:"):
            _, n, size = line.split(":")
            for i in range(int(n)):
                say(f"2026-12-03 10:00:00.000 UTC [7] LOG:  burst {i} " + "x" * int(size) + "\\n")
        else:
            say(line.replace("\\\\n", "\\n").replace("\\\\t", "\\t") + "\\n")
    """
)


def run_fake_postmaster(slog: ServerLog, *lines: str, timeout: float = 20.0) -> float:
    """Run the fake with the pipe as its stdout and stderr; returns how long it took."""
    fd = slog.spawn_fd()
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", FAKE_POSTMASTER, *lines],
        stdin=subprocess.DEVNULL,
        stdout=fd,
        stderr=fd,
        timeout=timeout,
        check=True,
    )
    assert proc.returncode == 0
    return time.monotonic() - started


def make_log(tmp_path: Path, out_fd: int, **kw: object) -> ServerLog:
    return ServerLog(
        kw.pop("destination", "stderr"),  # type: ignore[arg-type]
        member="pg-1",
        cluster="pg",
        path=tmp_path / "postgresql.log",
        secrets=[SECRET],
        out_fd=out_fd,
        **kw,  # type: ignore[arg-type]
    )


def read_json_lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def out_file(tmp_path: Path):
    path = tmp_path / "agent-stderr"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    yield path, fd
    os.close(fd)


def test_server_lines_become_json_lines_tagged_with_the_member(
    tmp_path: Path, out_file: tuple[Path, int]
) -> None:
    path, fd = out_file
    slog = make_log(tmp_path, fd)
    run_fake_postmaster(
        slog,
        '2026-12-03 10:00:00.123 UTC [4242] postgres@app ERROR:  relation "nope" does not exist',
        "2026-12-03 10:00:00.124 UTC [4242] postgres@app STATEMENT:  SELECT *\\n\\tFROM nope",
        "2026-12-03 10:00:01.000 UTC [17] LOG:  checkpoint starting: time",
        "a line in no known form",
    )
    assert slog.flush(5)
    slog.close()
    recs = read_json_lines(path)
    assert [r["message"] for r in recs] == [
        'relation "nope" does not exist',
        "SELECT *\n\tFROM nope",  # the continuation line stays with its message
        "checkpoint starting: time",
        "a line in no known form",
    ]
    for r in recs:
        assert (r["source"], r["member"], r["cluster"]) == ("postgresql", "pg-1", "pg")
        assert str(r["timestamp"]).endswith("Z")
    err = recs[0]
    assert (err["level"], err["severity"], err["pid"]) == ("error", "ERROR", 4242)
    assert (err["user"], err["database"], err["log_time"]) == (
        "postgres",
        "app",
        "2026-12-03 10:00:00.123 UTC",
    )
    assert "user" not in recs[2]  # a background process has no session
    assert (recs[2]["level"], recs[3]["level"]) == ("info", "info")
    assert slog.dropped == 0
    assert not (tmp_path / "postgresql.log").exists()  # nothing on disk in this mode


def test_passwords_never_pass(tmp_path: Path, out_file: tuple[Path, int]) -> None:
    path, fd = out_file
    slog = make_log(tmp_path, fd)
    run_fake_postmaster(
        slog,
        "2026-12-03 10:00:00.000 UTC [5] postgres@postgres LOG:  statement: "
        "ALTER ROLE app PASSWORD 'hunter2'",
        "2026-12-03 10:00:00.000 UTC [5] postgres@postgres LOG:  statement: "
        "CREATE ROLE b ENCRYPTED PASSWORD E'it''s'",
        "2026-12-03 10:00:00.000 UTC [6] LOG:  could not connect: host=a password=topsecret",
        f"2026-12-03 10:00:00.000 UTC [6] LOG:  the configured one: {SECRET}",
    )
    assert slog.flush(5)
    text = path.read_text()
    for secret in ("hunter2", "it''s", "topsecret", SECRET):
        assert secret not in text
    assert text.count(REDACTED) == 4
    assert "ALTER ROLE app PASSWORD" in text  # the statement itself is still there
    assert SECRET not in slog.tail(10)  # nor in the tail used in error messages


def test_a_long_line_is_cut_and_says_how_much(tmp_path: Path, out_file: tuple[Path, int]) -> None:
    path, fd = out_file
    slog = make_log(tmp_path, fd, max_line_bytes=1000)
    long_message = "y" * 50_000
    run_fake_postmaster(
        slog,
        f"2026-12-03 10:00:00.000 UTC [9] postgres@db LOG:  {long_message}",
        "2026-12-03 10:00:00.000 UTC [9] postgres@db LOG:  the next line is whole",
    )
    assert slog.flush(5)
    first, second = read_json_lines(path)
    prefix = len("2026-12-03 10:00:00.000 UTC [9] postgres@db LOG:  ")
    assert first["message"] == "y" * (1000 - prefix)
    assert first["truncated_bytes"] == prefix + 50_000 - 1000
    assert second["message"] == "the next line is whole"


def test_a_burst_bigger_than_the_buffer_is_dropped_and_counted_not_waited_for(
    tmp_path: Path,
) -> None:
    # the agent's stderr is a pipe nobody reads yet (a stalled container runtime): the writer
    # thread blocks on it, the queue fills, and the server must go on regardless
    out_r, out_w = os.pipe()
    try:
        slog = make_log(tmp_path, out_w, queue_lines=20)
        elapsed = run_fake_postmaster(slog, "@burst:5000:200", timeout=30)
        assert elapsed < 15  # it ran to the end: never waited for the agent's output
        assert slog.dropped > 0

        # the output drains again: what was queued comes out, then a notice with the count
        received: list[dict[str, object]] = []
        stop = threading.Event()

        def drain() -> None:
            buf = b""
            while not stop.is_set():
                chunk = os.read(out_r, 65536)
                if not chunk:
                    return
                buf += chunk
                *lines, buf = buf.split(b"\n")
                received.extend(json.loads(line) for line in lines)

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        assert slog.flush(20)  # the burst is out (or counted)
        run_fake_postmaster(slog, "2026-12-03 10:00:05.000 UTC [7] LOG:  after the burst")
        assert slog.flush(10)
        deadline = time.monotonic() + 10
        while not (received and received[-1]["message"] == "after the burst"):
            assert time.monotonic() < deadline, "the last line never came out"
            time.sleep(0.01)
        # every drop is told, in a notice put before the next line that gets through
        notices = [r for r in received if r.get("event") == "pg_log_dropped"]
        assert notices and all(n["level"] == "warning" for n in notices)
        told = sum(int(str(n["message"]).split()[0]) for n in notices)
        assert told == slog.dropped
        assert received[-1]["message"] == "after the burst"
        bursts = [r for r in received if str(r["message"]).startswith("burst")]
        assert len(bursts) + slog.dropped <= 5000
        assert len(bursts) >= 20  # the queue's worth at least got through
    finally:
        stop.set()
        slog.close()
        os.close(out_w)
        os.close(out_r)


def test_a_frozen_reader_never_blocks_the_server(tmp_path: Path, monkeypatch) -> None:
    """The agent stopped (SIGSTOP, swap, a stuck GIL) reads nothing: the pipe fills, and the
    server's writes fail (EAGAIN) instead of waiting, because the write end is non-blocking."""
    frozen = threading.Event()
    monkeypatch.setattr(ServerLog, "_read_loop", lambda self, fd: frozen.wait(30))
    slog = make_log(tmp_path, 2)
    try:
        # 8 MiB: far more than the pipe holds (at most 1 MiB)
        elapsed = run_fake_postmaster(slog, "@burst:20000:400", timeout=30)
        assert elapsed < 15
    finally:
        frozen.set()
        slog.close()


def test_file_mode_writes_the_server_lines_redacted_and_rotated(tmp_path: Path) -> None:
    # a queue that holds the whole burst: this is about the files, not about drops
    slog = make_log(
        tmp_path, 2, destination="file", max_bytes=64 * 1024, backups=2, queue_lines=5000
    )
    run_fake_postmaster(slog, f"2026-12-03 10:00:00.000 UTC [6] LOG:  {SECRET}", "@burst:2000:100")
    assert slog.flush(10)
    slog.close()
    files = sorted(p.name for p in tmp_path.glob("postgresql.log*"))
    assert files == ["postgresql.log", "postgresql.log.1", "postgresql.log.2"]
    for p in tmp_path.glob("postgresql.log*"):
        assert p.stat().st_size <= 64 * 1024
        assert p.stat().st_mode & 0o777 == 0o600
        assert SECRET not in p.read_text()
    newest = (tmp_path / "postgresql.log").read_text().splitlines()
    assert newest[-1].startswith("2026-12-03 10:00:00.000 UTC [7] LOG:  burst 1999 ")


def test_write_text_goes_the_same_way_and_tail_starts_at_a_mark(
    tmp_path: Path, out_file: tuple[Path, int]
) -> None:
    path, fd = out_file
    slog = make_log(tmp_path, fd)
    slog.write_text("before\n")
    mark = slog.mark()
    slog.write_text(f"LOG:  single-user mode said {SECRET}\nsecond\n")
    assert slog.flush(5)
    assert slog.tail(10, since=mark) == f"LOG:  single-user mode said {REDACTED}\nsecond"
    assert [r["message"] for r in read_json_lines(path)][-1] == "second"


def test_the_threads_end_when_closed_and_no_process_holds_the_pipe(tmp_path: Path) -> None:
    slog = make_log(tmp_path, 2)
    run_fake_postmaster(slog, "x")
    reader, writer = slog._reader, slog._writer
    assert reader is not None and writer is not None
    slog.close()
    reader.join(5)
    writer.join(5)
    assert not reader.is_alive() and not writer.is_alive()


# ------------------------------------------------------------------ the pure parts


def test_line_splitter_bounds_memory_and_counts_what_it_cut() -> None:
    s = LineSplitter(max_bytes=4)
    assert s.feed(b"ab") == []
    assert s.feed(b"cdefg\nhi\n") == [(b"abcd", 3), (b"hi", 0)]
    assert s.feed(b"xyz") == [] and s.partial
    assert s.finish() == [(b"xyz", 0)]
    assert not s.partial


def test_parse_line_reads_the_agents_prefix() -> None:
    rec = parse_line("2026-12-03 10:00:00 UTC [1] [unknown]@[unknown] FATAL:  no pg_hba.conf entry")
    assert rec == {
        "level": "critical",
        "severity": "FATAL",
        "log_time": "2026-12-03 10:00:00 UTC",
        "pid": 1,
        "user": "[unknown]",
        "database": "[unknown]",
        "message": "no pg_hba.conf entry",
    }
    assert parse_line("2026-12-03 10:00:00 UTC [1] DEBUG2:  x")["level"] == "debug"


@pytest.mark.parametrize(
    ("text", "kept"),
    [
        ("ALTER USER a WITH PASSWORD 'x''y' VALID UNTIL 'infinity'", "VALID UNTIL 'infinity'"),
        ("password = 'a b'", "password = "),
        ("dbname=x password=p@ss host=h", "host=h"),
        ("PASSWORD NULL", "PASSWORD NULL"),
    ],
)
def test_redact(text: str, kept: str) -> None:
    out = redact(text)
    assert kept in out
    for secret in ("x''y", "a b", "p@ss"):
        assert secret not in out


def test_the_pipe_is_non_blocking_on_the_servers_side(tmp_path: Path) -> None:
    import fcntl

    slog = make_log(tmp_path, 2)
    fd = slog.spawn_fd()
    try:
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC  # only the postmaster gets it
        assert serverlog.PIPE_BYTES == 1 << 20
    finally:
        slog.close()


def test_the_setting_forwards_by_default_and_takes_file(tmp_path: Path) -> None:
    def config(**pg: object) -> AgentConfig:
        return AgentConfig.model_validate(
            {
                "name": "pg-1",
                "cluster": "pg",
                "state_dir": str(tmp_path),
                "postgresql": {"data_dir": str(tmp_path / "data"), **pg},
            }
        )

    assert config().postgresql.log_destination == "stderr"
    assert config(log_destination="file").postgresql.log_destination == "file"
    with pytest.raises(ValueError):
        config(log_destination="syslog")
