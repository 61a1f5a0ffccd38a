"""Sequence numbers and records: every input, transition and action the agent emits goes through
the Recorder, which stamps it (cluster, node, seq, wall time, term) and hands it to every sink."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import structlog

from events.rotation import rotated_files
from events.sinks import Sink
from fsm.inputs import Input
from fsm.records import Record, Transition
from pgsidecar.agent.ports import Clock

log = structlog.get_logger("pgsidecar.agent")

SEQ_BLOCK = 1000


class SeqStore:
    """seq survives restarts: we reserve blocks of SEQ_BLOCK numbers in state.json (fsync'd), so a
    restart continues above anything already used (gaps allowed, never a repeat)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        state: dict[str, Any] = {}
        if path.exists():
            try:
                state = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                state = {}
        self.instance_id: str = state.get("instance_id") or uuid.uuid4().hex
        self._next = max(
            int(state.get("seq_reserved", 0)), _last_journal_seq(path.parent / "journal.jsonl")
        )
        self._reserved = self._next
        self._reserve()

    def _reserve(self) -> None:
        self._reserved = self._next + SEQ_BLOCK
        tmp = self.path.with_suffix(".tmp")
        try:
            with open(tmp, "w") as fh:
                json.dump({"instance_id": self.instance_id, "seq_reserved": self._reserved}, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            # a full disk must not stop the machine: go on in memory; a restart continues above
            # the journal's last seq as well (see __init__)
            log.error("seq_reservation_failed", error=str(exc))

    def next(self) -> int:
        self._next += 1
        if self._next >= self._reserved:
            self._reserve()
        return self._next


def _last_journal_seq(path: Path) -> int:
    """The seq of the journal's last complete line (0 if none): seq must stay above it even if
    a block reservation could not be written. Just after a rotation the journal may be empty:
    its rotated predecessors are looked at too, newest first."""
    for file in reversed(rotated_files(path)):
        seq = _last_seq_in(file)
        if seq:
            return seq
    return 0


def _last_seq_in(path: Path) -> int:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 65536))
            lines = fh.read().splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            seq = json.loads(line).get("seq")
        except (ValueError, AttributeError):
            continue
        if isinstance(seq, int):
            return seq
    return 0


class Recorder:
    """Stamps and fans out records. ``term`` is read at each record (the agent sets it to its
    own view of the current term); ``counters`` are the agent's, served by /status and /metrics.
    A sink that raises is logged and skipped: a sink must never stop the machine."""

    def __init__(
        self,
        cluster: str,
        node: str,
        seqs: SeqStore,
        sinks: Iterable[Sink],
        clock: Clock,
        term: Callable[[], int | None] = lambda: None,
    ) -> None:
        self.cluster = cluster
        self.node = node
        self.seqs = seqs
        self.sinks: list[Sink] = list(sinks)
        self.clock = clock
        self.term = term
        self.counters: dict[str, int] = {"inputs": 0, "transitions": 0, "malformed_dcs_values": 0}

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def emit(self, rec: Record) -> None:
        for sink in self.sinks:
            try:
                sink.emit(rec)
            except Exception as exc:  # a sink must never stop the machine
                log.warning("sink_failed", sink=type(sink).__name__, error=str(exc))

    def next_seq(self) -> int:
        return self.seqs.next()

    def input(self, inp: Input) -> None:
        self.count("inputs")
        self.emit(self._record("input", inp.to_dict()))

    def transition(self, tr: Transition) -> None:
        self.count("transitions")
        # per trigger, for /metrics (pgsidecar_transitions_by_trigger_total{trigger})
        self.count(f"transition:{tr.trigger}")
        self.emit(tr.to_record())

    def action_body(self, body: dict[str, Any]) -> None:
        """An action whose body another component built (the pod killer, the Kafka spool)."""
        self.emit(self._record("action", body))

    def action(self, name: str, outcome: str, started: float, /, **detail: Any) -> None:
        """What an effect did: ``started`` is the clock's monotonic time when it began."""
        self.action_body(
            {
                "name": name,
                "outcome": outcome,
                "duration": round(self.clock.monotonic() - started, 3),
                **detail,
            }
        )

    def spool_dropped(self, body: dict[str, Any]) -> None:
        """The Kafka spool dropped records: counted, and itself recorded with our own seq."""
        self.count("spool_dropped", int(body.get("dropped", 0)))
        self.action_body(body)

    def _record(self, kind: Any, body: dict[str, Any]) -> Record:
        return Record(
            kind,
            self.cluster,
            self.node,
            self.seqs.next(),
            self.clock.wall(),
            self.term(),
            body,
        )
