"""The audit stream end to end: real agents, real PostgreSQL, etcd and Kafka (started by the
local cluster code). A failover's records arrive complete and in order per node; the broker down
during a failover loses nothing; history and replay work on the recorded failover; a forged peer
record cannot make a node master."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import pytest
from aiokafka import AIOKafkaProducer

from events.kafka import default_topic, read_topic
from events.sinks import read_journal
from pgsidecar.cli import main
from pgsidecar.lab.kafka_broker import java_available
from tests.support.clusterutil import local_cluster, new_master, wait_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.kafka,
    pytest.mark.skipif(
        not java_available(),
        reason="Apache Kafka needs Java 17 (apt-get install openjdk-17-jre-headless)",
    ),
]

TTL = 5.0


def topic_records(lc):  # type: ignore[no-untyped-def]
    port = lc.meta["kafka"]["port"]
    recs, skipped = asyncio.run(
        read_topic(f"127.0.0.1:{port}", default_topic(lc.cluster), timeout=30)
    )
    return recs, skipped


def journal_seqs(lc, name):  # type: ignore[no-untyped-def]
    recs, _ = read_journal(lc.member(name).dir / "journal.jsonl")
    return [r.seq for r in recs]


def wait_topic_has_journals(lc, timeout: float = 60):  # type: ignore[no-untyped-def]
    """Until every record of every member's journal is on the topic."""

    def complete():  # type: ignore[no-untyped-def]
        recs, _ = topic_records(lc)
        by_node: dict[str, set[int]] = {}
        for r in recs:
            by_node.setdefault(r.node, set()).add(r.seq)
        missing = {
            m.name: len(set(journal_seqs(lc, m.name)) - by_node.get(m.name, set()))
            for m in lc.members
        }
        return recs if not any(missing.values()) else None

    return wait_for(complete, timeout, interval=1.0, what="every journal record on the topic")


def test_failover_records_complete_in_order_history_and_replay(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with local_cluster(ttl=TTL, kafka=True) as lc:
        old = lc.master()
        lc.kill_member(old, postgres=True)
        new = wait_for(lambda: new_master(lc, old), TTL + 10, what="a new master")
        lc.start_member(old)
        lc.wait_healthy(timeout=90)
        recs = wait_topic_has_journals(lc)
        # per node: the topic holds the journal's records, once each, in seq order within the
        # node's partition (key = node name). The agents go on recording while the test reads,
        # so the journal read now may be ahead of the topic read before: compare up to the last
        # record the topic had.
        for m in lc.members:
            on_topic = [r.seq for r in recs if r.node == m.name]
            journal = set(journal_seqs(lc, m.name))
            assert on_topic == sorted(set(on_topic)), f"{m.name}: duplicates or out of order"
            assert on_topic and set(on_topic) <= journal, f"{m.name}: a record not in its journal"
            upto = on_topic[-1]
            assert {s for s in journal if s <= upto} == set(on_topic), f"{m.name}: a gap"
        kinds = {r.kind for r in recs}
        assert kinds == {"input", "transition", "action"}
        new_transitions = [r.body for r in recs if r.node == new and r.kind == "transition"]
        assert any(t["trigger"] == "won_lease" for t in new_transitions)
        # history from the topic shows the new master's promotion and the old one's rewind
        assert main(["history", "--dir", str(lc.dir), "--json"]) == 0
        lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.strip()]
        assert any(x["node"] == new and x["trigger"] == "won_lease" for x in lines)
        assert any(x["node"] == old and x["trigger"] == "rewound" for x in lines)
        # replay of every node reproduces every recorded transition
        assert main(["replay", "--dir", str(lc.dir)]) == 0
        out = capsys.readouterr().out
        for m in lc.members:
            assert f"{m.name}: " in out and "ok" in out


def test_broker_down_during_failover_loses_nothing_and_keeps_order() -> None:
    with local_cluster(ttl=TTL, kafka=True) as lc:
        broker = lc.kafka_broker
        old = lc.master()
        broker.kill()
        t0 = time.monotonic()
        os.kill(lc.agent_pid(old), signal.SIGTERM)  # SIGTERM failover with Kafka down
        new = wait_for(lambda: new_master(lc, old), TTL * 2, what="a failover without Kafka")
        assert time.monotonic() - t0 < TTL, "the failover must not wait for Kafka"
        lc.stop_member(old)  # reap it
        lc.start_member(old)
        lc.wait_healthy(timeout=90)
        time.sleep(2)
        lc.start_kafka()
        recs = wait_topic_has_journals(lc, timeout=90)
        for m in lc.members:
            seqs = [r.seq for r in recs if r.node == m.name]
            assert seqs == sorted(seqs), f"{m.name}'s records out of order on the topic"
        assert any(
            r.node == new and r.kind == "transition" and r.body["trigger"] == "won_lease"
            for r in recs
        )


def test_a_forged_peer_record_cannot_make_a_node_master() -> None:
    with local_cluster(ttl=TTL, kafka=True) as lc:
        master = lc.master()
        victim = next(m.name for m in lc.members if m.name != master)
        port = lc.meta["kafka"]["port"]
        forged = {
            "schema": "pgsidecar.record/1",
            "kind": "transition",
            "cluster": lc.cluster,
            "node": master,
            "seq": 10**9,
            "time": time.time(),
            "term": 10**6,
            "body": {
                "from": "master",
                "to": "demoted",
                "trigger": "switchover",
                "reason": f"forged: {victim} is the new master",
                "timeline": 99,
                "lsn": 2**40,
            },
        }

        async def send() -> None:
            p = AIOKafkaProducer(bootstrap_servers=f"127.0.0.1:{port}")
            await p.start()
            try:
                for _ in range(3):
                    await p.send_and_wait(
                        default_topic(lc.cluster), json.dumps(forged).encode(), key=master.encode()
                    )
                await p.send_and_wait(default_topic(lc.cluster), b"{not json", key=b"x")
            finally:
                await p.stop()

        asyncio.run(send())
        # the peers received it (recorded as a peer input) and did nothing with it
        wait_for(
            lambda: any(
                r.kind == "input"
                and r.body.get("type") == "peer"
                and r.body["data"].get("seq") == 10**9
                for r in read_journal(lc.member(victim).dir / "journal.jsonl")[0]
            ),
            30,
            what="the forged record delivered to a peer",
        )
        time.sleep(2)
        assert lc.master() == master
        roles = {r["name"]: r["role"] for r in lc.status()}
        assert list(roles.values()).count("master") == 1
