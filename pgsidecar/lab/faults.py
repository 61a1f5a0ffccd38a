"""Fault injection against a real local cluster: `pgsidecar chaos`.

One run = a fresh 3-member cluster (etcd, PostgreSQL 15, the agents), a Writer (sequential ids,
each acknowledged commit recorded with the server that acknowledged it) and a Prober (a write
attempted on every member every ~50 ms) running throughout, one fault, its healing, and the
invariants checked afterwards:

- ``double_writable``: prober rounds in which two members both committed. Must be 0, always.
- ``lost``: acknowledged ids missing on the final master. Must be 0 when the master did not change
  (or in synchronous mode); with synchronous mode off a failover may lose the unreplicated tail,
  which is reported, not failed.
- ``to_writable_s``: from the fault to the first write acknowledged by another member than the
  old master (a failover); without a failover, to the end of the longest write outage after the
  fault (0 when writes never paused for 1 s). ``write_outage_s``: that longest outage.
- ``converge_s``: from healing to one master and every other member a streaming replica.
- ``fencing_margin_s`` (partition of the master, a frozen agent or fence process): the new
  master's first write attempt minus the old master's last acknowledged write, both seen by this
  process; ``fencing_margin_records_s`` the same from the agents' own records (old master's
  fencing, new master's ``won_lease``).
- ``old_last_ack_s`` (the faults that take the old master's lease away without killing it: etcd
  frozen or stopped, its agent frozen): the old master's last acknowledged write after the fault,
  in seconds from the moment it could last have renewed its lease; past the TTL is a violation.
- ``to_writable_after_heal_s``: from the healing (SIGCONT of etcd, say) to the first write
  acknowledged by any member; bounded for the DCS faults (a member must elect a master again after the DCS returns).

Faults and timings are drawn from ``random.Random(seed)`` before anything starts, so a seed
replays the same runs; ``--only K`` replays run K alone. The bootstrap is staged (pg1 first, the
others clone from it) so that the same member is master at the fault in every replay.

Every wait is bounded; everything a run started is stopped by pid (and its namespaces, links and
mounts removed) even when the run fails. ``--keep-dir failed`` keeps a failed run's directory
(agent.log, journal.jsonl, postgresql.log of each member) for the evidence.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import errno
import http.client
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from events.dcs import DCS
from events.rotation import rotated_files
from pgsidecar.config import DEFAULT_TTL
from pgsidecar.lab.local import LocalCluster, LocalClusterError
from pgsidecar.lab.workload import Prober, Writer
from pgsidecar.procutil import free_port_range, pid_alive, read_pid, terminate

# -- the fault classes ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FaultClass:
    name: str
    letter: str
    summary: str
    # (lo, hi) of the fault's duration, from the ttl
    duration: Callable[[float], tuple[float, float]]
    netns: bool = False
    kafka: bool = False
    disk: bool = False
    # the fault is aimed at the master: a new master (or the old one, back) must serve after it
    targets_master: bool = True
    # the old master loses its lease without being killed: it must stop acknowledging writes no
    # later than one TTL after the last moment it could have renewed (``FaultRun.t_lease_ref``)
    lease_fence: bool = False
    # a failover is required (another member master after it) and the first write on another
    # member within this many seconds of the fault (of the DCS's new leader where
    # ``failover_from_dcs_leader``)
    failover_within: Callable[[float], float] | None = None
    # the fault also kills the DCS leader: the failover bound counts from the moment the DCS has
    # a new leader (``RunResult.dcs_leader_s``), since nothing can expire a lease before that and
    # how long the DCS's own election takes is its business, not the agents'
    failover_from_dcs_leader: bool = False
    # some member acknowledges a write within this many seconds of the healing
    writable_after_heal: Callable[[float], float] | None = None
    # the fencing margin (old master's last write before the new master's first) is measured
    fencing_margin: bool = False
    # the old master's agent itself is frozen: its own records of fencing can only be written
    # after the resume, so the margin from the records is reported, not checked
    agent_frozen: bool = False
    # etcd as a cluster of this many members, Kafka as this many brokers (``local up
    # --dcs-members``, ``--kafka-brokers``)
    dcs_members: int = 1
    kafka_brokers: int = 1


FAULTS: dict[str, FaultClass] = {
    f.name: f
    for f in (
        FaultClass(
            "kill-master",
            "a",
            "SIGKILL of the master's agent and its postmaster at once; restarted after the duration",
            lambda ttl: (ttl + 1, ttl + 5),
            # a hard kill costs one TTL (the key must expire), plus the race and the promotion
            failover_within=lambda ttl: ttl + 3,
        ),
        FaultClass(
            "kill-agent",
            "b",
            "SIGKILL of the master's agent alone (its postmaster must die with it); restarted after",
            lambda ttl: (ttl + 1, ttl + 5),
            failover_within=lambda ttl: ttl + 3,
        ),
        FaultClass(
            "pause-master",
            "c",
            "SIGSTOP of the master's postmaster and all its children for longer than the TTL, then SIGCONT",
            lambda ttl: (ttl + 1, ttl + 4),
        ),
        FaultClass(
            "partition-master",
            "d",
            "the master's cluster link down (cut from etcd and the replicas), then up",
            # at least as long as the failover may take: a failover within the bound happened
            # while the old master was still cut off
            lambda ttl: (ttl + 3, 2 * ttl + 3),
            netns=True,
            fencing_margin=True,
            # the key lapses at most one TTL after the cut; the replicas count the stream as
            # alive only while messages arrive (wal_receiver_timeout / 2 + 1 s of silence, less
            # than the 0.75 TTL the key outlives the last renewal), so they race at once: as
            # for a hard kill
            failover_within=lambda ttl: ttl + 3,
        ),
        FaultClass(
            "partition-replica",
            "e",
            "one replica's cluster link down (cut from etcd and the master), then up",
            lambda ttl: (2.0, 2 * ttl),
            netns=True,
            targets_master=False,
        ),
        FaultClass(
            "restart-dcs",
            "f",
            "etcd stopped (SIGTERM) for the duration, then started again on the same data",
            lambda ttl: (0.5, 1.5 * ttl),
            targets_master=False,
            lease_fence=True,
        ),
        FaultClass(
            "kafka-down",
            "g",
            "Kafka broker SIGKILLed, then the master SIGKILLed; member and broker restarted after",
            lambda ttl: (ttl + 1, ttl + 5),
            kafka=True,
        ),
        FaultClass(
            "disk-full",
            "h",
            "a replica's data dir (a 128 MB tmpfs) filled to ENOSPC, then freed",
            lambda ttl: (3.0, 2 * ttl),
            disk=True,
            targets_master=False,
        ),
        FaultClass(
            "freeze-dcs",
            "i",
            "etcd frozen (SIGSTOP, not stopped) for more than 2 x TTL, then SIGCONT",
            lambda ttl: (2 * ttl + 1, 2 * ttl + 3),
            targets_master=False,
            lease_fence=True,
            writable_after_heal=lambda ttl: ttl + 5,
        ),
        FaultClass(
            "stall-dcs-election",
            "j",
            "SIGKILL of the master's agent and postmaster; during the election etcd stalled "
            "(SIGSTOP/SIGCONT, each stall longer than the DCS request timeout) for ~2 x TTL; "
            "then the member restarted",
            lambda ttl: (2 * ttl, 2 * ttl + 2),
            writable_after_heal=lambda ttl: ttl + 5,
        ),
        FaultClass(
            "freeze-agent",
            "k",
            "SIGSTOP of the master's agent process alone (not its postmaster) for 2 x TTL or "
            "more, then SIGCONT",
            lambda ttl: (2 * ttl, 2 * ttl + 2),
            lease_fence=True,
            fencing_margin=True,
            agent_frozen=True,
            # the fence (a process of its own) stops PostgreSQL before the lease ends, so the
            # replicas stop streaming and race once the key expires: as for a hard kill
            failover_within=lambda ttl: ttl + 3,
        ),
        FaultClass(
            "freeze-fence",
            "l",
            "SIGSTOP of the master's fence process alone (its pid in <member dir>/fence.pid) for "
            "2 x TTL or more, then SIGCONT",
            lambda ttl: (2 * ttl, 2 * ttl + 2),
            fencing_margin=True,
        ),
        FaultClass(
            "kill-dcs-leader",
            "m",
            "3-member etcd: SIGKILL of the master's agent and postmaster, then ~1 s later of "
            "the etcd leader (made the member every agent talks to first); both back after",
            lambda ttl: (ttl + 1, ttl + 5),
            dcs_members=3,
            # etcd's new leader renews every lease for a full TTL plus one election timeout (1 s
            # here) when it takes over (the old master's key with them), so the key lapses
            # TTL + 1 s after etcd has its new leader, checked by etcd every 0.5 s; then as after
            # a hard kill. The raft election itself (1-2 s, longer on a split vote) is measured
            # and not charged to the agents: the bound counts from it
            failover_within=lambda ttl: ttl + 3,
            failover_from_dcs_leader=True,
        ),
        FaultClass(
            "partition-dcs-member",
            "n",
            "3-member etcd: one follower (the member every agent talks to first) frozen "
            "(SIGSTOP) while the cluster runs and a switchover happens, then SIGCONT",
            lambda ttl: (2 * ttl + 5, 2 * ttl + 8),
            dcs_members=3,
            targets_master=False,
        ),
        FaultClass(
            "kill-kafka-broker",
            "o",
            "3 Kafka brokers: SIGKILL of the master's agent and postmaster, then ~1 s later of "
            "the broker leading the topic's partition; both back after",
            lambda ttl: (ttl + 1, ttl + 5),
            kafka=True,
            kafka_brokers=3,
            failover_within=lambda ttl: ttl + 3,
        ),
    )
}
BY_LETTER = {f.letter: f.name for f in FAULTS.values()}
TMPFS_SIZE = "128m"
# a write outage shorter than this is ordinary jitter (2 cores, a prober round every ~50 ms)
OUTAGE_MIN = 1.0


def parse_faults(text: str | None) -> list[str]:
    if not text:
        return list(FAULTS)
    out: list[str] = []
    for word in (w.strip() for w in text.split(",")):
        if not word:
            continue
        name = BY_LETTER.get(word, word)
        if name not in FAULTS:
            known = ", ".join(f"{f.letter}={f.name}" for f in FAULTS.values())
            raise ValueError(f"unknown fault {word!r}; known: {known}")
        out.append(name)
    return out


@dataclass(frozen=True)
class RunSpec:
    index: int
    seed: int
    fault: str
    delay: float  # seconds of writes before the fault
    duration: float  # seconds the fault lasts before it is healed
    victim: int  # which replica (0 or 1, of pg2/pg3) for the replica faults
    ttl: float
    synchronous_mode: str = "off"

    @property
    def victim_name(self) -> str:
        return f"pg{2 + self.victim}"


def draw_specs(
    seed: int, runs: int, faults: list[str], ttl: float, synchronous_mode: str = "off"
) -> list[RunSpec]:
    """All runs' faults and timings, drawn before anything starts: a seed replays exactly."""
    rng = random.Random(seed)
    specs = []
    for i in range(runs):
        fault = rng.choice(faults)
        lo, hi = FAULTS[fault].duration(ttl)
        specs.append(
            RunSpec(
                index=i,
                seed=seed,
                fault=fault,
                delay=round(rng.uniform(1.0, 3.0), 2),
                duration=round(rng.uniform(lo, hi), 2),
                victim=rng.randrange(2),
                ttl=ttl,
                synchronous_mode=synchronous_mode,
            )
        )
    return specs


