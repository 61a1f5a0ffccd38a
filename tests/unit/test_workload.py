"""The clients' loop of the lab's writers (``write_until_stopped``), against stand-in
connections: an error drops the connection and the next attempt makes a new one; the last one is
closed at the end."""

from __future__ import annotations

import threading
from typing import Any

import psycopg
import pytest

from pgsidecar.lab.workload import write_until_stopped


class FakeConnection:
    def __init__(self, number: int) -> None:
        self.number = number
        self.closed = False

    def close(self) -> None:
        self.closed = True


def test_an_error_drops_the_connection_and_the_next_write_gets_a_new_one() -> None:
    stop = threading.Event()
    made: list[FakeConnection] = []
    writes: list[int] = []
    failures: list[str] = []

    def connect() -> Any:
        if len(made) == 1 and not failures:
            raise AssertionError("a new connection before any error")
        conn = FakeConnection(len(made))
        made.append(conn)
        if len(made) == 2:
            raise OSError("connection refused")  # the new master is not up yet
        return conn

    def write(conn: Any) -> None:
        writes.append(conn.number)
        if len(writes) == 2:
            raise psycopg.OperationalError("the server closed the connection")
        if len(writes) == 4:
            stop.set()

    write_until_stopped(
        stop, connect, write, lambda exc: failures.append(type(exc).__name__), error_pause=0
    )
    # connection 0 wrote, failed and was closed; connection 1's connect failed; 2 wrote on
    assert writes == [0, 0, 2, 2]
    assert failures == ["OperationalError", "OSError"]
    assert [c.closed for c in made] == [True, False, True]


def test_an_error_that_is_no_database_error_ends_the_loop() -> None:
    def write(conn: Any) -> None:
        raise ValueError("a bug in the writer")

    with pytest.raises(ValueError, match="a bug in the writer"):
        write_until_stopped(
            threading.Event(), lambda: FakeConnection(0), write, lambda exc: None, error_pause=0
        )
