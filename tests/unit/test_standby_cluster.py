"""A standby cluster outside the machine: its config section, what the standby leader's
effects write (the source as upstream, its slot there, the source's restore_command), the
first member's copy of the source, the promotion marker and the promote-cluster command."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from events.dcs import Leader
from events.dcs.base import build_view
from fsm.machine import EFFECT, Effect, Role
from fsm.snapshot import STANDBY_SOURCE, DataState
from pgsidecar.cli import build_parser
from pgsidecar.cli.cluster import list_document, render_table
from pgsidecar.config import AgentConfig
from pgsidecar.ops import OpsError, members_table, promote_standby_cluster
from tests.support.agent_fakes import FakeDCS, Rig, peer, put, see

SOURCE = {"hosts": ["10.0.0.1:5432", "10.0.0.2:5433"], "primary_slot_name": "dr_site"}


def config(**standby: Any) -> AgentConfig:
    return AgentConfig.model_validate(
        {
            "name": "pg1",
            "cluster": "c1",
            "state_dir": "/tmp/x",
            "postgresql": {"data_dir": "/tmp/x/data"},
            "standby_cluster": standby,
        }
    )


# -- the config section ---------------------------------------------------------------------------


def test_config_takes_a_host_or_a_list_of_hosts() -> None:
    one = config(host="src.example", port=6432).standby_cluster
    assert one is not None and one.endpoints() == [("src.example", 6432)]
    many = config(hosts=["a:5432", "[::1]:5433"]).standby_cluster
    assert many is not None and many.endpoints() == [("a", 5432), ("::1", 5433)]
    assert many.describe() == "a:5432,[::1]:5433"


@pytest.mark.parametrize(
    ("section", "words"),
    [
        ({}, "set host (with port) or hosts"),
        ({"host": "a", "hosts": ["b:1"]}, "one of them"),
        ({"hosts": ["nohost"]}, "is not host:port"),
        ({"hosts": ["a:99999"]}, "is not host:port"),
        ({"host": "a", "port": 0}, "greater than or equal to 1"),
        ({"host": "a", "primary_slot_name": "Bad-Slot"}, "primary_slot_name"),
        ({"host": "a", "restore_command": ""}, "restore_command"),
        ({"host": "a", "primary_conninfo": "x"}, "primary_conninfo"),
    ],
)
def test_config_errors_name_the_problem(section: dict[str, Any], words: str) -> None:
    with pytest.raises(ValidationError) as exc:
        config(**section)
    assert words in str(exc.value)


def test_a_standby_cluster_cannot_also_restore_from_a_repository() -> None:
    with pytest.raises(ValidationError, match="copies the source cluster's master"):
        AgentConfig.model_validate(
            {
                "name": "pg1",
                "cluster": "c1",
                "state_dir": "/tmp/x",
                "postgresql": {"data_dir": "/tmp/x/data"},
                "standby_cluster": {"host": "a"},
                "bootstrap": {
                    "method": "pgbackrest",
                    "repository": {"type": "posix", "path": "/r"},
                    "stanza": "src",
                },
            }
        )


def test_restore_command_set_twice_is_refused() -> None:
    with pytest.raises(ValidationError, match="keep the standby_cluster one"):
        AgentConfig.model_validate(
            {
                "name": "pg1",
                "cluster": "c1",
                "state_dir": "/tmp/x",
                "postgresql": {"data_dir": "/tmp/x/data", "parameters": {"restore_command": "x"}},
                "standby_cluster": {"host": "a", "restore_command": "cp /a/%f %p"},
            }
        )


# -- the effects of a standby cluster's member ---------------------------------------------------


async def run(rig: Rig, effect: Effect) -> dict[str, Any]:
    trigger = next(t for t, e in EFFECT.items() if e is effect)
    await rig.agent.run_effect(trigger, effect)
    outcomes = [d for t, d in rig.posted() if t == "effect"]
    assert len(outcomes) == 1, outcomes
    return outcomes[0]


@pytest.fixture
def standby(tmp_path: Path) -> Rig:
    return Rig(tmp_path, standby={**SOURCE, "restore_command": "fetch %f %p"})


async def test_first_member_copies_the_source_instead_of_initdb(standby: Rig) -> None:
    out = await run(standby, Effect.BOOTSTRAP)
    assert out == {"name": Effect.BOOTSTRAP, "ok": True, "won": True}
    assert standby.pg.called("initdb") == []
    ((source,),) = standby.pg.called("basebackup")
    assert (source.host, source.port, source.user) == (
        "10.0.0.1,10.0.0.2",
        "5432,5433",
        "replicator",
    )
    assert standby.pg.data is DataState.STANDBY


async def test_a_normal_cluster_still_runs_initdb(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    await run(rig, Effect.BOOTSTRAP)
    assert rig.pg.called("basebackup") == [] and len(rig.pg.called("initdb")) == 1


async def test_standby_leader_follows_the_source_with_its_slot_there(standby: Rig) -> None:
    standby.pg.data = DataState.STANDBY
    standby.dcs.leader = Leader("pg1", 7)
    see(standby)
    put(standby, Role.STANDBY_LEADER)
    out = await run(standby, Effect.FOLLOW)
    assert out == {"name": Effect.FOLLOW, "ok": True, "upstream": STANDBY_SOURCE}
    role, upstream, slot, params = standby.pg.configs[-1]
    assert role == "standby" and upstream is not None
    assert upstream.host == "10.0.0.1,10.0.0.2" and upstream.port == "5432,5433"
    assert slot == "dr_site", "the slot configured in the source, not the member's own name"
    assert params["restore_command"] == "fetch %f %p"


async def test_replica_of_a_standby_cluster_follows_the_standby_leader(standby: Rig) -> None:
    standby.pg.data = DataState.STANDBY
    standby.dcs.leader = Leader("pg2", 7)
    standby.dcs.members["pg2"] = peer("pg2", role="standby_leader")
    see(standby)
    out = await run(standby, Effect.START_STANDBY)
    assert out["upstream"] == "pg2"
    _role, upstream, slot, _params = standby.pg.configs[-1]
    assert upstream is not None and upstream.host == "pg2.local" and slot == "pg1"


async def test_source_archive_is_dropped_once_the_cluster_is_promoted(standby: Rig) -> None:
    # the source's archive holds timelines of the source's own: a promoted cluster must not
    # fetch them
    standby.pg.data = DataState.STANDBY
    standby.dcs.leader = Leader("pg2", 7)
    standby.dcs.members["pg2"] = peer("pg2")
    standby.dcs.standby_promoted = {"requested_at": 1.0}
    see(standby)
    await run(standby, Effect.START_STANDBY)
    assert "restore_command" not in standby.pg.configs[-1][3]


async def test_standby_leader_publishes_the_source_it_follows(standby: Rig) -> None:
    put(standby, Role.STANDBY_LEADER)
    data = standby.agent.members.member_data()
    assert data["role"] == "standby_leader"
    assert data["standby_source"] == "10.0.0.1:5432,10.0.0.2:5433"


# -- the promotion marker and promote-cluster -----------------------------------------------------


def test_marker_key_is_part_of_the_view() -> None:
    entries = [
        ("pgsidecar/c1/standby_promoted", b'{"requested_at": 5.0}', 9, True),
        ("pgsidecar/c1/initialize", b"pg1", 2, True),
    ]
    view = build_view("pgsidecar/c1/", entries, 9)
    assert view.standby_promoted == {"requested_at": 5.0}


def standby_dcs(promoted: bool = False) -> FakeDCS:
    dcs = FakeDCS()
    dcs.initialize = "pg1"
    dcs.leader = Leader("pg1", 4)
    dcs.members["pg1"] = peer("pg1", role="standby_leader", standby_source="src:5432")
    dcs.members["pg2"] = peer("pg2", role="replica", standby_source="src:5432")
    if promoted:
        dcs.standby_promoted = {"requested_at": 1.0, "source": "src:5432"}
    return dcs


async def test_promote_cluster_writes_the_marker_once() -> None:
    dcs = standby_dcs()
    marker, wrote = await promote_standby_cluster(dcs, "c1", now=100.0)
    assert wrote and dcs.standby_promoted == marker
    assert marker == {"requested_at": 100.0, "source": "src:5432", "standby_leader": "pg1"}
    again, wrote_again = await promote_standby_cluster(dcs, "c1", now=200.0)
    assert not wrote_again and again == marker, "an existing marker is reported, not rewritten"


async def test_promote_cluster_refuses_a_normal_cluster() -> None:
    dcs = FakeDCS()
    dcs.initialize = "pg1"
    dcs.leader = Leader("pg1", 4)
    dcs.members["pg1"] = peer("pg1")
    with pytest.raises(OpsError, match="not a standby cluster"):
        await promote_standby_cluster(dcs, "c1", now=1.0)
    assert dcs.standby_promoted is None


def test_cli_parser_has_promote_cluster() -> None:
    args = build_parser().parse_args(["promote-cluster", "--dir", "/tmp/d", "--wait", "30"])
    assert isinstance(args, argparse.Namespace)
    assert args.dir == "/tmp/d" and args.wait == 30.0 and callable(args.func)
    assert args.func.__name__ == "cmd_promote_cluster"


def test_list_shows_the_standby_leader_and_the_source() -> None:
    view = standby_dcs().view()
    rows = members_table(view)
    assert {r["name"]: r["role"] for r in rows} == {"pg1": "standby_leader", "pg2": "replica"}
    text = render_table("c1", view, rows)
    assert "standby_leader" in text and "Standby cluster: follows src:5432" in text
    promoted = standby_dcs(promoted=True).view()
    assert "promoted" in render_table("c1", promoted, members_table(promoted))
    assert list_document("c1", promoted)["standby_promoted"]["source"] == "src:5432"
