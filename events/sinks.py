"""Where records go. A sink never blocks a transition: ``emit`` only enqueues (or appends to a
local file opened in append mode), and the slow part, if any, runs in the sink's own task.

Implementations: JournalSink (append-only JSON lines in the member's state dir, size-bounded and
rotated), LogSink (the structured log), and events.kafka.KafkaSink (the audit stream). The readers
of what they wrote are here too: ``read_journal`` (a journal with its rotated files, as one
stream) and ``merge_by_time`` (the order of a cluster's records).
"""

from __future__ import annotations

import abc
import collections
import heapq
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from events.privatefiles import open_private
from events.rotation import DEFAULT_BACKUPS, DEFAULT_MAX_BYTES, RotatingLines, rotated_files
from fsm import bounded_json
from fsm.records import Record

log = logging.getLogger(__name__)

# how far back from the end the repair looks for the last complete line; a record is far smaller
_TAIL_SCAN = 1 << 20


class Sink(abc.ABC):
    async def start(self) -> None:  # noqa: B027 - optional hook
        """Open connections; must not block the agent if the far end is down."""

    @abc.abstractmethod
    def emit(self, record: Record) -> None:
        """Hand over one record. Never blocks, never raises for a far-end failure."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Flush what can be flushed within a bounded time and close."""


class JournalSink(Sink):
    """Append-only JSON lines file. Each line is flushed and fsync'd for transition records, so a
    transition is on disk before its effects run; input records are flushed without fsync.

    The file is the agent's alone (0600). Its directory, the state directory, is created (0700,
    and given to PostgreSQL's user when the agent runs as root) by the agent before this. A crash in the middle of a write
    can leave a last line without its newline; the next record appended would be glued to it and
    both would be unreadable. So the tail is repaired on open: a torn last line is cut off
    (``torn_bytes`` says how much, and a warning is logged), or, if it is a whole record that only
    lacks its newline, the newline is added.

    The file is rotated (``events.rotation``) when a record would take it past ``max_bytes``:
    ``journal.jsonl.1`` ... ``journal.jsonl.<backups>`` hold the older records, and
    ``read_journal`` reads them all, oldest first."""

    def __init__(
        self, path: Path, max_bytes: int = DEFAULT_MAX_BYTES, backups: int = DEFAULT_BACKUPS
    ) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = open_private(path, os.O_RDWR | os.O_CREAT | os.O_APPEND)
        try:
            self.torn_bytes = _repair_tail(fd, path)
        finally:
            os.close(fd)
        self._file = RotatingLines(path, max_bytes, backups)

    def emit(self, record: Record) -> None:
        self._file.write(json.dumps(record.to_dict(), separators=(",", ":"), sort_keys=True))
        if record.kind == "transition":
            self._file.fsync()

    async def close(self) -> None:
        self._file.close()


def _repair_tail(fd: int, path: Path) -> int:
    """Make the journal end with a newline; returns the number of torn bytes cut off."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return 0
    start = max(0, size - _TAIL_SCAN)
    chunk = os.pread(fd, size - start, start)
    newline = chunk.rfind(b"\n")
    cut = start + newline + 1 if newline >= 0 else start
    if newline < 0 and start > 0:
        # no line end in the last MiB: not a journal this code wrote; leave it to the reader
        log.warning("journal %s: no line end in its last %d bytes; not repaired", path, len(chunk))
        return 0
    tail = chunk[cut - start :]
    try:
        whole = isinstance(json.loads(tail), dict)
    except ValueError:
        whole = False
    if whole:
        # the record was written, only its newline was not
        os.write(fd, b"\n")
        os.fsync(fd)
        log.warning("journal %s: last record had no line end; added one", path)
        return 0
    os.ftruncate(fd, cut)
    os.fsync(fd)
    log.warning(
        "journal %s: cut off a torn last line (%d bytes at offset %d) left by a crash",
        path,
        len(tail),
        cut,
    )
    return len(tail)


class LogSink(Sink):
    def __init__(self, logger: Any) -> None:
        self.log = logger

    def emit(self, record: Record) -> None:
        if record.kind == "transition":
            b = record.body
            self.log.info(
                "transition",
                seq=record.seq,
                source=b["from"],
                dest=b["to"],
                trigger=b["trigger"],
                reason=b["reason"],
                term=record.term,
                timeline=b.get("timeline"),
                lsn=b.get("lsn"),
            )
        elif record.kind == "action":
            self.log.info("action", seq=record.seq, term=record.term, **record.body)


def read_journal(path: Path) -> tuple[list[Record], list[tuple[int, str]]]:
    """Read a journal and its rotated files (``path.<n>`` ... ``path.1``, then ``path``) as one
    stream; returns (records, skipped) where skipped = [(line number, reason)]: the line number
    within its file, and the reason names a rotated file. Raises FileNotFoundError if there is
    no file at all."""
    files = rotated_files(path)
    if not files:
        raise FileNotFoundError(2, "no journal (nor a rotated one)", str(path))
    records: list[Record] = []
    skipped: list[tuple[int, str]] = []
    seen: set[tuple[str, int]] = set()
    for file in files:
        where = "" if file == path else f"{file.name}: "
        with open(file, encoding="utf-8", errors="replace") as fh:
            for lineno, line in enumerate(fh, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = Record.from_dict(bounded_json.loads(line))
                except ValueError as exc:
                    skipped.append((lineno, f"{where}{exc}"))
                    continue
                if (rec.node, rec.seq) in seen:
                    continue
                seen.add((rec.node, rec.seq))
                records.append(rec)
    return records, skipped


def merge_by_time(records: Iterable[Record]) -> list[Record]:
    """Each node's records in seq order, the nodes interleaved by time. A plain sort by time
    would reorder the records of a node whose clock stepped back; seq never does."""
    per_node: dict[str, list[Record]] = collections.defaultdict(list)
    for r in records:
        per_node[r.node].append(r)
    lists = [sorted(rs, key=lambda r: r.seq) for rs in per_node.values()]
    return list(heapq.merge(*lists, key=lambda r: r.time))
