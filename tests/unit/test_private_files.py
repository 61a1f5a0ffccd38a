"""The agent's files are its own: the state directory 0700, the journal and the Kafka spool 0600,
whatever the umask, and existing files with wider permissions are narrowed. A journal whose last
line was torn by a crash is repaired on open, so the next record is not glued to it and lost."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from events.privatefiles import make_private_dir, open_private
from events.sinks import JournalSink, read_journal
from events.spool import Spool
from fsm.records import Record


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def open_umask() -> Iterator[None]:
    """umask 0: any mode the code does not ask for explicitly would show up as world-readable."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def record(seq: int, kind: str = "transition") -> Record:
    return Record(kind, "pg", "pg-1", seq, 1_700_000_000.0 + seq, 3, {"n": seq})  # type: ignore[arg-type]


def close(sink: JournalSink) -> None:
    asyncio.run(sink.close())


# ------------------------------------------------------------------ state directory


def test_state_dir_is_created_0700(tmp_path: Path, open_umask: None) -> None:
    state = tmp_path / "data" / "agent"
    assert make_private_dir(state) == state
    assert mode(state) == 0o700
    # the parent may be a shared mount point: left with its default mode
    assert mode(tmp_path / "data") == 0o777


def test_existing_state_dir_is_narrowed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state = tmp_path / "agent"
    state.mkdir()
    os.chmod(state, 0o775)
    with caplog.at_level(logging.WARNING):
        make_private_dir(state)
    assert mode(state) == 0o700
    assert "narrowing the permissions" in caplog.text


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_state_dir_can_be_given_to_the_postgres_user(tmp_path: Path) -> None:
    state = tmp_path / "agent"
    state.mkdir(mode=0o755)
    make_private_dir(state, owner=(4321, 4322))
    st = os.stat(state)
    assert (st.st_uid, st.st_gid) == (4321, 4322) and mode(state) == 0o700


def test_open_private_narrows_but_never_widens(tmp_path: Path) -> None:
    wide, narrow = tmp_path / "wide", tmp_path / "narrow"
    wide.write_text("x")
    os.chmod(wide, 0o664)
    narrow.write_text("x")
    os.chmod(narrow, 0o400)
    for p in (wide, narrow):
        os.close(open_private(p, os.O_RDONLY))
    assert mode(wide) == 0o600 and mode(narrow) == 0o400


# ------------------------------------------------------------------ journal


def test_journal_is_0600(tmp_path: Path, open_umask: None) -> None:
    path = make_private_dir(tmp_path / "agent") / "journal.jsonl"
    sink = JournalSink(path)
    sink.emit(record(1))
    close(sink)
    assert mode(path) == 0o600 and mode(path.parent) == 0o700


def test_existing_journal_is_narrowed(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    path.write_text("")
    os.chmod(path, 0o644)
    close(JournalSink(path))
    assert mode(path) == 0o600


def write_records(path: Path, seqs: range) -> bytes:
    text = "".join(
        json.dumps(record(s).to_dict(), separators=(",", ":"), sort_keys=True) + "\n" for s in seqs
    )
    path.write_text(text)
    return text.encode()


def test_torn_last_line_is_cut_and_the_next_record_survives(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "journal.jsonl"
    whole = write_records(path, range(1, 3))
    torn = json.dumps(record(3).to_dict()).encode()[:37]  # a crash in the middle of the write
    with open(path, "ab") as fh:
        fh.write(torn)
    with caplog.at_level(logging.WARNING):
        sink = JournalSink(path)
    assert sink.torn_bytes == len(torn)
    assert "torn last line" in caplog.text and str(len(torn)) in caplog.text
    sink.emit(record(4))
    close(sink)
    assert path.read_bytes().startswith(whole)
    records, skipped = read_journal(path)
    assert [r.seq for r in records] == [1, 2, 4] and skipped == []


def test_whole_last_record_without_newline_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    write_records(path, range(1, 3))
    with open(path, "rb+") as fh:
        fh.truncate(os.path.getsize(path) - 1)  # the record is there, its newline is not
    sink = JournalSink(path)
    assert sink.torn_bytes == 0
    sink.emit(record(3))
    close(sink)
    records, skipped = read_journal(path)
    assert [r.seq for r in records] == [1, 2, 3] and skipped == []


def test_torn_only_line_is_cut(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    path.write_bytes(b'{"kind":"trans')
    sink = JournalSink(path)
    assert sink.torn_bytes == 14
    sink.emit(record(1))
    close(sink)
    records, skipped = read_journal(path)
    assert [r.seq for r in records] == [1] and skipped == []


def test_intact_journal_is_untouched(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    whole = write_records(path, range(1, 4))
    sink = JournalSink(path)
    assert sink.torn_bytes == 0
    close(sink)
    assert path.read_bytes() == whole


# ------------------------------------------------------------------ spool


def test_spool_files_are_private(tmp_path: Path, open_umask: None) -> None:
    directory = tmp_path / "agent" / "spool"
    spool = Spool(directory, max_bytes=64 * 1024, segment_bytes=16 * 1024)
    for _ in range(300):  # enough to roll over to more than one segment
        spool.append(b"x" * 100, "input")
    spool.ack(5)
    spool.close()
    files = list(directory.iterdir())
    assert {p.name for p in files} >= {".lock", "ack"}
    assert len([p for p in files if p.suffix == ".spool"]) > 1
    assert mode(directory) == 0o700
    assert {p.name: mode(p) for p in files} == {p.name: 0o600 for p in files}


def test_spool_narrows_existing_files(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    spool = Spool(directory, max_bytes=64 * 1024)
    spool.append(b"record", "transition")
    spool.close()
    os.chmod(directory, 0o755)
    for p in directory.iterdir():
        os.chmod(p, 0o644)
    spool = Spool(directory, max_bytes=64 * 1024)
    assert [e.data for e in spool.peek(10)] == [b"record"]
    spool.close()
    assert mode(directory) == 0o700
    assert all(mode(p) == 0o600 for p in directory.iterdir())
