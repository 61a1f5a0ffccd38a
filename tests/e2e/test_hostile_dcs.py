"""Hostile values in the DCS never stop an agent: with garbage written over and over into every key
under the cluster's prefix (member keys, config, switchover, sync, initialize) while the master is
hard-killed, and once over the dead master's leader key, the failover completes in its usual time,
and every agent stays alive and keeps counting what it skipped.

The leader key is written once, not over and over: whoever rewrites the lock continuously keeps
any cluster from having a master, which is what DCS write access allows (docs/security.md)."""

from __future__ import annotations

import base64
import json
import threading
import time
import urllib.request

import pytest

from tests.support.clusterutil import Writer, local_cluster, new_master, wait_for

pytestmark = pytest.mark.integration

TTL = 5.0

GARBAGE = [
    b"[" * 50_000 + b"]" * 50_000,
    b'{"lsn": ' + b"9" * 5000 + b"}",
    b'{"lsn": NaN, "timeline": Infinity, "role": "master"}',
    b'{"at": 1e400, "leader": [], "candidate": {"x": 1}}',
    b'{"role": 7, "lsn": "x", "timeline": [1], "host": {"a": 1}, "port": 1e99}',
    b"\xff\xfe not utf-8",
    b"",
    b"null",
    b'"a string"',
]


def _put(url: str, key: str, value: bytes) -> None:
    body = json.dumps(
        {"key": base64.b64encode(key.encode()).decode(), "value": base64.b64encode(value).decode()}
    ).encode()
    req = urllib.request.Request(f"{url}/v3/kv/put", data=body, method="POST")
    with urllib.request.urlopen(req, timeout=2) as resp:
        resp.read()


class GarbageWriter(threading.Thread):
    def __init__(self, url: str, keys: list[str]) -> None:
        super().__init__(daemon=True)
        self.url, self.keys = url, keys
        self.stopped = threading.Event()
        self.writes = 0  # whole rounds: every key rewritten and every intruder key written
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._write_until_stopped()
        except BaseException as exc:  # kept for the test to report: the writer must not die quietly
            self.error = exc

    def _write_until_stopped(self) -> None:
        # every key is rewritten with every kind of garbage in turn, and one intruder key per kind
        # holds its kind all along, so every read of the prefix meets every kind
        i = 0
        while not self.stopped.is_set():
            for key in self.keys:
                _put(self.url, key, GARBAGE[i % len(GARBAGE)])
                i += 1
            for k, value in enumerate(GARBAGE):
                _put(self.url, f"{self.keys[0].rsplit('/', 1)[0]}/members/intruder-{k}", value)
            self.writes += 1
            self.stopped.wait(0.1)


def _metric(lc, name: str, metric: str) -> float | None:  # type: ignore[no-untyped-def]
    try:
        with urllib.request.urlopen(f"{lc.member(name).api_url}/metrics", timeout=2) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(metric):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_garbage_in_every_key_during_a_failover_changes_nothing_but_counters() -> None:
    with local_cluster(ttl=TTL) as lc:
        url = f"http://127.0.0.1:{lc.meta['etcd']['client_port']}"
        base = f"pgsidecar/{lc.cluster}/"
        keys = [base + k for k in ("config", "switchover", "sync", "initialize")]
        keys += [base + "members/intruder", base + "members/" + "x" * 300]
        old = lc.master()
        assert old is not None
        replicas = [m.name for m in lc.members if m.name != old]
        # the replicas' own member keys too: an agent whose key was overwritten publishes it again
        keys += [base + "members/" + r for r in replicas]
        w = Writer(lc).start()
        garbage = GarbageWriter(url, keys)
        garbage.start()
        try:
            # every key has held garbage before the master dies (two whole rounds), whatever the
            # speed of etcd's fsync on this machine
            wait_for(lambda: garbage.writes >= 2, 30, what="two rounds of garbage")
            t0 = time.monotonic()
            rounds_at_kill = garbage.writes
            lc.kill_member(old, postgres=True)
            # and once over the dead master's lock: a key bound to no lease is no lock, never
            # expires, and must not block the election (the agents take it over)
            _put(url, base + "leader", b"\xff not an agent's key")
            wait_for(lambda: new_master(lc, old), TTL + 10, what="a new master")
            t_write = wait_for(
                lambda: w.first_write_after(t0, lc.member(old).pg_port),
                TTL + 10,
                what="a write on the new master",
            )
            # the same bound as a hard kill without garbage (tests/e2e/test_cluster_e2e.py)
            assert t_write - t0 <= TTL + 3, f"failover took {t_write - t0:.2f} s under garbage"
            # the garbage went on through the whole failover: rounds completed between the kill and
            # the first write (a window of seconds, the lease's remaining life, against a round of
            # well under a second), and one more after it
            rounds_at_write = garbage.writes
            assert garbage.error is None, f"the garbage writer failed: {garbage.error!r}"
            assert rounds_at_write > rounds_at_kill, "no garbage written during the failover"
            wait_for(
                lambda: garbage.writes > rounds_at_write or garbage.error is not None,
                30,
                what="a round of garbage after the failover",
            )
        finally:
            garbage.stopped.set()
            garbage.join(timeout=5)
            w.stop()
        assert garbage.error is None, f"the garbage writer failed: {garbage.error!r}"
        for r in replicas:
            # alive, its liveness green, and it counted what it skipped
            with urllib.request.urlopen(f"{lc.member(r).api_url}/liveness", timeout=2) as resp:
                assert resp.status == 200
            skipped = _metric(lc, r, "pgsidecar_malformed_dcs_values")
            assert skipped is not None and skipped > 0, f"{r} counted no malformed value"
