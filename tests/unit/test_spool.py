"""The on-disk spool: order, restart, torn writes, and the drop rules when it is full."""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from events.spool import Spool, SpoolError


def payload(kind: str, n: int, size: int = 100) -> bytes:
    head = f"{kind}:{n}:".encode()
    return head + b"x" * max(0, size - len(head))


@pytest.fixture
def memory_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory in memory (tmpfs, /dev/shm) where the machine has one, else ``tmp_path``: the
    tests of the drop rules and the random-operation runs fsync hundreds of times, which on a
    shared disk is most of their time and nothing they check (they check order and drops)."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    path = Path(tempfile.mkdtemp(prefix="pgsidecar-spool-", dir=shm))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def drain(spool: Spool) -> list[bytes]:
    out: list[bytes] = []
    while batch := spool.peek(max_records=7):
        out += [e.data for e in batch]
        spool.ack(batch[-1].id)
    return out


def test_order_peek_ack(tmp_path: Path) -> None:
    with Spool(tmp_path, 1 << 20) as sp:
        ids = [sp.append(payload("input", i), "input") for i in range(20)]
        assert ids == list(range(1, 21))
        first = sp.peek(max_records=5)
        assert [e.id for e in first] == [1, 2, 3, 4, 5]
        assert sp.peek(max_records=5) == first  # peek does not consume
        assert sp.ack(3) == 3
        assert [e.id for e in sp.peek(max_records=2)] == [4, 5]
        assert drain(sp) == [payload("input", i) for i in range(3, 20)]
        assert len(sp) == 0
        assert sp.stats.disk_bytes == 0  # everything delivered: the tail starts over
        assert sp.peek() == []


def test_peek_byte_bound_returns_at_least_one(tmp_path: Path) -> None:
    with Spool(tmp_path, 1 << 20) as sp:
        sp.append(b"a" * 5000, "transition")
        sp.append(b"b" * 10, "transition")
        assert len(sp.peek(max_bytes=100)) == 1
        assert len(sp.peek(max_bytes=1 << 20)) == 2


def test_survives_restart(tmp_path: Path) -> None:
    sp = Spool(tmp_path, 1 << 20, segment_bytes=16 * 1024)
    for i in range(300):
        sp.append(
            payload("transition" if i % 10 == 0 else "input", i),
            "transition" if i % 10 == 0 else "input",
        )
    sp.ack(120)
    sp.close()
    sp = Spool(tmp_path, 1 << 20, segment_bytes=16 * 1024)
    assert [e.id for e in sp.peek(max_records=3)] == [121, 122, 123]
    assert len(sp) == 180
    # new ids continue after the old ones, never reused
    assert sp.append(b"new", "input") == 301
    data = drain(sp)
    assert data[0] == payload("transition", 120) and data[-1] == b"new" and len(data) == 181
    sp.close()
    # acknowledged segments were deleted
    assert len(list(tmp_path.glob("seg-*.spool"))) == 1


def test_second_owner_is_refused(tmp_path: Path) -> None:
    with Spool(tmp_path, 1 << 20), pytest.raises(SpoolError, match="in use"):
        Spool(tmp_path, 1 << 20)


def test_torn_tail_is_cut_and_counted(tmp_path: Path) -> None:
    with Spool(tmp_path, 1 << 20) as sp:
        for i in range(5):
            sp.append(payload("transition", i), "transition")
    seg = sorted(tmp_path.glob("seg-*.spool"))[-1]
    size = seg.stat().st_size
    with open(seg, "ab") as fh:  # a crash in the middle of the 6th write
        fh.write(b"\x40\x00\x00\x00\x01\x02")
    with Spool(tmp_path, 1 << 20) as sp:
        assert sp.stats.corrupt == 1
        assert seg.stat().st_size == size
        assert sp.append(b"after", "transition") == 6
        assert drain(sp) == [payload("transition", i) for i in range(5)] + [b"after"]


def test_bad_checksum_cuts_the_rest_of_the_segment(tmp_path: Path) -> None:
    with Spool(tmp_path, 1 << 20) as sp:
        for i in range(5):
            sp.append(payload("transition", i), "transition")
    seg = sorted(tmp_path.glob("seg-*.spool"))[-1]
    raw = bytearray(seg.read_bytes())
    entry = len(raw) // 5
    raw[2 * entry + 30] ^= 0xFF  # flip a byte in the payload of the 3rd entry
    seg.write_bytes(bytes(raw))
    with Spool(tmp_path, 1 << 20) as sp:
        assert sp.stats.corrupt == 1
        assert drain(sp) == [payload("transition", 0), payload("transition", 1)]


def test_full_spool_drops_oldest_inputs_never_transitions(memory_dir: Path) -> None:
    tmp_path = memory_dir
    max_bytes = 16 * 1024
    with Spool(tmp_path, max_bytes, segment_bytes=4096) as sp:
        sent: list[tuple[str, int]] = []
        for i in range(600):
            kind = "transition" if i % 20 == 0 else ("action" if i % 20 == 10 else "input")
            assert sp.append(payload(kind, i), kind) is not None
            sent.append((kind, i))
            assert sp.stats.disk_bytes <= max_bytes
            assert (
                sum(p.stat().st_size for p in tmp_path.glob("seg-*.spool")) == sp.stats.disk_bytes
            )
        st = sp.stats
        assert st.dropped["transition"] == 0
        assert st.dropped["input"] > 0
        assert st.overflow == 0
        drops = sp.take_drops()
        assert drops.get("input") == st.dropped["input"]
        assert sp.take_drops() == {}
        got = drain(sp)
        # every transition is there, in order; what survived of the rest is the newest inputs
        kinds = [g.split(b":")[0].decode() for g in got]
        nums = [int(g.split(b":")[1]) for g in got]
        assert nums == sorted(nums)
        assert [n for k, n in zip(kinds, nums, strict=True) if k == "transition"] == [
            n for k, n in sent if k == "transition"
        ]
        inputs_kept = [n for k, n in zip(kinds, nums, strict=True) if k == "input"]
        all_inputs = [n for k, n in sent if k == "input"]
        assert inputs_kept == all_inputs[-len(inputs_kept) :]
        # actions go only after the inputs: with inputs to spare, none was dropped
        assert st.dropped["action"] == 0


