"""Where records go. A sink never blocks a transition: ``emit`` only enqueues (or appends to a
local file opened in append mode), and the slow part, if any, runs in the sink's own task.

Implementations: JournalSink (append-only JSON lines in the member's state dir), LogSink (the
structured log), and events.kafka.KafkaSink (the audit stream). The readers of what they wrote
are here too: ``read_journal`` and ``merge_by_time`` (the order of a cluster's records).
"""

from __future__ import annotations

import abc
import collections
import heapq
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fsm.records import Record


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
    transition is on disk before its effects run; input records are flushed without fsync."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the agent's life

    def emit(self, record: Record) -> None:
        self._fh.write(json.dumps(record.to_dict(), separators=(",", ":"), sort_keys=True) + "\n")
        self._fh.flush()
        if record.kind == "transition":
            os.fsync(self._fh.fileno())

    async def close(self) -> None:
        self._fh.close()


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
    """Read a journal; returns (records, skipped) where skipped = [(line number, reason)]."""
    records: list[Record] = []
    skipped: list[tuple[int, str]] = []
    seen: set[tuple[str, int]] = set()
    with open(path, encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = Record.from_dict(json.loads(line))
            except (ValueError, json.JSONDecodeError) as exc:
                skipped.append((lineno, str(exc)))
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
