"""Each node's timeline of roles, from recorded transitions: what ``pgsidecar history`` prints.

Input is a list of Records from ``events.kafka.read_topic`` (the cluster's topic) or
``events.sinks.read_journal`` (one member's journal); only ``transition`` records are used.
Output is a human table (one section per node) or JSON lines. Functions only: the CLI is wired
elsewhere.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from events.sinks import merge_by_time
from fsm.records import Record
from fsm.records import format_lsn as records_format_lsn


@dataclass(frozen=True)
class RoleChange:
    time: float
    node: str
    seq: int
    source: str
    dest: str
    trigger: str
    reason: str
    term: int | None
    timeline: int | None
    lsn: int | None

    @classmethod
    def from_record(cls, r: Record) -> RoleChange:
        b = r.body
        return cls(
            time=r.time,
            node=r.node,
            seq=r.seq,
            source=str(b.get("from", "?")),
            dest=str(b.get("to", "?")),
            trigger=str(b.get("trigger", "")),
            reason=str(b.get("reason", "")),
            term=r.term,
            timeline=_opt_int(b.get("timeline")),
            lsn=_opt_int(b.get("lsn")),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "time": format_time(self.time),
            "ts": self.time,
            "node": self.node,
            "seq": self.seq,
            "from": self.source,
            "to": self.dest,
            "trigger": self.trigger,
            "reason": self.reason,
            "term": self.term,
            "timeline": self.timeline,
            "lsn": format_lsn(self.lsn),
            "lsn_bytes": self.lsn,
        }


def _opt_int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def role_changes(
    records: Iterable[Record], node: str | None = None, since: float | None = None
) -> list[RoleChange]:
    """The transitions among ``records`` (de-duplicated by (node, seq)), optionally of one node
    and from a time on, ordered as ``merge_by_time``."""
    seen: set[tuple[str, int]] = set()
    picked: list[Record] = []
    for r in records:
        if r.kind != "transition" or (node is not None and r.node != node):
            continue
        if since is not None and r.time < since:
            continue
        if (r.node, r.seq) in seen:
            continue
        seen.add((r.node, r.seq))
        picked.append(r)
    return [RoleChange.from_record(r) for r in merge_by_time(picked)]


def format_lsn(lsn: int | None) -> str | None:
    """PostgreSQL's text form of an LSN: 0/3000060."""
    return None if lsn is None else records_format_lsn(lsn)


def format_time(t: float) -> str:
    """UTC, millisecond precision, ISO 8601."""
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


_REL = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)\s*$")


def parse_since(text: str, now: float) -> float:
    """``--since`` for the CLI: epoch seconds ("1700000000"), a relative age ("90s", "10m",
    "2h", "1d", meaning that long before ``now``) or an ISO 8601 time (UTC unless it says)."""
    m = _REL.match(text)
    if m:
        unit = {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
        return now - float(m.group(1)) * unit
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"cannot read --since {text!r}: give epoch seconds, an age like 10m or 2h, "
            "or an ISO 8601 time like 2024-05-01T12:00:00Z"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


def _cell(v: Any) -> str:
    return "-" if v is None or v == "" else str(v)


def format_table(changes: list[RoleChange], skipped: Iterable[Any] = ()) -> str:
    """One section per node, in order of each node's first transition: a heading with the node's
    current role, then its transitions with trigger, term, timeline, LSN and reason."""
    by_node: dict[str, list[RoleChange]] = {}
    for c in changes:
        by_node.setdefault(c.node, []).append(c)
    out: list[str] = []
    head = ("TIME (UTC)", "SEQ", "FROM -> TO", "TRIGGER", "TERM", "TL", "LSN", "REASON")
    for node, rows in by_node.items():
        last = rows[-1]
        out.append(
            f"{node}: {last.dest} since {format_time(last.time)} "
            f"(term {_cell(last.term)}, timeline {_cell(last.timeline)}; "
            f"{len(rows)} transition{'s' if len(rows) != 1 else ''})"
        )
        cells = [
            (
                format_time(c.time),
                str(c.seq),
                f"{c.source} -> {c.dest}",
                _cell(c.trigger),
                _cell(c.term),
                _cell(c.timeline),
                _cell(format_lsn(c.lsn)),
                _cell(c.reason),
            )
            for c in rows
        ]
        widths = [max(len(r[i]) for r in [head, *cells]) for i in range(len(head) - 1)]
        for r in [head, *cells]:
            fixed = [
                r[i].rjust(widths[i]) if i in (1, 4, 5) else r[i].ljust(widths[i])
                for i in range(len(head) - 1)
            ]
            out.append("  " + "  ".join(fixed) + "  " + r[-1])
        out.append("")
    if not by_node:
        out.append("no transitions recorded")
        out.append("")
    skipped = list(skipped)
    if skipped:
        forged = sum(1 for s in skipped if getattr(s, "unauthenticated", False))
        note = f" ({forged} UNAUTHENTICATED: unsigned or forged, not used)" if forged else ""
        out.append(f"{len(skipped)} record{'s' if len(skipped) != 1 else ''} skipped{note}:")
        for s in skipped[:20]:
            out.append(f"  {s}")
        if len(skipped) > 20:
            out.append(f"  ... and {len(skipped) - 20} more")
    return "\n".join(out).rstrip("\n") + "\n"


def format_json_lines(changes: list[RoleChange]) -> str:
    """One JSON object per transition, per line (empty string if none)."""
    return "".join(json.dumps(c.to_json(), sort_keys=True) + "\n" for c in changes)


def format_history(
    records: Iterable[Record],
    *,
    node: str | None = None,
    since: float | None = None,
    as_json: bool = False,
    skipped: Iterable[Any] = (),
) -> str:
    """What ``pgsidecar history`` prints for ``records`` (skipped records are listed after the
    table; in JSON mode the caller reports them on stderr)."""
    changes = role_changes(records, node=node, since=since)
    return format_json_lines(changes) if as_json else format_table(changes, skipped)