def spec_for(fault: str, ttl: float, seed: int = 0, synchronous_mode: str = "off") -> RunSpec:
    """One run of ``fault`` with timings drawn from ``seed`` (the tests use this)."""
    return draw_specs(seed, 1, [fault], ttl, synchronous_mode)[0]


def dcs_request_timeout(ttl: float) -> float:
    """The etcd client's bound on one request once its session is open, as
    ``events.dcs.etcd.EtcdDCS.timeout`` computes it: a third of the granted lease TTL
    (``ceil(ttl)``, at least etcd's minimum), at most ``MAX_REQUEST_TIMEOUT`` (2 s, which is also
    the bound before any session exists). A stall longer than this makes a request time out on
    the client while etcd, once resumed, may still apply it."""
    from events.dcs.etcd import MAX_REQUEST_TIMEOUT, MIN_LEASE_TTL

    granted = max(MIN_LEASE_TTL, math.ceil(ttl))
    return min(granted / 3.0, MAX_REQUEST_TIMEOUT)


# stall-dcs-election: seconds of service between two stalls, unless a candidate announces its
# position before that (the queued requests are served, the watches deliver, and the election's
# next requests go out)
STALL_GAP = (0.3, 1.0)


def stall_schedule(spec: RunSpec) -> list[tuple[float, float]]:
    """stall-dcs-election: (length, gap after it) of each etcd stall. Each stall is 0.5-1.5 s
    longer than the DCS request timeout (and than 2 s, the timeout before a session exists), each
    gap ``STALL_GAP``; enough stalls that their lengths alone reach ``spec.duration`` (the run
    stops at the first stall that ends ``spec.duration`` or more after the first began, and its
    gaps may be cut short). Drawn from the spec, so a replay stalls alike."""
    timeout = max(dcs_request_timeout(spec.ttl), 2.0)
    rng = random.Random(f"{spec.seed}/{spec.index}/{spec.fault}/stalls")
    out: list[tuple[float, float]] = []
    while sum(length for length, _gap in out) < spec.duration:
        length = round(rng.uniform(timeout + 0.5, timeout + 1.5), 2)
        out.append((length, round(rng.uniform(*STALL_GAP), 2)))
    return out


def fence_pid_file(member_dir: Path) -> Path:
    """Where the agent writes the pid of its separate fence process (pgsidecar/fence.py)."""
    return member_dir / "fence.pid"


def read_fence_pid(member_dir: Path, wait: float = 0.0) -> int:
    """The live pid in ``<member dir>/fence.pid``, waiting up to ``wait`` seconds for it.
    Raises FileNotFoundError naming the file when it does not exist (an agent without a separate
    fence process), LookupError when it names no live process."""
    path = fence_pid_file(member_dir)
    deadline = time.monotonic() + wait
    while True:
        pid = read_pid(path) if path.exists() else None
        if pid and pid_alive(pid):
            return pid
        if time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist (waited {wait:.0f} s): this agent writes no fence.pid, so "
            f"there is no separate fence process to freeze"
        )
    raise LookupError(f"{path} names no running process ({path.read_text().strip()!r})")


# partition-dcs-member: the old master acts on a switchover command within this many seconds of
# its write (the watch resumed on a live member carries it in milliseconds)
SWITCHOVER_SEEN_WITHIN = 2.0


# -- results -------------------------------------------------------------------------------------


@dataclass
class RunResult:
    run: int
    seed: int
    fault: str
    delay: float
    duration: float
    ttl: float
    synchronous_mode: str
    victim: str | None = None
    old_master: str | None = None
    new_master: str | None = None
    to_writable_s: float | None = None
    write_outage_s: float | None = None
    converge_s: float | None = None
    acked: int = 0
    lost: int | None = None
    lost_ids: list[int] = field(default_factory=list)
    double_writable: int = 0
    double_writable_sample: list[Any] = field(default_factory=list)
    probe_rounds: int = 0
    late_old_acks: int | None = None
    fencing_margin_s: float | None = None
    fencing_margin_records_s: float | None = None
    old_writes_after_fence: int | None = None
    old_last_ack_s: float | None = None
    old_acks_after_lease: int | None = None
    to_writable_after_heal_s: float | None = None
    dcs_stalls: list[list[float]] | None = None
    # seconds from the fault until the DCS had a new leader (faults that kill the DCS leader)
    dcs_leader_s: float | None = None
    kafka_missing: int | None = None
    kafka_out_of_order: int | None = None
    thread_deaths: list[str] = field(default_factory=list)
    # what this run left behind after its cleanup (processes, namespaces, links, mounts)
    leftovers: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    skipped: str | None = None
    error: str | None = None
    evidence: list[str] = field(default_factory=list)
    dir: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.skipped is None and not self.violations and self.error is None

    @property
    def failed(self) -> bool:
        """Broke an invariant or could not finish (a skipped run has not failed)."""
        return self.skipped is None and not self.ok

    def to_json(self) -> str:
        d = asdict(self)
        d["ok"] = self.ok
        if not d["evidence"]:
            del d["evidence"]
        return json.dumps(d, default=str)


class Skip(Exception):
    """This machine cannot run the fault (the message says exactly what failed)."""


# -- probes with timestamps ------------------------------------------------------------------------


@dataclass
class TracingProber(Prober):
    """The workload's Prober, also keeping every attempt: (start, end, member, committed), on
    this process's monotonic clock. The fencing margin needs when each write was attempted."""

    trace: list[tuple[float, float, str, bool]] = field(default_factory=list)

    def _try(self, name: str, out: dict[str, bool]) -> None:
        start = time.monotonic()
        super()._try(name, out)
        self.trace.append((start, time.monotonic(), name, bool(out.get(name))))


# -- process helpers -------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(d))
    return out


