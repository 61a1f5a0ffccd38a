"""Scheduled backups, exactly once per slot however many members there are: which slot is due,
and whether this member may claim it. Pure: no clock, no I/O (the agent's BackupScheduler reads
the records and the time and writes the claims).

Each backup type has one record in the DCS, ``backup/<type>``: the newest slot of that type a
member claimed, who claimed it (member name and agent pid) and how it went (``running``, ``ok``,
``failed``), plus the last successful slot, carried from record to record. A member claims a slot
by compare-and-set on the record's modify index, so of members racing for one slot exactly one
writes it; the slot only moves forward, so a slot once claimed is never claimed again, except:

* a slot still ``running`` whose claimer is gone (its member key lapsed with its session, or it
  was restarted: another agent pid) is taken over, within the grace window; its backup died with
  its agent (pgBackRest runs with the agent's death signal), so the slot has no backup yet;
* a slot nobody could claim at its time (every member down) is claimed by the first member back
  while the grace window lasts; older missed slots are skipped, never run late one by one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from pgsidecar.backup.settings import BackupType, Schedule

# a type covers the ones after it: a full slot at the same time as a diff one makes the diff moot
WEIGHT: dict[str, int] = {"full": 0, "diff": 1, "incr": 2}

Decision = Literal["claim", "take_over", "claimed", "newer"]


def slot_text(slot: datetime) -> str:
    """A slot as the record holds it: ISO 8601, UTC, seconds (sorts as time does)."""
    return slot.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_slot(text: Any) -> datetime | None:
    if not isinstance(text, str):
        return None
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        return None


def due_slot(schedule: Schedule, kind: BackupType, now: datetime) -> datetime | None:
    """The slot of ``kind`` to run now: the latest at or before ``now``, if it is no older than
    the grace window."""
    slot = schedule.last_slot(kind, now)
    if slot is None or now - slot > schedule.grace_period:
        return None
    return slot


@dataclass(frozen=True)
class SlotRecord:
    """``backup/<type>`` as read (a malformed field reads as missing)."""

    slot: datetime | None
    member: str | None
    pid: int | None
    state: str | None
    attempt: int
    last_success: dict[str, Any] | None

    @classmethod
    def from_value(cls, value: Mapping[str, Any] | None) -> SlotRecord | None:
        if value is None:
            return None
        pid = value.get("pid")
        attempt = value.get("attempt")
        last = value.get("last_success")
        return cls(
            slot=parse_slot(value.get("slot")),
            member=value.get("member") if isinstance(value.get("member"), str) else None,
            pid=pid if isinstance(pid, int) and not isinstance(pid, bool) else None,
            state=value.get("state") if isinstance(value.get("state"), str) else None,
            attempt=attempt if isinstance(attempt, int) and not isinstance(attempt, bool) else 1,
            last_success=last if isinstance(last, dict) else None,
        )


def claimer_alive(record: SlotRecord, members: Mapping[str, Any]) -> bool:
    """The agent that claimed the record still runs: its member key is there (it lapses with
    the agent's session) and names the same agent pid (a restarted agent has another)."""
    if record.member is None:
        return False
    data = members.get(record.member)
    return isinstance(data, dict) and record.pid is not None and data.get("pid") == record.pid


def running_elsewhere(records: Mapping[str, SlotRecord | None], members: Mapping[str, Any]) -> bool:
    """A scheduled backup of any type is running now on a live member: pgBackRest runs one
    backup of a stanza at a time, so no other slot is claimed meanwhile."""
    return any(
        r is not None and r.state == "running" and claimer_alive(r, members)
        for r in records.values()
    )


def covered(kind: BackupType, slot: datetime, records: Mapping[str, SlotRecord | None]) -> bool:
    """A type that covers ``kind`` has a claimed slot at or after ``slot`` (a full at the diff's
    time, say): this slot's backup would copy nothing that one did not."""
    for other, record in records.items():
        if WEIGHT.get(other, 99) < WEIGHT[kind] and record is not None and record.slot is not None:
            if record.slot >= slot:
                return True
    return False


def decide(record: SlotRecord | None, slot: datetime, members: Mapping[str, Any]) -> Decision:
    """Whether a member may claim ``slot`` given the type's record: ``claim`` (no record, or an
    older slot), ``take_over`` (this slot, still running, its claimer gone), ``claimed`` (this
    slot is someone's, running or finished), ``newer`` (the record is past this slot)."""
    if record is None or record.slot is None or record.slot < slot:
        return "claim"
    if record.slot > slot:
        return "newer"
    if record.state == "running" and not claimer_alive(record, members):
        return "take_over"
    return "claimed"


def claim_value(
    previous: SlotRecord | None,
    kind: BackupType,
    slot: datetime,
    member: str,
    pid: int,
    now: datetime,
) -> dict[str, Any]:
    """The record that claims ``slot`` for ``member``."""
    same_slot = previous is not None and previous.slot == slot
    return {
        "type": kind,
        "slot": slot_text(slot),
        "member": member,
        "pid": pid,
        "state": "running",
        "attempt": previous.attempt + 1 if same_slot and previous is not None else 1,
        "claimed_at": now.timestamp(),
        "last_success": previous.last_success if previous is not None else None,
    }


def finished_value(
    claimed: Mapping[str, Any],
    ok: bool,
    now: datetime,
    *,
    label: str | None = None,
    source: str | None = None,
    error: str | None = None,
) -> dict[str, Any]:
    """The record of a claimed slot once its backup ended."""
    value = {
        **claimed,
        "state": "ok" if ok else "failed",
        "finished_at": now.timestamp(),
        "label": label,
        "source": source,
        "error": error,
    }
    if ok:
        value["last_success"] = {
            "slot": claimed["slot"],
            "finished_at": now.timestamp(),
            "label": label,
            "member": claimed["member"],
        }
    return value
