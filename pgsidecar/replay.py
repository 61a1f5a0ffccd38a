"""Deterministic replay: feed a node's recorded inputs to a fresh machine whose effects only
record, and compare the transitions it makes with the recorded ones.

Each agent run starts with a ``start`` input; the replayed machine is reset there (a fresh role
machine in ``init`` and an empty snapshot), exactly as a restarted agent starts. Comparison is
on (from, to, trigger) in order; a divergence is reported with the inputs that led to it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fsm.inputs import Input, step
from fsm.machine import Role
from fsm.records import Record
from fsm.snapshot import Snapshot


@dataclass
class Divergence:
    seq: int | None  # seq of the recorded transition (None: the replay made an extra one)
    expected: tuple[str, str, str] | None
    got: tuple[str, str, str] | None
    inputs: list[dict[str, Any]] = field(default_factory=list)

    def describe(self) -> str:
        e = "->".join(self.expected[:2]) + f" ({self.expected[2]})" if self.expected else "nothing"
        g = "->".join(self.got[:2]) + f" ({self.got[2]})" if self.got else "nothing"
        return f"at seq {self.seq}: recorded {e}, replay made {g}"


@dataclass
class ReplayResult:
    node: str
    inputs: int = 0
    transitions_recorded: int = 0
    transitions_replayed: int = 0
    divergences: list[Divergence] = field(default_factory=list)
    skipped_inputs: int = 0

    @property
    def ok(self) -> bool:
        return not self.divergences


def replay(
    records: list[Record], node: str, from_seq: int | None = None, to_seq: int | None = None
) -> ReplayResult:
    mine = sorted((r for r in records if r.node == node), key=lambda r: r.seq)
    res = ReplayResult(node=node)
    # runs: each begins at a "start" input
    role = Role.INIT
    snap = Snapshot(name=node)
    pending_inputs: list[dict[str, Any]] = []
    produced: list[tuple[str, str, str]] = []
    recorded: list[tuple[int, tuple[str, str, str]]] = []

    def in_range(seq: int) -> bool:
        return (from_seq is None or seq >= from_seq) and (to_seq is None or seq <= to_seq)

    # Interleave: inputs drive the replay; recorded transitions are matched in order against
    # what the replay produced.
    for rec in mine:
        if rec.kind == "input":
            try:
                inp = Input.from_dict(rec.body)
            except ValueError:
                res.skipped_inputs += 1
                continue
            if inp.type == "start":
                role, snap = Role.INIT, Snapshot(name=node)
                pending_inputs = []
            res.inputs += 1
            pending_inputs.append({"seq": rec.seq, **rec.body})
            snap, taken, _ = step(role, snap, inp)
            for src, d, dest in taken:
                assert d.trigger is not None
                produced.append((src.value, dest.value, d.trigger))
                role = dest
        elif rec.kind == "transition":
            b = rec.body
            recorded.append(
                (rec.seq, (str(b.get("from")), str(b.get("to")), str(b.get("trigger"))))
            )
            # the replay must already have produced this transition (inputs precede it)
            got = produced.pop(0) if produced else None
            if in_range(rec.seq):
                res.transitions_recorded += 1
                if got is not None:
                    res.transitions_replayed += 1
                expected = recorded[-1][1]
                if got != expected:
                    res.divergences.append(Divergence(rec.seq, expected, got, pending_inputs[-10:]))
            pending_inputs = []
    for extra in produced:
        res.divergences.append(Divergence(None, None, extra, pending_inputs[-10:]))
    return res