def test_actions_go_after_inputs_and_transitions_overflow(memory_dir: Path) -> None:
    tmp_path = memory_dir
    max_bytes = 8192
    with Spool(tmp_path, max_bytes, segment_bytes=4096) as sp:
        for i in range(40):
            sp.append(payload("input", i), "input")
        for i in range(80):
            sp.append(payload("action", i), "action")
        # the actions pushed out every input first, then the oldest actions
        assert sp.stats.dropped["input"] == 40
        assert sp.stats.dropped["action"] > 0
        kept = drain(sp)
        assert all(k.startswith(b"action:") for k in kept)
        assert kept[-1] == payload("action", 79)
        # only transitions left: they are never dropped, the bound gives way (counted)
        for i in range(120):
            assert sp.append(payload("transition", i), "transition") is not None
        assert sp.stats.overflow > 0
        assert sp.stats.dropped["transition"] == 0
        # an input arriving now finds no older input to evict: the new one is dropped
        before = sp.stats.dropped["input"]
        assert sp.append(payload("input", 999), "input") is None
        assert sp.stats.dropped["input"] == before + 1
        assert drain(sp) == [payload("transition", i) for i in range(120)]


def test_drops_survive_restart(memory_dir: Path) -> None:
    tmp_path = memory_dir
    with Spool(tmp_path, 8192, segment_bytes=4096) as sp:
        for i in range(200):
            kind = "transition" if i % 10 == 0 else "input"
            sp.append(payload(kind, i), kind)
        expected = [e.data for e in sp.peek(max_records=10_000, max_bytes=1 << 30)]
    with Spool(tmp_path, 8192, segment_bytes=4096) as sp:
        assert drain(sp) == expected


@pytest.mark.parametrize("seed", range(6))
def test_random_operations_against_a_model(memory_dir: Path, seed: int) -> None:
    """Random appends, acks, restarts and fills, checked against a plain list."""
    tmp_path = memory_dir
    rng = random.Random(seed)
    max_bytes = 12 * 1024
    sp = Spool(tmp_path, max_bytes, segment_bytes=2048)
    model: list[tuple[int, str, bytes]] = []  # what is live, in order
    transitions: list[bytes] = []
    delivered: list[bytes] = []
    for step in range(1500):
        op = rng.random()
        if op < 0.6:
            kind = rng.choice(["input"] * 6 + ["action"] * 2 + ["transition"])
            data = payload(kind, step, rng.randint(10, 400))
            eid = sp.append(data, kind)
            if eid is not None:
                model.append((eid, kind, data))
            if kind == "transition":
                transitions.append(data)
        elif op < 0.9:
            batch = sp.peek(max_records=rng.randint(1, 30))
            if batch:
                upto = batch[rng.randrange(len(batch))].id
                sp.ack(upto)
                delivered += [e.data for e in batch if e.id <= upto]
        elif op < 0.95:
            sp.close()
            sp = Spool(tmp_path, max_bytes, segment_bytes=2048)
        # live entries are a subsequence of the model: drops only remove, never reorder
        live = {e.id: e.data for e in sp.peek(max_records=100_000, max_bytes=1 << 30)}
        model = [m for m in model if m[0] in live or m[0] > sp.last_id]
        assert [m[0] for m in model] == list(live)
        assert all(live[i] == d for i, _, d in model)
        if sp.stats.overflow == 0:
            assert sp.stats.disk_bytes <= max_bytes
    delivered += drain(sp)
    sp.close()
    # no transition is ever lost, and everything came out in append order
    assert [d for d in delivered if d.startswith(b"transition:")] == transitions
    steps = [int(d.split(b":")[1]) for d in delivered]
    assert steps == sorted(steps)
    assert not any(p.suffix == ".tmp" for p in tmp_path.iterdir())


def test_many_small_inputs_are_cheap(tmp_path: Path) -> None:
    """Appends of inputs are batched-fsync'd: 20 000 of them well within a second or two."""
    import time

    with Spool(tmp_path, 64 << 20) as sp:
        t0 = time.perf_counter()
        for i in range(20_000):
            sp.append(payload("input", i, 200), "input")
        elapsed = time.perf_counter() - t0
        assert len(sp) == 20_000
    assert elapsed < 5.0


def test_deferred_fsync_hands_out_duplicates(tmp_path: Path) -> None:
    """fsync="deferred": append never fsyncs; dirty_handles gives descriptors another thread may
    fsync even after the spool closed or deleted the segment."""
    from events.spool import fsync_and_close

    sp = Spool(tmp_path, 64 * 1024, segment_bytes=4096, fsync="deferred")
    for i in range(100):
        sp.append(payload("transition", i), "transition")
    fds = sp.dirty_handles()
    assert len(fds) >= 2  # several segments, and the directory after a rotation
    assert sp.dirty_handles() == []  # marked clean
    sp.ack(sp.last_id)  # deletes the sealed segments under the duplicates' feet
    sp.close()
    fsync_and_close(fds)
    with Spool(tmp_path, 64 * 1024, fsync="deferred") as sp2:
        assert len(sp2) == 0 and sp2.last_id == 100
