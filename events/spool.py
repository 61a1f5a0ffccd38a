"""A bounded, ordered, on-disk spool of records waiting for Kafka.

Why it exists: Kafka is the record, not the authority (ARCHITECTURE.md, "The record stream"). When the broker is
unreachable the agent keeps failing over and keeps recording; those records wait here, in order,
and survive a restart of the agent, until the sink has them acknowledged by the broker.

Layout: ``DIR/seg-<n>.spool`` segment files, appended in order, each a run of entries::

    u32 length | u32 crc32(kind, id, payload) | u8 kind | u64 id | payload (length bytes)

little endian. ``id`` grows by one per append and is never reused, so "acknowledged up to id X"
(``DIR/ack``) says which entries are done. A segment whose entries are all acknowledged is
deleted. A torn or corrupt entry (a crash in the middle of a write) ends its segment: the file is
cut there on load and the rest of that segment is counted in ``corrupt``.

Durability: every entry is written at once, so it survives a crash of the process. With
``fsync="inline"`` (the default), ``transition`` and ``action`` entries are also fsync'd before
``append`` returns; ``input`` entries at most every ``input_fsync_interval`` seconds, or by the next
transition, or by ``sync()``: losing the last fraction of a second of inputs to a power cut is the
price of not fsyncing every probe result. With ``fsync="deferred"`` ``append`` never waits for the
disk: the owner takes ``dirty_handles()`` and fsyncs them in another thread (the Kafka sink does,
so that publishing adds no disk wait to a transition; the member's journal already has the
transition fsync'd).

Bound: the files never hold more than ``max_bytes`` except for transitions. When an append would
go over, a drop pass frees ``max_bytes // 16`` (at least the new entry) by dropping the oldest
``input`` entries first, then the oldest ``action`` entries; ``transition`` entries are never
dropped: if only transitions are left the spool goes over its bound and counts ``overflow``. A new
input (or action) that finds no older input (or action) to evict is itself dropped. Dropped
entries are physically removed by rewriting their segments (write, fsync, rename), so the disk
use really is bounded; the cost, at most one pass over the spool's files, is paid once per
``max_bytes // 16`` bytes of appends while the broker is away.

Not thread-safe: one owner (the sink's event loop) at a time; a lock file keeps out a second
process or a second instance on the same directory.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import itertools
import logging
import os
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from events.privatefiles import make_private_dir, open_private

log = logging.getLogger(__name__)

KINDS: tuple[str, ...] = ("input", "transition", "action")
_CODE = {kind: i for i, kind in enumerate(KINDS)}
_HEADER = struct.Struct("<IIBQ")
_CRC_PREFIX = struct.Struct("<BQ")
_SEG_PREFIX = "seg-"
_SEG_SUFFIX = ".spool"


class SpoolError(RuntimeError):
    """The spool directory cannot be used (locked by another owner, unreadable)."""


@dataclass(frozen=True)
class SpoolEntry:
    id: int
    kind: str
    data: bytes


@dataclass
class SpoolStats:
    appended: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    acked: int = 0
    # entries lost to a torn write or a bad checksum found on load
    corrupt: int = 0
    # appends that went past max_bytes because only transitions were left to drop
    overflow: int = 0
    entries: int = 0
    live_bytes: int = 0
    disk_bytes: int = 0


class _Entry:
    __slots__ = ("id", "kind", "seg", "offset", "size")

    def __init__(self, id: int, kind: int, seg: int, offset: int, size: int) -> None:
        self.id = id
        self.kind = kind
        self.seg = seg
        self.offset = offset
        self.size = size  # header + payload


class _Segment:
    __slots__ = ("no", "path", "fd", "size", "live", "live_bytes", "dirty")

    def __init__(self, no: int, path: Path, fd: int, size: int) -> None:
        self.no = no
        self.path = path
        self.fd = fd
        self.size = size
        self.live = 0
        self.live_bytes = 0
        self.dirty = False


def fsync_and_close(fds: list[int]) -> None:
    """fsync and close descriptors from ``Spool.dirty_handles`` (meant for a worker thread)."""
    for fd in fds:
        try:
            os.fsync(fd)
        except OSError as exc:
            log.error("spool fsync failed: %s", exc)
        finally:
            os.close(fd)


def _seg_name(no: int) -> str:
    return f"{_SEG_PREFIX}{no:012d}{_SEG_SUFFIX}"


def _crc(kind: int, id: int, data: bytes) -> int:
    return zlib.crc32(data, zlib.crc32(_CRC_PREFIX.pack(kind, id)))


class Spool:
    def __init__(
        self,
        directory: Path | str,
        max_bytes: int = 64 * 1024 * 1024,
        *,
        segment_bytes: int | None = None,
        input_fsync_interval: float = 0.2,
        fsync: Literal["inline", "deferred"] = "inline",
    ) -> None:
        if max_bytes < 4096:
            raise ValueError("spool max_bytes must be at least 4096")
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        # small enough that the acknowledged head of the spool is given back soon, large enough
        # that rotation (one fsync of the directory) is rare
        self.segment_bytes = segment_bytes or max(16 * 1024, min(1024 * 1024, max_bytes // 16))
        self._headroom = max(1024, max_bytes // 16)
        self.input_fsync_interval = input_fsync_interval
        self.fsync_mode = fsync
        self._dir_dirty = False
        # the agent's alone: 0700 directory, 0600 files (events/privatefiles.py: why)
        make_private_dir(self.directory)
        self._lock_fd = open_private(self.directory / ".lock", os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise SpoolError(
                f"spool {self.directory} is in use by another sink or process"
            ) from None
        self._segments: dict[int, _Segment] = {}
        self._entries: collections.deque[_Entry] = collections.deque()
        self._next_id = 1
        self._acked_id = 0
        self._last_sync = time.monotonic()
        self._pending_drops: dict[str, int] = dict.fromkeys(KINDS, 0)
        self.stats = SpoolStats()
        self._closed = False
        self._load()

    # ----------------------------------------------------------------- loading

    def _load(self) -> None:
        for tmp in self.directory.glob("*.tmp"):
            tmp.unlink()  # a compaction that crashed before its rename
        with contextlib.suppress(OSError, ValueError):
            self._acked_id = int((self.directory / "ack").read_text().strip() or 0)
        max_id = self._acked_id
        paths = []
        for p in self.directory.glob(f"{_SEG_PREFIX}*{_SEG_SUFFIX}"):
            with contextlib.suppress(ValueError):
                paths.append((int(p.name[len(_SEG_PREFIX) : -len(_SEG_SUFFIX)]), p))
        paths.sort()
        for no, path in paths:
            fd = open_private(path, os.O_RDWR | os.O_APPEND)
            seg = _Segment(no, path, fd, 0)
            self._segments[no] = seg
            with open(path, "rb", buffering=0) as fh:
                buf = fh.read()
            pos = 0
            while pos < len(buf):
                bad = None
                if len(buf) - pos < _HEADER.size:
                    bad = "torn header"
                else:
                    length, crc, kind, eid = _HEADER.unpack_from(buf, pos)
                    end = pos + _HEADER.size + length
                    if end > len(buf):
                        bad = "torn payload"
                    elif kind >= len(KINDS):
                        bad = f"unknown kind {kind}"
                    elif eid <= max_id and eid > self._acked_id:
                        bad = f"id {eid} out of order"
                    elif _crc(kind, eid, buf[pos + _HEADER.size : end]) != crc:
                        bad = "bad checksum"
                if bad is not None:
                    # everything after a bad entry in this segment is unreadable: cut it off
                    log.warning(
                        "spool %s: %s at offset %d; dropping the rest of it", path, bad, pos
                    )
                    self.stats.corrupt += 1
                    os.ftruncate(fd, pos)
                    os.fsync(fd)
                    break
                if eid > self._acked_id:
                    self._entries.append(_Entry(eid, kind, no, pos, end - pos))
                    seg.live += 1
                    seg.live_bytes += end - pos
                max_id = max(max_id, eid)
                pos = end
            seg.size = pos
        self._next_id = max_id + 1
        # segments with nothing left to send are done
        for no in list(self._segments)[:-1]:
            if self._segments[no].live == 0:
                self._remove_segment(no)
        if self._segments:
            tail = self._segments[max(self._segments)]
            if tail.live == 0 and tail.size > 0:
                os.ftruncate(tail.fd, 0)
                tail.size = 0
        else:
            self._new_segment(1)
        self._refresh_stats()

    # ----------------------------------------------------------------- segments

    @property
    def _tail(self) -> _Segment:
        return self._segments[next(reversed(self._segments))]

    def _new_segment(self, no: int) -> _Segment:
        path = self.directory / _seg_name(no)
        fd = open_private(path, os.O_RDWR | os.O_CREAT | os.O_APPEND)
        seg = _Segment(no, path, fd, os.fstat(fd).st_size)
        self._segments[no] = seg
        # the new name must be durable before an fsync'd transition in it counts as recorded
        if self.fsync_mode == "inline":
            self._fsync_dir()
        else:
            self._dir_dirty = True
        return seg

    def _remove_segment(self, no: int) -> None:
        seg = self._segments.pop(no)
        os.close(seg.fd)
        with contextlib.suppress(FileNotFoundError):
            seg.path.unlink()

    def _fsync_dir(self) -> None:
        dfd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    # ----------------------------------------------------------------- API

    def append(self, data: bytes, kind: str) -> int | None:
        """Append one record; returns its id, or None if the spool dropped this very record
        (an input or action arriving at a full spool with nothing older of its kind to evict)."""
        if self._closed:
            raise SpoolError("spool is closed")
        code = _CODE[kind]
        size = _HEADER.size + len(data)
        if self.stats.disk_bytes + size > self.max_bytes and not self._make_room(size, code):
            self.stats.dropped[kind] += 1
            self._pending_drops[kind] += 1
            return None
        tail = self._tail
        if tail.size > 0 and tail.size + size > self.segment_bytes:
            if tail.dirty and self.fsync_mode == "inline":
                os.fsync(tail.fd)
                tail.dirty = False
            tail = self._new_segment(tail.no + 1)
        eid = self._next_id
        buf = _HEADER.pack(len(data), _crc(code, eid, data), code, eid) + data
        try:
            written = os.write(tail.fd, buf)
            while written < len(buf):  # regular files rarely write short, but they may
                written += os.write(tail.fd, buf[written:])
        except OSError:
            # leave no half entry behind (disk full): the caller counts the failure
            with contextlib.suppress(OSError):
                os.ftruncate(tail.fd, tail.size)
            raise
        self._next_id += 1
        entry = _Entry(eid, code, tail.no, tail.size, size)
        self._entries.append(entry)
        tail.size += size
        tail.live += 1
        tail.live_bytes += size
        tail.dirty = True
        self.stats.appended[kind] += 1
        self.stats.entries += 1
        self.stats.live_bytes += size
        self.stats.disk_bytes += size
        if self.stats.disk_bytes > self.max_bytes:
            self.stats.overflow += 1
        if self.fsync_mode == "inline":
            now = time.monotonic()
            if code != _CODE["input"] or now - self._last_sync >= self.input_fsync_interval:
                self.sync(now)
        return eid

    def sync(self, now: float | None = None) -> None:
        """fsync what has been appended and not yet fsync'd."""
        for seg in self._segments.values():
            if seg.dirty:
                os.fsync(seg.fd)
                seg.dirty = False
        if self._dir_dirty:
            self._fsync_dir()
            self._dir_dirty = False
        self._last_sync = time.monotonic() if now is None else now

    def dirty_handles(self) -> list[int]:
        """For ``fsync="deferred"``: duplicates of the descriptors with writes not yet fsync'd
        (segments, and the directory after a new segment), marked clean now. The caller fsyncs
        and closes them, from any thread: a duplicate stays valid even if the spool closes or
        deletes the file meanwhile, so there is no race with the owner."""
        fds: list[int] = []
        for seg in self._segments.values():
            if seg.dirty:
                fds.append(os.dup(seg.fd))
                seg.dirty = False
        if self._dir_dirty:
            fds.append(os.open(self.directory, os.O_RDONLY))
            self._dir_dirty = False
        self._last_sync = time.monotonic()
        return fds

    def peek(self, max_records: int = 1000, max_bytes: int = 512 * 1024) -> list[SpoolEntry]:
        """The oldest unacknowledged entries, in order: at least one if any, then as many as fit
        in ``max_records`` and ``max_bytes``."""
        out: list[SpoolEntry] = []
        total = 0
        for e in itertools.islice(self._entries, max_records):
            if out and total + e.size > max_bytes:
                break
            raw = os.pread(self._segments[e.seg].fd, e.size - _HEADER.size, e.offset + _HEADER.size)
            out.append(SpoolEntry(e.id, KINDS[e.kind], raw))
            total += e.size
        return out

    def ack(self, upto_id: int) -> int:
        """Mark every entry with id <= ``upto_id`` as delivered; returns how many that was."""
        n = 0
        entries = self._entries
        while entries and entries[0].id <= upto_id:
            e = entries.popleft()
            seg = self._segments[e.seg]
            seg.live -= 1
            seg.live_bytes -= e.size
            self.stats.live_bytes -= e.size
            n += 1
        if upto_id > self._acked_id:
            self._acked_id = upto_id
            # No fsync: a lost ack only means records are sent again, and consumers drop
            # duplicates by (node, seq).
            tmp = self.directory / "ack.tmp"
            fd = open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            try:
                os.write(fd, str(upto_id).encode())
            finally:
                os.close(fd)
            os.replace(tmp, self.directory / "ack")
        tail_no = self._tail.no
        for no in list(self._segments):
            seg = self._segments[no]
            if seg.live > 0:
                break
            if no != tail_no:
                self.stats.disk_bytes -= seg.size
                self._remove_segment(no)
            elif seg.size > 0:
                # everything is delivered: start the tail over instead of growing it
                os.ftruncate(seg.fd, 0)
                self.stats.disk_bytes -= seg.size
                seg.size = 0
                seg.dirty = False
        self.stats.acked += n
        self.stats.entries -= n
        return n

    def take_drops(self) -> dict[str, int]:
        """Drops since the last call, by kind (only kinds with drops); resets the tally."""
        out = {k: v for k, v in self._pending_drops.items() if v}
        self._pending_drops = dict.fromkeys(KINDS, 0)
        return out

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def last_id(self) -> int:
        """Id of the newest entry ever appended (0 if none)."""
        return self._next_id - 1

    def close(self) -> None:
        if self._closed:
            return
        self.sync()
        for seg in self._segments.values():
            os.close(seg.fd)
        self._segments.clear()
        os.close(self._lock_fd)
        self._closed = True

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- dropping

    def _make_room(self, size: int, code: int) -> bool:
        """Free space for an entry of ``size`` bytes of kind ``code``; False if the new entry is
        to be dropped instead (see the module doc for the rules)."""
        target = self.max_bytes - size - self._headroom
        # bytes already delivered but still in a segment file come back by rewriting it
        dead = self.stats.disk_bytes - self.stats.live_bytes
        need = self.stats.disk_bytes - dead - max(target, 0)
        # an input evicts only older inputs; an action or a transition evicts inputs, then actions
        order = [_CODE["input"]] if code == _CODE["input"] else [_CODE["input"], _CODE["action"]]
        victims: set[int] = set()
        freed = 0
        if need > 0:
            for victim_kind in order:
                for e in self._entries:
                    if freed >= need:
                        break
                    if e.kind == victim_kind:
                        victims.add(e.id)
                        freed += e.size
                if freed >= need:
                    break
        # the new entry must fit under max_bytes (not just under target) to be taken
        fits = self.stats.disk_bytes - dead - freed + size <= self.max_bytes
        if not fits and code != _CODE["transition"]:
            return False
        if not victims and dead == 0:
            return True  # a transition over the bound with nothing to free: overflow
        self._compact(victims)
        return True

    def _compact(self, victims: set[int]) -> None:
        by_seg: dict[int, list[_Entry]] = {no: [] for no in self._segments}
        kept: collections.deque[_Entry] = collections.deque()
        for e in self._entries:
            if e.id in victims:
                kind = KINDS[e.kind]
                self.stats.dropped[kind] += 1
                self._pending_drops[kind] += 1
                self.stats.entries -= 1
                self.stats.live_bytes -= e.size
            else:
                kept.append(e)
                by_seg[e.seg].append(e)
        if victims:
            log.warning("spool %s full: dropped %d records", self.directory, len(victims))
        self._entries = kept
        tail_no = self._tail.no
        changed = False
        for no, live in by_seg.items():
            seg = self._segments[no]
            live_bytes = sum(e.size for e in live)
            if live_bytes == seg.size:
                continue  # nothing to reclaim in this one
            changed = True
            self.stats.disk_bytes -= seg.size
            if not live and no != tail_no:
                self._remove_segment(no)
                continue
            self._rewrite(seg, live)
            self.stats.disk_bytes += seg.size
        if changed:
            self._fsync_dir()

    def _rewrite(self, seg: _Segment, live: list[_Entry]) -> None:
        """Replace ``seg`` by a copy holding only ``live``: write a temp file, fsync, rename, so a
        crash leaves either the old file or the new one."""
        tmp = seg.path.with_suffix(".tmp")
        chunks = [os.pread(seg.fd, e.size, e.offset) for e in live]
        fd = open_private(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND)
        try:
            if chunks:
                data = b"".join(chunks)
                written = 0
                while written < len(data):
                    written += os.write(fd, data[written:])
            os.fsync(fd)
            os.replace(tmp, seg.path)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(seg.fd)
        # the same O_APPEND descriptor serves a tail (appends) and a sealed segment (preads)
        seg.fd = fd
        pos = 0
        for e in live:
            e.offset = pos
            pos += e.size
        seg.size = pos
        seg.live = len(live)
        seg.live_bytes = pos
        seg.dirty = False

    def _refresh_stats(self) -> None:
        self.stats.entries = len(self._entries)
        self.stats.live_bytes = sum(e.size for e in self._entries)
        self.stats.disk_bytes = sum(s.size for s in self._segments.values())