def _proc_state(pid: int) -> str | None:
    """The process's state letter (``T`` once stopped), None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _pids_under(path: Path) -> list[int]:
    """Processes whose working directory is inside ``path``: etcd, the agents and every
    PostgreSQL process of a cluster under it (PostgreSQL's cwd is its data dir)."""
    root = str(path.resolve())
    me = os.getpid()
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == me:
            continue
        try:
            cwd = os.readlink(f"/proc/{d}/cwd")
        except OSError:
            continue
        if (cwd == root or cwd.startswith(root + "/")) and pid_alive(int(d)):
            found.append(int(d))
    return found


def _kill_all(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)  # a stopped process must not outlive its cleanup
            os.kill(pid, signal.SIGKILL)
    for pid in pids:
        terminate(pid, signal.SIGKILL, timeout=5)


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _run(argv: list[str], timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def _port_base(count: int) -> int:
    """Ports below the ephemeral range: a member port inside it can be held by some outgoing
    connection's local port (a long-lived etcd watch, say), and PostgreSQL then fails to bind
    ("Address already in use"), which has made a bootstrap fail here."""
    low = 32768
    with contextlib.suppress(OSError, ValueError, IndexError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    return free_port_range(count, start=20000, end=max(20000 + 10 * count, low - 1))


def _iso_epoch(ts: str) -> float | None:
    try:
        return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class KeyWatch:
    """Watches the etcd keys under ``prefix`` from this process (a thread reading the v3 JSON
    gateway's watch stream) and hands every batch of events, as (type, key, value) with type
    ``PUT`` or ``DELETE``, to ``on_events`` in that thread; when it returns True the watch ends
    and ``fired_at`` is the monotonic time of that batch. The harness uses it to stall etcd at
    an instant of an election, before the candidates' next writes reach it."""

    def __init__(
        self,
        client_url: str,
        prefix: str,
        on_events: Callable[[list[tuple[str, str, str]]], bool],
    ) -> None:
        self.prefix = prefix
        self.on_events = on_events
        self.fired_at: float | None = None
        self.error: str | None = None
        u = urllib.parse.urlsplit(client_url)
        self._conn = http.client.HTTPConnection(
            u.hostname or "127.0.0.1", u.port or 2379, timeout=5
        )
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-keywatch", daemon=True)

    def start(self, timeout: float = 5.0) -> KeyWatch:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError(f"the watch of {self.prefix} was not created within {timeout} s")
        if self.error:
            raise RuntimeError(f"the watch of {self.prefix} failed: {self.error}")
        return self

    def _run(self) -> None:
        def b64(raw: bytes) -> str:
            return base64.b64encode(raw).decode("ascii")

        def text(v: Any) -> str:
            return base64.b64decode(v or "").decode("utf-8", errors="replace")

        try:
            raw = self.prefix.encode()
            end = raw[:-1] + bytes([raw[-1] + 1])  # the prefix's range end (it ends in "/")
            body = json.dumps({"create_request": {"key": b64(raw), "range_end": b64(end)}})
            self._conn.request("POST", "/v3/watch", body, {"Content-Type": "application/json"})
            resp = self._conn.getresponse()
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {resp.read(200)!r}")
            assert self._conn.sock is not None
            self._conn.sock.settimeout(None)  # a watch is silent until a key changes
            while True:
                line = resp.readline()
                if not line:
                    return
                result = json.loads(line).get("result", {})
                if result.get("created"):
                    self._ready.set()
                events = [
                    (
                        ev.get("type", "PUT"),
                        text(ev.get("kv", {}).get("key")),
                        text(ev.get("kv", {}).get("value")),
                    )
                    for ev in result.get("events", [])
                ]
                if events and self.on_events(events):
                    self.fired_at = time.monotonic()
                    return
        except Exception as exc:  # closed by stop(), or a failure start() reports
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self._ready.set()

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            if self._conn.sock is not None:
                self._conn.sock.shutdown(2)
        with contextlib.suppress(Exception):
            self._conn.close()
        self._thread.join(timeout=5)


def wait_until(pred: Callable[[], Any], timeout: float, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v or time.monotonic() >= deadline:
            return v
        time.sleep(interval)


# -- one run ---------------------------------------------------------------------------------------


class FaultRun:
    """One fault against one fresh cluster. ``execute`` never raises: failures are in the
    result; ``cleanup`` (called by ``execute``) stops everything by pid."""

    # from the healing to one master and every replica streaming and replaying its writes
    converge_timeout = 120.0
    # stall-dcs-election: the first stall begins when the leader key is deleted
    # ("leader_deleted") or when, after that, the first survivor announces its position for the
    # election ("announced": the announcements and the race that follow them meet the stall);
    # an announcement in a gap ends the gap either way.
    # Measured against the agent before the DCS-outage fix (a race either way: the agents and this watch see
    # the same events within milliseconds): the survivors were left stuck in 7 runs of 9 with
    # gaps ended by announcements, in 4 of 9 with only the first stall started by one, in none
    # of 5 with the first stall at the key's deletion and fixed gaps.
    stall_trigger = "announced"

    def __init__(
        self,
        spec: RunSpec,
        base_dir: Path | None = None,
        keep_dir: str = "never",
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.spec = spec
        self.fc = FAULTS[spec.fault]
        self.base_dir = base_dir or Path("/tmp")
        self.keep_dir = keep_dir
        self._log = log or (lambda _msg: None)
        self.result = RunResult(
            run=spec.index,
            seed=spec.seed,
            fault=spec.fault,
            delay=spec.delay,
            duration=spec.duration,
            ttl=spec.ttl,
            synchronous_mode=spec.synchronous_mode,
        )
        self.root: Path | None = None
        self.lc: LocalCluster | None = None
        self.writer: Writer | None = None
        self.prober: TracingProber | None = None
        self.mounts: list[Path] = []
        self.paused: list[int] = []
        self.filler: Path | None = None
        self.t0 = 0.0  # monotonic, the fault
        self.t0_wall = 0.0
        self.t_heal = 0.0
        self.t_end = 0.0
        # the last moment the old master could have sent a successful lease renewal
        self.t_lease_ref = 0.0
        # what the harness did, (monotonic, description), for the evidence
        self.marks: list[tuple[float, str]] = []
        self.port_member: dict[int, str] = {}
        self.pids_seen: set[int] = set()
        # wall = monotonic + offset (records carry wall times, our probes monotonic ones)
        self.offset = time.time() - time.monotonic()

    def log(self, msg: str) -> None:
        self._log(f"[run {self.spec.index} {self.spec.fault}] {msg}")

    # -- driver ----------------------------------------------------------------------------------

    def execute(self) -> RunResult:
        started = time.monotonic()
        r = self.result
        try:
            self.preflight()
            self.setup()
            self.start_cluster()
            self.start_workload()
            getattr(self, "fault_" + self.spec.fault.replace("-", "_"))()
            self.converge()
            self.finish_workload()
            self.check()
        except Skip as exc:
            r.skipped = str(exc)
        except Exception as exc:
            r.error = f"{type(exc).__name__}: {exc}"[:2000]
            self.log(f"error: {r.error}")
        finally:
            try:
                if r.failed:
                    r.evidence = self.evidence()
            except Exception as exc:  # evidence is best effort, cleanup is not
                r.evidence = [f"(evidence unavailable: {exc})"]
            self.cleanup()
            r.seconds = round(time.monotonic() - started, 1)
        return r

    # -- phases ----------------------------------------------------------------------------------

    def preflight(self) -> None:
        if self.fc.netns or self.fc.disk:
            if os.geteuid() != 0:
                raise Skip(f"{self.fc.name} needs root (network namespaces / tmpfs mounts)")
        if self.fc.netns:
            for tool in ("ip", "nsenter"):
                if shutil.which(tool) is None:
                    raise Skip(f"{tool} not found on PATH (iproute2 / util-linux)")
            probe = f"pgsc-probe-{os.getpid()}"
            p = _run(["ip", "netns", "add", probe])
            _run(["ip", "netns", "del", probe])
            if p.returncode != 0:
                raise Skip(f"`ip netns add` refused: {p.stderr.strip()}")
        if self.fc.kafka:
            from pgsidecar.lab.kafka_broker import java_available

            if not java_available():
                raise Skip("Apache Kafka needs Java 17 (apt-get install openjdk-17-jre-headless)")

    def setup(self) -> None:
        self.root = Path(
            tempfile.mkdtemp(prefix=f"pgsc-chaos-{self.spec.fault}-", dir=self.base_dir)
        )
        os.chmod(self.root, 0o755)
        self.result.dir = str(self.root)
        cdir = self.root / "c"
        if self.fc.netns:
            from pgsidecar.lab.netns import NetnsLocalCluster

            self.lc = NetnsLocalCluster(cdir)
        else:
            self.lc = LocalCluster(cdir)
        extra: dict[str, Any] = {}
        if self.spec.synchronous_mode != "off":
            extra["settings.synchronous_mode"] = self.spec.synchronous_mode
        self.lc.create(
            nodes=3,
            ttl=self.spec.ttl,
            extra=extra,
            kafka=self.fc.kafka,
            base_port=_port_base(
                LocalCluster.port_count(
                    3, self.fc.kafka, False, self.fc.dcs_members, self.fc.kafka_brokers
                )
            ),
            dcs_members=self.fc.dcs_members,
            kafka_brokers=self.fc.kafka_brokers,
        )
        self.port_member = {m.pg_port: m.name for m in self.lc.members}
        if self.fc.disk:
            self.mount_tmpfs(self.spec.victim_name)

    def mount_tmpfs(self, name: str) -> None:
        """The member's directory (its pgdata's parent, and its agent's state dir) becomes a
        small tmpfs, before the member first starts."""
        assert self.lc is not None
        d = self.lc.member(name).dir
        saved = {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()}
        p = _run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0755", "tmpfs", str(d)])
        if p.returncode != 0:
            raise Skip(f"mount -t tmpfs -o size={TMPFS_SIZE} on {d} refused: {p.stderr.strip()}")
        self.mounts.append(d)
        for fname, data in saved.items():
            (d / fname).write_bytes(data)
        # the agent's stdout/stderr (agent.log) is not on the data volume, as in a pod where it
        # goes to the container log: a crash must leave its traceback somewhere readable
        assert self.root is not None
        outside = self.root / f"{name}-agent.log"
        outside.touch()
        (d / "agent.log").symlink_to(outside)

    def start_cluster(self) -> None:
        """Staged: pg1 bootstraps and leads, then pg2 and pg3 clone from it. The same member is
        master at the fault in every replay of a seed."""
        lc = self.lc
        assert lc is not None
        if lc.runs_own_dcs:
            lc.start_etcd()
        if self.fc.kafka:
            lc.start_kafka()
        lc.start_member("pg1")
        if not wait_until(lambda: lc.master() == "pg1", 60, 0.2):
            raise LocalClusterError("pg1 did not become master within 60 s of bootstrap")
        for m in lc.members[1:]:
            lc.start_member(m.name)
        lc.wait_healthy(timeout=120)
        if self.spec.synchronous_mode != "off":
            # a synchronous standby not put in force is a failure of the run, never a skip: a
            # regression of synchronous mode must not pass as "skipped"
            try:
                lc.wait_sync(timeout=60)
            except LocalClusterError as exc:
                raise LocalClusterError(
                    f"synchronous mode {self.spec.synchronous_mode} requested but no synchronous "
                    f"standby was put in force: {exc}"
                ) from exc
        self.result.old_master = lc.master()
        self._note_pids()
        self.log(f"cluster up, master {self.result.old_master}")

    def start_workload(self) -> None:
        assert self.lc is not None
        self.writer = Writer(self.lc).start()
        prober = TracingProber(self.lc)
        prober.start()
        self.prober = prober
        time.sleep(self.spec.delay)

    def mark_fault(self) -> None:
        self.t0 = time.monotonic()
        self.t0_wall = self.t0 + self.offset
        self.t_lease_ref = self.t0

    def mark_heal(self) -> None:
        self.t_heal = time.monotonic()

    def note(self, what: str) -> None:
        self.marks.append((time.monotonic(), what))
        self.log(what)

    def converge(self) -> None:
        """Healthy by the API (one master, the others report streaming) and every replica has
        replayed a row written on the master after that: a replica whose timeline forked can
        report "streaming" for an instant each time its WAL receiver retries."""
        assert self.lc is not None
        lc = self.lc
        deadline = time.monotonic() + self.converge_timeout
        last = ""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.result.violations.append("no_convergence")
                self.result.error = f"no convergence within {self.converge_timeout:.0f} s: {last}"[
                    :2000
                ]
                self.log(self.result.error)
                return
            try:
                lc.wait_healthy(timeout=remaining)
                master = lc.master()
                if master is not None:
                    behind = self._replicas_behind(master, min(10.0, remaining))
                    if not behind:
                        break
                    last = f"master {master}; not replaying its writes: {', '.join(behind)}"
            except LocalClusterError as exc:
                last = str(exc)
                if "is not running" in last:
                    # an agent we did not kill has exited: that is a crash, not slowness
                    self.result.violations.append("agent_exited")
                    self.result.error = last[:2000]
                    return
            time.sleep(0.5)
        self.result.converge_s = round(time.monotonic() - self.t_heal, 2)
        self.result.new_master = lc.master()
        self.log(f"converged in {self.result.converge_s} s, master {self.result.new_master}")

    def _replicas_behind(self, master: str, timeout: float) -> list[str]:
        """Write a marker on ``master``; the members that have not replayed it by ``timeout``."""
        assert self.lc is not None
        import psycopg

        marker = f"{os.getpid()}-{time.monotonic_ns()}"
        try:
            with psycopg.connect(self.lc.dsn(master), autocommit=True) as c:
                c.execute("CREATE TABLE IF NOT EXISTS chaos_marker (v text)")
                c.execute("INSERT INTO chaos_marker VALUES (%s)", (marker,))
        except psycopg.Error as exc:
            return [f"{master} (marker write failed: {str(exc).strip()[:100]})"]
        pending = [m.name for m in self.lc.members if m.name != master]
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            for name in list(pending):
                with contextlib.suppress(psycopg.Error):
                    with psycopg.connect(self.lc.dsn(name), autocommit=True) as c:
                        row = c.execute(
                            "SELECT count(*) FROM chaos_marker WHERE v = %s", (marker,)
                        ).fetchone()
                        if row and row[0]:
                            pending.remove(name)
            if pending:
                time.sleep(0.2)
        return pending

    def finish_workload(self) -> None:
        assert self.lc is not None and self.writer is not None and self.prober is not None
        time.sleep(1.0)  # writes on the converged cluster: the outage must have ended
        self.t_end = time.monotonic()
        self.writer.stop()
        self.prober.stop()
        r = self.result
        r.acked = len(self.writer.acked)
        r.probe_rounds = self.prober.rounds
        r.double_writable = len(self.prober.double_writable)
        r.double_writable_sample = [
            [round(t - self.t0_wall, 3), names] for t, names in self.prober.double_writable[:5]
        ]
        if r.new_master is not None:
            try:
                lost = self.writer.lost(self.lc)
                r.lost = len(lost)
                r.lost_ids = lost[:20]
            except Exception as exc:
                r.error = f"could not count lost writes: {exc}"

    # -- the faults ----------------------------------------------------------------------------------

    def _master(self) -> str:
        m = self.result.old_master
        assert m is not None
        return m

    def _wait_new_master(self, old: str, timeout: float) -> str | None:
        assert self.lc is not None
        lc = self.lc

        def new() -> str | None:
            m = lc.master()
            return m if m is not None and m != old else None

        result: str | None = wait_until(new, timeout, 0.1)
        return result

    def _hold(self, until: float) -> None:
        time.sleep(max(0.0, until - time.monotonic()))

    def _for_the_duration(self, inject: Callable[[], None], heal: Callable[[], None]) -> None:
        """The fault: ``inject`` at ``t0``, ``heal`` once the spec's duration has passed since
        (``t_heal``)."""
        self.mark_fault()
        inject()
        self._hold(self.t0 + self.spec.duration)
        self.mark_heal()
        heal()

    def _freeze(self, pid: int, what: str) -> None:
        """SIGSTOP ``pid`` for the spec's duration, then SIGCONT."""
        self.log(f"SIGSTOP {what} (pid {pid}) for {self.spec.duration} s")
        self._for_the_duration(lambda: self._stop(pid, what), lambda: self._resume(pid, what))

    def _kill_master_then(self, old: str, second: Callable[[], None]) -> str | None:
        """SIGKILL of the master's agent and postmaster (``t0``), then ``second`` ~1 s later,
        during the election; the new master, if one comes within TTL + 15 s."""
        assert self.lc is not None
        self.mark_fault()
        self.lc.kill_member(old, postgres=True)
        self.note(f"SIGKILL agent + postmaster of {old}")
        self._hold(self.t0 + 1.0)
        second()
        return self._wait_new_master(old, self.spec.ttl + 15)

    def fault_kill_master(self, postgres: bool = True) -> None:
        lc, old = self.lc, self._master()
        assert lc is not None
        self.log(f"SIGKILL {'agent + postmaster' if postgres else 'agent alone'} of {old}")
        pm = lc.postmaster_pid(old)
        self.mark_fault()
        lc.kill_member(old, postgres=postgres)
        if not postgres and pm is not None:
            # the postmaster must die with its agent (pdeathsig); seen here as a violation if not
            if not wait_until(lambda: not pid_alive(pm), 10, 0.05):
                self.result.violations.append("postmaster_outlived_agent")
        self._wait_new_master(old, self.spec.ttl + 15)
        self._hold(self.t0 + self.spec.duration)
        self.mark_heal()
        lc.start_member(old)

    def fault_kill_agent(self) -> None:
        self.fault_kill_master(postgres=False)

    def fault_pause_master(self) -> None:
        lc, old = self.lc, self._master()
        assert lc is not None
        pm = lc.postmaster_pid(old)
        if pm is None:
            raise LocalClusterError(f"no postmaster pid for {old}")
        self.log(f"SIGSTOP postmaster {pm} of {old} and its children for {self.spec.duration} s")
        self.mark_fault()
        os.kill(pm, signal.SIGSTOP)  # first, so that it forks no new child meanwhile
        self.paused = [pm]
        for _ in range(2):  # a child forked just before the stop is caught by the second pass
            kids = [k for k in _children(pm) if k not in self.paused]
            _signal_all(kids, signal.SIGSTOP)
            self.paused += kids
        self._hold(self.t0 + self.spec.duration)
        self.mark_heal()
        # children first: the postmaster resumes to find its children already running
        _signal_all(self.paused[1:], signal.SIGCONT)
        _signal_all(self.paused[:1], signal.SIGCONT)
        self.paused = []

    def fault_partition_master(self) -> None:
        from pgsidecar.lab.netns import NetnsLocalCluster

        lc, old = self.lc, self._master()
        assert isinstance(lc, NetnsLocalCluster)
        self.log(f"partition {old} for {self.spec.duration} s")
        self._for_the_duration(lambda: lc.partition(old), lambda: lc.heal(old))

    def fault_partition_replica(self) -> None:
        from pgsidecar.lab.netns import NetnsLocalCluster

        lc = self.lc
        assert isinstance(lc, NetnsLocalCluster)
        victim = self.spec.victim_name
        self.result.victim = victim
        self.log(f"partition replica {victim} for {self.spec.duration} s")
        self._for_the_duration(lambda: lc.partition(victim), lambda: lc.heal(victim))

    def fault_restart_dcs(self) -> None:
        lc = self.lc
        assert lc is not None

        def stop_etcd() -> None:
            lc.stop_etcd()
            # etcd shuts down gracefully: a renewal may still have succeeded until it exited
            self.t_lease_ref = time.monotonic()
            self.note(f"etcd exited {self.t_lease_ref - self.t0:.3f} s after SIGTERM")

        self.log(f"etcd down for {self.spec.duration} s")
        self._for_the_duration(stop_etcd, lc.start_etcd)

    def fault_kafka_down(self) -> None:
        lc, old = self.lc, self._master()
        assert lc is not None
        broker = lc.kafka_broker
        self.log(f"broker SIGKILL, then SIGKILL of {old}; both back after {self.spec.duration} s")
        broker.kill()
        time.sleep(0.5)
        self.mark_fault()
        lc.kill_member(old, postgres=True)
        self._wait_new_master(old, self.spec.ttl + 15)
        self._hold(self.t0 + self.spec.duration)
        lc.start_member(old)
        self.mark_heal()
        lc.start_kafka()

    def fault_disk_full(self) -> None:
        lc = self.lc
        assert lc is not None
        victim = self.spec.victim_name
        self.result.victim = victim
        self.filler = lc.member(victim).dir / "filler"
        self.log(f"fill {victim}'s tmpfs for {self.spec.duration} s")
        self.mark_fault()
        chunk = b"\0" * (1 << 20)
        with open(self.filler, "wb") as fh:
            try:
                while True:
                    fh.write(chunk)
                    fh.flush()
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
        free = shutil.disk_usage(self.filler.parent).free
        self.log(f"{victim}'s disk full ({free} bytes free)")
        self._hold(self.t0 + self.spec.duration)
        self.mark_heal()
        self.filler.unlink()
        self.filler = None

    def _stop(self, pid: int, what: str) -> None:
        """SIGSTOP ``pid`` (remembered, so that the cleanup resumes it whatever happens) and wait
        until the kernel shows it stopped."""
        self.paused.append(pid)
        os.kill(pid, signal.SIGSTOP)
        if not wait_until(lambda: _proc_state(pid) in ("T", None), 2.0, 0.01):
            raise RuntimeError(f"{what} (pid {pid}) not stopped 2 s after SIGSTOP")
        self.note(f"SIGSTOP {what} (pid {pid})")

    def _resume(self, pid: int, what: str) -> None:
        with contextlib.suppress(ValueError):
            self.paused.remove(pid)
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            # killed meanwhile: an agent replaces a fence process that stopped answering
            self.note(f"{what} (pid {pid}) is gone: nothing to resume")
            return
        self.note(f"SIGCONT {what} (pid {pid})")

    def _etcd_pid(self) -> int:
        assert self.lc is not None
        pid = self.lc.etcd_pid()
        if pid is None:
            raise LocalClusterError(
                f"etcd is not running (no live pid in {self.lc.dir}/etcd/etcd.pid)"
            )
        return pid

    def fault_freeze_dcs(self) -> None:
        """etcd frozen, not stopped: its sockets stay open, requests hang instead of being
        refused, and on SIGCONT it serves what was queued."""
        self._freeze(self._etcd_pid(), "etcd")

    def fault_stall_dcs_election(self) -> None:
        """The master hard-killed; then, during the election, etcd stalled again and again
        (``stall_schedule``: each stall longer than the DCS request timeout, for about the
        duration). A watch of ours on the cluster's keys starts the first stall the instant the
        first survivor announces its position for the election (``stall_trigger``), and ends a
        gap early, with the next stall, the instant a survivor announces again: the race that
        follows an announcement meets a stall. After the last stall, the killed member is
        restarted once a survivor has acknowledged a write, or when the bound on that has
        passed: the survivors must elect a master on their own."""
        lc, old = self.lc, self._master()
        assert lc is not None
        pid = self._etcd_pid()
        schedule = stall_schedule(self.spec)
        lengths = [x for x, _g in schedule]
        self.log(
            f"SIGKILL agent + postmaster of {old}; then etcd stalls of "
            f"{min(lengths):.2f}-{max(lengths):.2f} s (request timeout "
            f"{dcs_request_timeout(self.spec.ttl):.2f} s) for {self.spec.duration} s"
        )
        base = f"pgsidecar/{lc.cluster}/"
        # the term a candidate names when it announces its position for this election
        term = (lc.api_status(old) or {}).get("term")
        lock = threading.Lock()
        st: dict[str, Any] = {"armed": True, "running": True, "deleted": False, "at": 0.0}
        kicked = threading.Event()

        def stop_etcd(why: str) -> bool:
            """SIGSTOP unless stopped already (either thread); under ``lock``."""
            if not st["running"]:
                return False
            self.paused.append(pid)
            os.kill(pid, signal.SIGSTOP)
            st.update(running=False, at=time.monotonic())
            self.marks.append((st["at"], f"{why}: SIGSTOP etcd (pid {pid})"))
            self.log(f"{why} ({st['at'] - self.t0:.2f} s after the kill): SIGSTOP etcd")
            return True

        def announced(value: str) -> bool:
            with contextlib.suppress(ValueError, AttributeError):
                election = json.loads(value).get("election")
                return election is not None and (term is None or election == term)
            return False

        def on_events(events: list[tuple[str, str, str]]) -> bool:
            why = None
            for kind, key, value in events:
                if key == base + "leader" and kind == "DELETE":
                    st["deleted"] = True
                    if self.stall_trigger == "leader_deleted":
                        why = "the leader key deleted"
                elif (
                    st["deleted"]
                    and kind == "PUT"
                    and key.startswith(base + "members/")
                    and announced(value)
                ):
                    why = f"{key[len(base) :]} announced its position"
            if why is not None:
                with lock:
                    if st["armed"] and stop_etcd(why):
                        kicked.set()
            return False

        url = f"http://127.0.0.1:{lc.meta['etcd']['client_port']}"
        watch = KeyWatch(url, base, on_events).start()
        stalls: list[list[float]] = []
        self.result.dcs_stalls = stalls
        try:
            self.mark_fault()
            lc.kill_member(old, postgres=True)
            self.note(f"SIGKILL agent + postmaster of {old}")
            if not kicked.wait(self.spec.ttl + 5):
                with lock:
                    stop_etcd(f"no announcement within TTL+5 s ({watch.error}): stalling anyway")
            kicked.clear()
            first = st["at"]
            for length, gap in schedule:
                began = st["at"]
                if not wait_until(lambda: _proc_state(pid) in ("T", None), 2.0, 0.01):
                    raise RuntimeError(f"etcd (pid {pid}) not stopped 2 s after SIGSTOP")
                self._hold(began + length)
                last = time.monotonic() - first >= self.spec.duration
                with lock:
                    if last:
                        st["armed"] = False
                        self.mark_heal()
                    os.kill(pid, signal.SIGCONT)
                    self.paused.remove(pid)
                    st["running"] = True
                    self.note(f"SIGCONT etcd (pid {pid})")
                stalls.append([round(began - self.t0, 2), round(time.monotonic() - began, 2)])
                if last:
                    break
                if not kicked.wait(gap):
                    with lock:
                        stop_etcd("the gap is over")
                kicked.clear()
            else:
                raise RuntimeError("stall_schedule drew too few stalls")  # cannot happen
        finally:
            watch.stop()
        # the survivors must elect a master on their own: the killed member, restarted at once,
        # could win and hide survivors stuck in the election (seen: it did)
        bound = self.fc.writable_after_heal
        wait = (bound(self.spec.ttl) if bound else self.spec.ttl) + 2
        if wait_until(lambda: self._first_ack_after(self.t_heal) is not None, wait, 0.05):
            self.note("a survivor acknowledged a write")
        else:
            self.note(f"no write acknowledged in the {wait:.0f} s after the last stall")
        lc.start_member(old)
        self.note(f"{old} restarted")

    def _first_ack_after(self, t: float) -> float | None:
        assert self.writer is not None and self.prober is not None
        acks = [x for x in list(self.writer.ok_times) if x > t]
        acks += [e for _s, e, _n, ok in list(self.prober.trace) if ok and e > t]
        return min(acks) if acks else None

    def fault_freeze_agent(self) -> None:
        """The master's agent process alone frozen (its PostgreSQL runs on): its lease lapses,
        and only a fence that does not depend on the agent's threads can stop PostgreSQL in
        time (pgsidecar/fence.py)."""
        lc, old = self.lc, self._master()
        assert lc is not None
        pid = lc.agent_pid(old)
        if pid is None:
            raise LocalClusterError(f"no agent pid for {old} ({lc.member(old).dir / 'agent.pid'})")
        self._freeze(pid, f"agent of {old}")

    def fault_freeze_fence(self) -> None:
        """The master's separate fence process alone frozen: the agent must notice that its
        fence no longer answers and fence (and give up the lease) itself."""
        lc, old = self.lc, self._master()
        assert lc is not None
        member_dir = lc.member(old).dir
        pid = read_fence_pid(member_dir, wait=10.0)
        if pid in (lc.agent_pid(old), lc.postmaster_pid(old)):
            raise LookupError(
                f"{fence_pid_file(member_dir)} names pid {pid}, the agent or the postmaster of "
                f"{old}, not a separate fence process"
            )
        self._freeze(pid, f"fence process of {old}")

    # -- faults of a DCS or Kafka that runs as a cluster --------------------------------------------

    def _etcd_lead(self, name: str) -> None:
        """Make etcd member ``name`` the raft leader (transfer-leadership, sent to the leader),
        so that a run does not depend on which member the election picked."""
        assert self.lc is not None
        lc = self.lc
        for _ in range(3):
            leader = wait_until(lc.etcd_leader, 10, 0.1)
            if leader is None:
                raise LocalClusterError("the etcd cluster has no leader")
            if leader == name:
                return
            target = (lc.etcd_status(name) or {}).get("header", {}).get("member_id")
            body = json.dumps({"targetID": target}).encode()
            url = f"{lc.etcd_endpoints[[m.name for m in lc.etcd_members].index(leader)]}"
            with contextlib.suppress(OSError):
                req = urllib.request.Request(f"{url}/v3/maintenance/transfer-leadership", data=body)
                with urllib.request.urlopen(req, timeout=5):
                    pass
            wait_until(lambda: lc.etcd_leader() == name, 5, 0.1)
        if lc.etcd_leader() != name:
            raise LocalClusterError(f"etcd member {name} did not become the raft leader")

    def _transitions(self, name: str, trigger: str, after: float) -> list[float]:
        """Wall times of ``name``'s transitions fired by ``trigger`` after ``after`` (wall)."""
        return [
            rec["time"]
            for rec in self._journal(name)
            if rec.get("kind") == "transition"
            and rec["body"].get("trigger") == trigger
            and rec["time"] > after
        ]

    def fault_kill_dcs_leader(self) -> None:
        """The master hard-killed, and ~1 s later, during the election, the etcd leader
        SIGKILLed. The leader is first made the member every agent's client talks to first (the
        first endpoint), so the agents must also move to another endpoint and resume their
        watches there. The survivors must elect a master with the killed member still down."""
        lc, old = self.lc, self._master()
        assert lc is not None
        leader = lc.etcd_members[0].name
        self._etcd_lead(leader)
        self.result.victim = leader
        self.log(
            f"SIGKILL of {old}, then of the etcd leader {leader}; back after {self.spec.duration} s"
        )

        def kill_leader() -> None:
            lc.kill_etcd_member(leader)
            self.note(f"SIGKILL etcd leader {leader}")
            # until the survivors elect a new etcd leader (their status reports the dead one
            # until their election timeout passes), bounded well past etcd's split-vote cases
            deadline = time.monotonic() + 15.0
            while time.monotonic() < deadline and lc.etcd_leader() in (None, leader):
                time.sleep(0.05)
            now_leader = lc.etcd_leader()
            if now_leader not in (None, leader):
                self.result.dcs_leader_s = round(time.monotonic() - self.t0, 2)
                self.note(f"etcd leader now {now_leader}")

        new = self._kill_master_then(old, kill_leader)
        self.note(f"new master {new} with {leader} down" if new else "no new master")
        if new is None:
            self.result.violations.append("no_master_without_dcs_leader")
        self._hold(self.t0 + self.spec.duration)
        self.mark_heal()
        lc.start_etcd_member(leader)
        self.note(f"etcd {leader} restarted")
        lc.start_member(old)

    def fault_partition_dcs_member(self) -> None:
        """One etcd follower frozen (SIGSTOP: its sockets stay open, requests to it hang): the
        member every agent's client talks to first. While it is frozen the master must keep its
        lease (renewals go to another member), and a switchover must complete and the cluster
        converge (the watches resumed on another member deliver the command and the new
        leader) before it is resumed."""
        lc, old = self.lc, self._master()
        assert lc is not None
        frozen = lc.etcd_members[0].name
        self._etcd_lead(lc.etcd_members[1].name)
        pid = lc.etcd_member_pid(frozen)
        if pid is None:
            raise LocalClusterError(f"etcd member {frozen} is not running")
        self.result.victim = frozen
        self.log(
            f"SIGSTOP etcd follower {frozen} for {self.spec.duration} s, a switchover meanwhile"
        )
        self.mark_fault()
        self._stop(pid, f"etcd follower {frozen}")
        # the cluster runs on: the master renews through another member for a while
        self._hold(self.t0 + self.spec.ttl + 1)
        if self._transitions(old, "lease_lost", self.t0_wall):
            self.result.violations.append("lease_lost_during_dcs_partition")
        target = self.spec.victim_name
        t_switch = time.monotonic()
        self.note(f"switchover {old} -> {target} requested")
        written = _request_switchover(lc, target)  # the command is in etcd
        new = self._wait_new_master(old, 2 * self.spec.ttl)
        if new != target:
            self.result.violations.append("switchover_during_dcs_partition")
            self.note(f"no switchover to {target} within {2 * self.spec.ttl:.0f} s (master {new})")
        else:
            self.note(f"{target} master {time.monotonic() - t_switch:.2f} s after the request")
            # the old master's watch delivered the command at once: a watch left on the frozen
            # member would deliver it only after its idle timeout (15 s)
            seen = self._transitions(old, "switchover", self.t0_wall)
            lag = seen[0] - written if seen else None
            self.note(
                f"the master acted on the command {lag:.3f} s after it was written"
                if lag is not None
                else "the master recorded no switchover transition"
            )
            if lag is None or lag > SWITCHOVER_SEEN_WITHIN:
                self.result.violations.append("switchover_seen_late")
            try:
                lc.wait_healthy(timeout=max(5.0, self.t0 + self.spec.duration - time.monotonic()))
                self.note(f"healthy with {frozen} frozen")
            except LocalClusterError as exc:
                self.result.violations.append("no_convergence_during_dcs_partition")
                self.note(f"not healthy with {frozen} frozen: {str(exc)[:300]}")
        self._hold(self.t0 + self.spec.duration)
        self.mark_heal()
        self._resume(pid, f"etcd follower {frozen}")

    def fault_kill_kafka_broker(self) -> None:
        """The master hard-killed, and ~1 s later, while the survivors elect and record it, the
        broker leading the topic's partition SIGKILLed: the agents' producers move to the new
        leader (the other replicas stay in sync: acks=all, min.insync.replicas 2) or spool;
        ``check_kafka`` then finds every journal record on the topic, in order."""
        lc, old = self.lc, self._master()
        assert lc is not None
        from events.kafka import default_topic

        topic = default_topic(lc.cluster)
        brokers = {b.node_id: b for b in lc.kafka_broker_infos}
        leader, replicas, isr = asyncio.run(_partition_state(lc.kafka_bootstrap, topic, 30))
        self.note(f"{topic}: leader broker{leader}, replicas {replicas}, in sync {isr}")
        if leader not in brokers or len(replicas) != len(brokers) or len(isr) != len(brokers):
            # the topic is not what --kafka-brokers promises: every broker a replica, in sync
            raise LocalClusterError(
                f"{topic}: leader {leader}, replicas {replicas}, in sync {isr}; expected all "
                f"of {sorted(brokers)}"
            )
        broker = lc.kafka_brokers[list(brokers).index(leader)]
        self.result.victim = f"broker{leader}"
        self.log(
            f"SIGKILL of {old}, then of broker{leader}; both back after {self.spec.duration} s"
        )

        def kill_broker() -> None:
            broker.kill()
            self.note(f"SIGKILL broker{leader} (the partition's leader)")

        self._kill_master_then(old, kill_broker)
        self._hold(self.t0 + self.spec.duration)
        self.mark_heal()
        # the broker's JVM starts while the member does: a restart takes tens of seconds here
        broker.launch()
        lc.start_member(old)
        broker.wait_serving(timeout=120)
        self.note(f"{old} and broker{leader} restarted")

    # -- measurements and invariants ---------------------------------------------------------------

    def _writes(self) -> list[tuple[float, str]]:
        """(ack time, member) of every acknowledged write: the Writer's and the Prober's."""
        assert self.writer is not None and self.prober is not None
        out = [
            (t, self.port_member.get(p, str(p)))
            for t, p in zip(list(self.writer.ok_times), list(self.writer.ok_ports), strict=False)
        ]
        out += [(end, n) for _s, end, n, ok in list(self.prober.trace) if ok]
        return sorted(out)

    def check(self) -> None:
        r = self.result
        writes = self._writes()
        # the longest write outage from the fault to the end
        before = [t for t, _n in writes if t <= self.t0]
        prev = before[-1] if before else self.t0
        best = (0.0, self.t0, self.t0)
        for t, _n in writes:
            if t <= self.t0:
                continue
            if t - prev > best[0]:
                best = (t - prev, prev, t)
            prev = t
        if self.t_end - prev > best[0]:
            best = (self.t_end - prev, prev, self.t_end)
        r.write_outage_s = round(best[0], 2)
        r.to_writable_s = round(best[2] - self.t0, 2) if best[0] >= OUTAGE_MIN else 0.0
        old = r.old_master
        if self.fc.targets_master and old is not None:
            firsts = [t for t, n in writes if t > self.t0 and n != old]
            if firsts:
                # a failover: the master that serves after the fault is another member. Writes
                # the old one still took after the fault (before it fenced) do not count.
                r.to_writable_s = round(firsts[0] - self.t0, 2)
                r.late_old_acks = sum(
                    1 for t, n in writes if n == old and firsts[0] < t < self.t_heal
                )
        if r.double_writable:
            r.violations.append("double_writable")
        changed = r.new_master is not None and r.new_master != old
        if r.lost and (self.spec.synchronous_mode != "off" or not changed):
            r.violations.append("lost_writes")
        ttl = self.spec.ttl
        # writable again after the healing: the first write any member acknowledged after it
        after = [t for t, _n in writes if t > self.t_heal]
        r.to_writable_after_heal_s = round(after[0] - self.t_heal, 2) if after else None
        bound = self.fc.writable_after_heal
        if bound is not None and (
            r.to_writable_after_heal_s is None or r.to_writable_after_heal_s > bound(ttl)
        ):
            r.violations.append("writable_after_heal")
        if self.fc.lease_fence and old is not None:
            self.lease_fencing(writes)
        within = self.fc.failover_within
        if within is not None and r.converge_s is not None:
            start = 0.0
            if self.fc.failover_from_dcs_leader:
                if r.dcs_leader_s is None:
                    r.violations.append("no_dcs_leader")
                start = r.dcs_leader_s or 0.0
            if r.new_master is None or r.new_master == old:
                r.violations.append("no_failover")
            elif r.to_writable_s is None or r.to_writable_s >= start + within(ttl):
                r.violations.append("slow_failover")
        if self.fc.fencing_margin:
            self.fencing_margin(writes)
        if self.fc.kafka:
            self.check_kafka()
        r.thread_deaths = self.thread_deaths()
        if r.thread_deaths:
            r.violations.append("agent_thread_died")

    def lease_fencing(self, writes: list[tuple[float, str]]) -> None:
        """The old master kept no lease past the TTL: no write it acknowledged between the
        fault and the healing came later than ``t_lease_ref`` + TTL (its last successful renewal
        was sent before ``t_lease_ref``, so its lease ended before that). Acknowledgement times
        are this process's, an upper bound on the commit; the agent fences a margin before the
        lease ends (``Agent._fence_deadline``), which covers that."""
        r = self.result
        old = r.old_master
        olds = [t for t, n in writes if n == old and self.t0 < t < self.t_heal]
        r.old_last_ack_s = round(olds[-1] - self.t_lease_ref, 3) if olds else None
        r.old_acks_after_lease = sum(1 for t in olds if t > self.t_lease_ref + self.spec.ttl)
        if r.old_acks_after_lease:
            r.violations.append("fenced_late")

    def fencing_margin(self, writes: list[tuple[float, str]]) -> None:
        """Only meaningful with a failover (another member wrote after the fault): the old
        master must have stopped writing before the new one started. Writes the old master took
        after its own fencing time are a violation either way."""
        r = self.result
        old = r.old_master
        assert self.prober is not None and self.lc is not None and old is not None
        fence_wall = self._old_master_fence_time(old)
        if fence_wall is not None:
            fence_mono = fence_wall - self.offset
            # until it won the lease again, if it did (a failover is allowed, not required)
            rewon = [
                rec["time"] - self.offset
                for rec in self._journal(old)
                if rec.get("kind") == "transition"
                and rec["body"].get("trigger") == "won_lease"
                and rec["time"] > fence_wall
            ]
            r.old_writes_after_fence = self._committed_after(
                old, fence_mono, min(rewon) if rewon else None
            )
            if r.old_writes_after_fence:
                # it ran PostgreSQL as a primary again after it had fenced itself
                r.violations.append("writes_after_fence")
        new_writes = sorted(
            (s, n) for s, _e, n, ok in list(self.prober.trace) if ok and n != old and s > self.t0
        )
        if not new_writes:
            return  # no failover: the old master kept (or took back) the lease
        first_start, successor = new_writes[0]
        old_acks = [t for t, n in writes if n == old and self.t0 < t < self.t_heal]
        last_old = old_acks[-1] if old_acks else self.t0
        r.fencing_margin_s = round(first_start - last_old, 3)
        if r.fencing_margin_s <= 0:
            r.violations.append("fencing_margin")
        won = [
            rec["time"]
            for rec in self._journal(successor)
            if rec.get("kind") == "transition"
            and rec["body"].get("trigger") == "won_lease"
            and rec["time"] > self.t0_wall
        ]
        if fence_wall is not None and won:
            r.fencing_margin_records_s = round(min(won) - fence_wall, 3)
            if r.fencing_margin_records_s <= 0 and not self.fc.agent_frozen:
                r.violations.append("fencing_margin_records")

    def _committed_after(self, member: str, t: float, until: float | None = None) -> int:
        """Writes ``member`` committed that were *started* after ``t`` (and acknowledged before
        ``until``, if given): a write acknowledged just after ``t`` may have committed just
        before it, one started after it cannot have. The prober records starts; the writer is
        sequential, so its write k started after the acknowledgement of write k-1."""
        assert self.writer is not None and self.prober is not None
        end = math.inf if until is None else until
        n = sum(
            1 for s, e, m, ok in list(self.prober.trace) if ok and m == member and s > t and e < end
        )
        times, ports = list(self.writer.ok_times), list(self.writer.ok_ports)
        for prev, ack, port in zip(times, times[1:], ports[1:], strict=False):
            if prev > t and ack < end and self.port_member.get(port) == member:
                n += 1
        return n

    def _old_master_fence_time(self, name: str) -> float | None:
        """Wall time the old master stopped accepting writes on its own: its watchdog's
        ``fencing_deadline_passed`` or its ``lease_lost`` transition, whichever came first."""
        times: list[float] = []
        for rec in self._journal(name):
            if (
                rec.get("kind") == "transition"
                and rec["body"].get("trigger") == "lease_lost"
                and rec["time"] > self.t0_wall
            ):
                times.append(rec["time"])
                break
        for line in self._log_lines(name):
            if '"fencing_deadline_passed"' in line:
                with contextlib.suppress(ValueError):
                    ts = _iso_epoch(json.loads(line).get("timestamp", ""))
                    if ts is not None and ts > self.t0_wall:
                        times.append(ts)
                        break
        return min(times) if times else None

    def check_kafka(self) -> None:
        """Every record of every member's journal reaches the topic, each node's in seq order."""
        assert self.lc is not None
        r = self.result
        port = self.lc.meta["kafka"]["port"]
        from events.kafka import default_topic

        topic = default_topic(self.lc.cluster)
        deadline = time.monotonic() + 90
        missing = out_of_order = -1
        while time.monotonic() < deadline:
            try:
                raw = asyncio.run(_topic_node_seqs(f"127.0.0.1:{port}", topic, within=30))
            except Exception as exc:
                self.log(f"reading the topic: {exc}")
                time.sleep(2)
                continue
            missing = out_of_order = 0
            for m in self.lc.members:
                on_topic = raw.get(m.name, [])
                journal = {rec["seq"] for rec in self._journal(m.name)}
                missing += len(journal - set(on_topic))
                firsts: list[int] = []
                seen: set[int] = set()
                for s in on_topic:
                    if s not in seen:  # a resend after a crash is a duplicate, not disorder
                        seen.add(s)
                        firsts.append(s)
                out_of_order += sum(1 for a, b in zip(firsts, firsts[1:], strict=False) if b < a)
            if missing == 0:
                break
            time.sleep(2)
        r.kafka_missing, r.kafka_out_of_order = missing, out_of_order
        if missing != 0 or out_of_order != 0:
            r.violations.append("kafka_records")

    def thread_deaths(self) -> list[str]:
        """'Exception in thread' in an agent's log: a thread of the agent (the fencing watchdog,
        say) died; the agent process lives on without it."""
        assert self.lc is not None
        out = []
        for m in self.lc.members:
            lines = self._log_lines(m.name)
            for i, line in enumerate(lines):
                if line.startswith("Exception in thread"):
                    tail = next(
                        (
                            x
                            for x in lines[i + 1 : i + 40]
                            if x and not x.startswith((" ", "Traceback"))
                        ),
                        "",
                    )
                    out.append(f"{m.name}: {line.strip()} {tail.strip()}")
        return out

    # -- evidence ----------------------------------------------------------------------------------

    def _journal(self, name: str) -> list[dict[str, Any]]:
        assert self.lc is not None
        path = self.lc.member(name).dir / "journal.jsonl"
        out = []
        for file in rotated_files(path):  # a rotated journal: its older files first
            with contextlib.suppress(OSError):
                for line in file.read_text(errors="replace").splitlines():
                    with contextlib.suppress(ValueError):
                        rec = json.loads(line)
                        if isinstance(rec, dict) and "time" in rec and "body" in rec:
                            out.append(rec)
        return out

    def _log_lines(self, name: str) -> list[str]:
        assert self.lc is not None
        try:
            return (self.lc.member(name).dir / "agent.log").read_text(errors="replace").splitlines()
        except OSError:
            return []

    def evidence(self, limit: int = 80) -> list[str]:
        """The members' transitions and actions, and the key log events, from a little before
        the fault, on one time line relative to it (seconds)."""
        if self.lc is None or not self.t0_wall:
            return []
        t0 = self.t0_wall
        rows: list[tuple[float, str]] = []
        keys = (
            "fencing_deadline_passed",
            "session_lost",
            "lease_renew_failed",
            "postgres_exited",
            "effect_failed",
            "pg_exited_fenced",
        )
        for m in self.lc.members:
            for rec in self._journal(m.name):
                if rec["time"] < t0 - 2 or rec.get("kind") not in ("transition", "action"):
                    continue
                b = rec["body"]
                if rec["kind"] == "transition":
                    desc = f"{b.get('from')}->{b.get('to')} {b.get('trigger')}: {b.get('reason')}"
                else:
                    desc = f"action {b.get('name')} {b.get('outcome')} {b.get('error', '')}".strip()
                rows.append((rec["time"], f"{m.name} {desc}"))
            last_ts = t0
            for line in self._log_lines(m.name):
                if line.startswith("Exception in thread"):
                    # a traceback has no timestamp: it comes right after the last logged event
                    if last_ts >= t0 - 2:
                        rows.append((last_ts, f"{m.name} LOG {line.strip()}"))
                    continue
                if not line.startswith("{"):
                    continue
                with contextlib.suppress(ValueError):
                    ev = json.loads(line)
                    ts = _iso_epoch(ev.get("timestamp", ""))
                    if ts is None:
                        continue
                    last_ts = ts
                    if ts >= t0 - 2 and ev.get("event") in keys:
                        rows.append(
                            (ts, f"{m.name} LOG {ev.get('event')} {ev.get('error', '')}".strip())
                        )
        if self.prober is not None:
            for t, names in self.prober.double_writable[:5]:
                rows.append((t, f"PROBER both writable: {','.join(names)}"))
        for t, what in self.marks:
            rows.append((t + self.offset, f"HARNESS {what}"))
        rows.sort()
        return [f"{t - t0:+8.3f}s {desc}"[:300] for t, desc in rows[:limit]]

    # -- cleanup -----------------------------------------------------------------------------------

    def cleanup(self) -> None:
        """Everything this run started, by pid; then links, namespaces and mounts; then the dir
        (kept if asked). Each step runs even if an earlier one failed."""
        steps: list[tuple[str, Callable[[], None]]] = [
            ("resume paused", lambda: _signal_all(self.paused, signal.SIGCONT)),
            ("stop writer", lambda: self.writer.stop() if self.writer else None),
            ("stop prober", lambda: self.prober.stop() if self.prober else None),
            ("free disk", lambda: self.filler.unlink() if self.filler else None),
            ("note pids", self._note_pids),
            ("cluster down", self._down),
            ("leftover processes", self._kill_leftovers),
            ("unmount", self._unmount),
            ("remove dir", self._remove_dir),
        ]
        for what, fn in steps:
            try:
                fn()
            except Exception as exc:
                self.log(f"cleanup: {what} failed: {type(exc).__name__}: {exc}")
        try:
            self.result.leftovers = self.leftovers()
        except Exception as exc:
            self.result.leftovers = [f"(could not check: {exc})"]

    def leftovers(self) -> list[str]:
        """This run's own processes, namespaces, links and mounts still there after cleanup
        (only its own: other runs, a colleague's say, may be going on beside it)."""
        if self.root is None:
            return []
        root = str(self.root)
        out = []
        for pid in sorted(self.pids_seen):
            if not pid_alive(pid):
                continue
            try:
                cwd = os.readlink(f"/proc/{pid}/cwd")
            except OSError:
                continue
            if cwd.startswith(root):
                out.append(f"process {pid} (cwd {cwd})")
        with open("/proc/mounts") as fh:
            out += [f"mount {ln.split()[1]}" for ln in fh if ln.split()[1].startswith(root)]
        plan = getattr(self.lc, "plan", None)
        if plan is not None and self.lc is not None:
            names = set(_run(["ip", "netns", "list"]).stdout.split())
            links = _run(["ip", "-o", "link", "show"]).stdout
            for i in range(1, len(self.lc.members) + 1):
                if plan.netns(i) in names:
                    out.append(f"netns {plan.netns(i)}")
                for link in (plan.cluster_veth(i), plan.observer_veth(i)):
                    if f" {link}:" in links or f" {link}@" in links:
                        out.append(f"link {link}")
            if f" {plan.bridge}:" in links:
                out.append(f"link {plan.bridge}")
        return out

    def _note_pids(self) -> None:
        """Remember the run's processes, to check after cleanup that none is left."""
        if self.root is not None:
            self.pids_seen.update(_pids_under(self.root))

    def _down(self) -> None:
        if self.lc is None or not self.lc.meta:
            return
        try:
            self.lc.down()
        finally:
            if self.fc.kafka:
                with contextlib.suppress(Exception):
                    self.lc.stop_kafka()

    def _kill_leftovers(self) -> None:
        if self.root is None:
            return
        pids = _pids_under(self.root)
        self.pids_seen.update(pids)
        if self.lc is not None and self.lc.meta:
            for m in self.lc.members:
                fence = read_pid(fence_pid_file(m.dir))
                # a stale pid file may name someone else's process by now: only ours
                fence = fence if fence and self._ours(fence) else None
                for pid in (self.lc.agent_pid(m.name), self.lc.postmaster_pid(m.name), fence):
                    if pid and pid not in pids:
                        pids.append(pid)
            for pidfile in (self.lc.dir / "etcd" / "etcd.pid", self.lc.dir / "kafka" / "kafka.pid"):
                pid = read_pid(pidfile)
                if pid and pid_alive(pid) and pid not in pids:
                    pids.append(pid)
        if pids:
            self.log(f"killing leftover pids {pids}")
            _kill_all(pids)
        net_down = getattr(self.lc, "net_down", None)
        if net_down is not None:
            net_down()

    def _ours(self, pid: int) -> bool:
        """``pid`` runs in this run's dir or names it on its command line."""
        if self.root is None or not pid_alive(pid):
            return False
        root = str(self.root.resolve())
        with contextlib.suppress(OSError):
            cwd = os.readlink(f"/proc/{pid}/cwd")
            if cwd == root or cwd.startswith(root + "/"):
                return True
        with contextlib.suppress(OSError):
            return root in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        return False

    def _unmount(self) -> None:
        for d in list(self.mounts):
            if self.keep_dir == "always" or (self.keep_dir == "failed" and self.result.failed):
                # the member's files live on the tmpfs: copy them out before it goes
                dest = d.with_name(d.name + ".tmpfs")
                shutil.copytree(
                    d, dest, ignore=shutil.ignore_patterns("pgdata"), dirs_exist_ok=True
                )
            for _ in range(3):
                if _run(["umount", str(d)]).returncode == 0:
                    break
                _kill_all(_pids_under(d))
                time.sleep(0.5)
            else:
                _run(["umount", "-l", str(d)])
            self.mounts.remove(d)

    def _remove_dir(self) -> None:
        if self.root is None:
            return
        keep = self.keep_dir == "always" or (self.keep_dir == "failed" and self.result.failed)
        if keep:
            self.log(f"kept {self.root}")
            return
        shutil.rmtree(self.root, ignore_errors=True)
        self.result.dir = None


async def _topic_node_seqs(bootstrap: str, topic: str, within: float) -> dict[str, list[int]]:
    """Each node's seqs in topic order (a node's records share one partition: the key is the
    node), duplicates included. ``events.kafka.read_topic`` de-duplicates and re-orders by time,
    so it cannot show disorder: this reads the raw partitions."""
    from aiokafka import AIOKafkaConsumer

    from events.kafka import _partitions

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    deadline = time.monotonic() + within
    await asyncio.wait_for(consumer.start(), within)
    try:
        tps = await asyncio.wait_for(_partitions(consumer, topic), within)
        consumer.assign(tps)
        end = await consumer.end_offsets(tps)
        await consumer.seek_to_beginning(*tps)
        out: dict[str, list[int]] = {}
        remaining = set(tps)
        while remaining:
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {topic} took longer than {within} s")
            batch = await consumer.getmany(*remaining, timeout_ms=1000)
            for tp, msgs in batch.items():
                for msg in msgs:
                    if msg.offset >= end[tp]:
                        continue
                    with contextlib.suppress(ValueError, TypeError, KeyError):
                        data = json.loads(msg.value or b"")
                        out.setdefault(str(data["node"]), []).append(int(data["seq"]))
            for tp in list(remaining):
                if await consumer.position(tp) >= end[tp]:
                    remaining.discard(tp)
        return out
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(consumer.stop(), 5)


def _request_switchover(lc: LocalCluster, target: str) -> float:
    """Write a switchover command to ``target`` as `pgsidecar switchover` does, through a client
    with every endpoint of the cluster's first member's config; the wall time right after the
    write was acknowledged."""
    from pgsidecar.ops import request_switchover

    async def write(dcs: DCS) -> float:
        await request_switchover(dcs, target)
        return time.time()

    return lc.with_dcs(write)


async def _partition_state(
    bootstrap: list[str], topic: str, within: float
) -> tuple[int, list[int], list[int]]:
    """(leader, replicas, in-sync replicas) of partition 0 of ``topic``, by node id, once it
    has a leader (waiting for the topic to exist: the first agent creates it)."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    deadline = time.monotonic() + within
    await asyncio.wait_for(admin.start(), within)
    try:
        while True:
            with contextlib.suppress(Exception):
                for t in await asyncio.wait_for(admin.describe_topics([topic]), 10):
                    for part in t.get("partitions") or []:
                        if part.get("partition", part.get("partition_index")) != 0:
                            continue
                        leader = part.get("leader", part.get("leader_id"))
                        if leader is not None and leader >= 0:
                            replicas = part.get("replicas", part.get("replica_nodes")) or []
                            isr = part.get("isr", part.get("isr_nodes")) or []
                            return int(leader), sorted(replicas), sorted(isr)
            if time.monotonic() > deadline:
                raise TimeoutError(f"no leader for {topic}'s partition within {within} s")
            await asyncio.sleep(0.5)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(admin.close(), 5)


def run_one(
    spec: RunSpec,
    base_dir: Path | None = None,
    keep_dir: str = "never",
    log: Callable[[str], None] | None = None,
) -> RunResult:
    return FaultRun(spec, base_dir, keep_dir, log).execute()


# -- the command -------------------------------------------------------------------------------------


def summarize(results: list[RunResult]) -> list[dict[str, Any]]:
    rows = []
    for name in FAULTS:
        rs = [r for r in results if r.fault == name]
        if not rs:
            continue
        done = [r for r in rs if r.skipped is None]

        def mx(vals: list[float | None]) -> float | None:
            v = [x for x in vals if x is not None]
            return max(v) if v else None

        rows.append(
            {
                "fault": name,
                "runs": len(rs),
                "skipped": len(rs) - len(done),
                "failed": sum(1 for r in done if not r.ok),
                "max_to_writable_s": mx([r.to_writable_s for r in done]),
                "max_converge_s": mx([r.converge_s for r in done]),
                "max_to_writable_after_heal_s": mx([r.to_writable_after_heal_s for r in done]),
                "lost_writes": sum(r.lost or 0 for r in done),
                "double_writable": sum(r.double_writable for r in done),
                "min_fencing_margin_s": (
                    min(
                        (r.fencing_margin_s for r in done if r.fencing_margin_s is not None),
                        default=None,
                    )
                ),
            }
        )
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    def f(v: Any) -> str:
        return "-" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))

    head = (
        f"{'fault':<18} {'runs':>4} {'fail':>4} {'skip':>4} {'to-writable':>11} "
        f"{'converge':>8} {'after-heal':>10} {'lost':>5} {'2-writable':>10} {'fence-margin':>12}"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"{r['fault']:<18} {r['runs']:>4} {r['failed']:>4} {r['skipped']:>4} "
            f"{f(r['max_to_writable_s']):>11} {f(r['max_converge_s']):>8} "
            f"{f(r['max_to_writable_after_heal_s']):>10} {r['lost_writes']:>5} "
            f"{r['double_writable']:>10} {f(r['min_fencing_margin_s']):>12}"
        )
    lines.append(
        "(to-writable, converge, after-heal: the maximum over the runs; fence-margin: the minimum)"
    )
    return "\n".join(lines)


def cleanup_leftovers(log: Callable[[str], None]) -> int:
    """Remove what an interrupted chaos run (its process killed) left: network namespaces
    ``pgsc-*`` and the processes in them, links ``pgsc*``, tmpfs mounts under ``pgsc-chaos-*``
    dirs and the processes using them. Only names this module makes. Returns how many things
    were removed."""
    removed = 0
    for line in _run(["ip", "netns", "list"]).stdout.splitlines():
        ns = line.split()[0] if line.split() else ""
        if not ns.startswith("pgsc-"):
            continue
        pids = [int(x) for x in _run(["ip", "netns", "pids", ns]).stdout.split() if x.isdigit()]
        _kill_all(pids)
        _run(["ip", "netns", "del", ns])
        log(f"removed netns {ns} (killed {len(pids)} processes)")
        removed += 1
    for line in _run(["ip", "-o", "link", "show"]).stdout.splitlines():
        parts = line.split(":")
        name = parts[1].strip().split("@")[0] if len(parts) > 1 else ""
        if name.startswith("pgsc"):
            _run(["ip", "link", "del", name])
            log(f"removed link {name}")
            removed += 1
    with open("/proc/mounts") as fh:
        mounts = [line.split()[1] for line in fh if "/pgsc-chaos-" in line.split()[1]]
    for mnt in mounts:
        _kill_all(_pids_under(Path(mnt)))
        if _run(["umount", mnt]).returncode != 0:
            _run(["umount", "-l", mnt])
        log(f"unmounted {mnt}")
        removed += 1
    return removed


def cmd_chaos(args: argparse.Namespace) -> int:
    if args.cleanup:
        n = cleanup_leftovers(lambda m: print(m, file=sys.stderr))
        print(f"removed {n} leftover namespaces, links and mounts of chaos runs")
        return 0
    try:
        faults = parse_faults(args.faults)
    except ValueError as exc:
        print(f"pgsidecar: {exc}", file=sys.stderr)
        return 2
    if args.runs < 1:
        print("pgsidecar: --runs must be at least 1", file=sys.stderr)
        return 2
    specs = draw_specs(args.seed, args.runs, faults, args.ttl, args.synchronous_mode)
    if args.only is not None:
        if not 0 <= args.only < len(specs):
            print(f"pgsidecar: --only must be in [0, {len(specs) - 1}]", file=sys.stderr)
            return 2
        specs = [specs[args.only]]
    base = Path(args.base_dir) if args.base_dir else None

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    results: list[RunResult] = []
    for spec in specs:
        log(
            f"run {spec.index}: {spec.fault} (delay {spec.delay} s, duration {spec.duration} s, "
            f"ttl {spec.ttl} s, seed {spec.seed})"
        )
        r = run_one(spec, base, args.keep_dir, log)
        results.append(r)
        print(r.to_json(), flush=True)
    rows = summarize(results)
    if args.json:
        print(json.dumps({"summary": rows, "seed": args.seed, "runs": len(results)}), flush=True)
    else:
        print(format_table(rows), flush=True)
    failed = [r for r in results if r.failed]
    if failed:
        print(
            f"pgsidecar: {len(failed)} run(s) broke an invariant or failed; replay one with "
            f"`pgsidecar chaos --runs {args.runs} --seed {args.seed} --only K --keep-dir always`",
            file=sys.stderr,
        )
    return 1 if failed else 0


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `pgsidecar chaos` to the top-level parser."""
    letters = ", ".join(f"{f.letter}={f.name}" for f in FAULTS.values())
    c = sub.add_parser(
        "chaos",
        help="fault injection against fresh local clusters; one JSON line per run",
        description=(
            "Each run starts a fresh 3-member local cluster (under --base-dir), runs a writer and "
            "a prober, injects one fault drawn from --seed, heals it, and checks the invariants "
            "(no two writable members, acknowledged writes kept, convergence). Needs root for "
            "the partition and disk faults and Java for kafka-down. Exit 1 if any run broke an "
            "invariant."
        ),
    )
    c.add_argument("--runs", type=int, default=1)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--faults", help=f"comma-separated names or letters ({letters}); default all")
    c.add_argument(
        "--ttl",
        type=float,
        default=DEFAULT_TTL,
        help=f"leader lease TTL of the clusters (default {DEFAULT_TTL:g})",
    )
    c.add_argument("--synchronous-mode", choices=["off", "on", "strict"], default="off")
    c.add_argument("--json", action="store_true", help="the summary as a JSON line, not a table")
    c.add_argument("--only", type=int, help="replay only run K (0-based) of this seed's draw")
    c.add_argument(
        "--keep-dir",
        choices=["never", "failed", "always"],
        default="failed",
        help="keep a run's cluster dir (logs, journals) for the evidence",
    )
    c.add_argument("--base-dir", help="where the runs' cluster dirs go (default /tmp)")
    c.add_argument("--quiet", action="store_true", help="no progress on stderr")
    c.add_argument(
        "--cleanup",
        action="store_true",
        help="only remove what an interrupted run left (namespaces, links, mounts), then exit",
    )
    c.set_defaults(func=cmd_chaos)


__all__ = [
    "FAULTS",
    "FaultRun",
    "RunResult",
    "RunSpec",
    "TracingProber",
    "draw_specs",
    "run_one",
    "spec_for",
    "summarize",
]
