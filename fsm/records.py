"""Records the agent emits: what it observed (input), what it decided (transition), what it did
(action). Plain data, JSON-serialisable, versioned by ``schema``; no I/O here.

Every record carries (cluster, node, seq): seq is monotonic per node and survives restarts, so a
consumer de-duplicates on (node, seq) and orders a node's history by seq.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal


def format_lsn(lsn: int) -> str:
    """PostgreSQL's text form of an LSN (0/3000060): the one formatter of the project."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


SCHEMA = "pgsidecar.record/1"

RecordKind = Literal["input", "transition", "action"]


@dataclass(frozen=True)
class Record:
    kind: RecordKind
    cluster: str
    node: str
    seq: int
    time: float  # wall clock, seconds since the epoch
    term: int | None
    # transition: from/to/trigger/reason/timeline/lsn; input: type + data; action: name/outcome/...
    body: dict[str, Any] = field(default_factory=dict)
    schema: str = SCHEMA

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Record:
        """Strict decode of a record written by this schema version; raises ValueError naming
        the bad field."""
        if not isinstance(data, dict):
            raise ValueError("record is not a JSON object")
        if data.get("schema") != SCHEMA:
            raise ValueError(f"unknown schema {data.get('schema')!r}")
        kind = data.get("kind")
        if kind not in ("input", "transition", "action"):
            raise ValueError(f"unknown kind {kind!r}")
        for name, typ in (("cluster", str), ("node", str), ("seq", int), ("body", dict)):
            value = data.get(name)
            if not isinstance(value, typ) or isinstance(value, bool):
                raise ValueError(f"field {name!r} must be {typ.__name__}")
        t = data.get("time")
        if not isinstance(t, (int, float)) or isinstance(t, bool):
            raise ValueError("field 'time' must be a number")
        term = data.get("term")
        if term is not None and (not isinstance(term, int) or isinstance(term, bool)):
            raise ValueError("field 'term' must be an integer or null")
        return cls(
            kind=kind,
            cluster=data["cluster"],
            node=data["node"],
            seq=data["seq"],
            time=float(t),
            term=term,
            body=data["body"],
        )


@dataclass(frozen=True)
class Transition:
    """One transition of a node's role machine."""

    cluster: str
    node: str
    seq: int
    time: float
    source: str
    dest: str
    trigger: str
    reason: str
    term: int | None
    timeline: int | None
    lsn: int | None

    def to_record(self) -> Record:
        return Record(
            kind="transition",
            cluster=self.cluster,
            node=self.node,
            seq=self.seq,
            time=self.time,
            term=self.term,
            body={
                "from": self.source,
                "to": self.dest,
                "trigger": self.trigger,
                "reason": self.reason,
                "timeline": self.timeline,
                "lsn": self.lsn,
            },
        )
