"""Bugs of the real agent that the simulator found, each pinned by the seed that found it: the
seed's run (the real agent, the default fault mix) must pass every invariant. The table in
docs/simulation.md lists them."""

from __future__ import annotations

from pgsidecar.lab.sim.agent import agent_factory
from pgsidecar.lab.sim.cluster import SimCluster


def run(seed: int, members: int = 3, synchronous_mode: str = "off") -> None:
    result = SimCluster(
        seed=seed, members=members, synchronous_mode=synchronous_mode, agent_factory=agent_factory
    ).run()
    assert result.ok, (
        f"{result.violation}\nreplay: pgsidecar lab sim --replay {seed} --members {members} "
        f"--synchronous-mode {synchronous_mode}"
    )


def test_seed_2_a_timed_out_register_member_at_start_up_does_not_end_the_agent() -> None:
    """A restarted agent's register_member timed out (a flaky DCS): the DCSError escaped
    start-up and ended the agent; the member never came back (liveness)."""
    run(2)


def test_seed_218_the_last_master_of_an_empty_synchronous_set_may_lead_again() -> None:
    """Synchronous mode on: the master lost its lease in a DCS stall while no standby was in
    sync (its recorded set was empty). No member was allowed to race, the old master included:
    no master ever again (liveness). The master that recorded the set may now race."""
    run(218, synchronous_mode="on")


def test_seed_1004_two_promotions_from_the_same_point_name_different_timelines() -> None:
    """A member promoted from timeline 2 and wrote on its timeline 3, then lost the lease; a
    member that had received none of it promoted from the same point and, as PostgreSQL picks
    one above the newest history file it has, also named its timeline 3. No history check could
    tell the two apart: the first one's WAL could never stream from the new master (liveness).
    Now the cluster's timeline counter in the DCS makes the second promotion name 4 (a
    placeholder history file for 3), and the fork is seen and rewound."""
    run(1004)


def test_seeds_2013_3001_3005_the_synchronous_set_binds_every_member() -> None:
    """Synchronous mode: a member outside the recorded set raced and lost the set's
    acknowledged commits, because it had not seen the record's writer lead (seeds 3001, 2013:
    cut off from the DCS all through that master's term; seed 3005: its agent restarted
    meanwhile) and the record bound only members that had. Now it binds every member."""
    run(2013, members=5, synchronous_mode="on")
    run(3001, members=5, synchronous_mode="strict")
    run(3005, members=5, synchronous_mode="strict")


def test_seed_3002_a_restarted_master_of_an_empty_synchronous_set_leads_again() -> None:
    """Strict mode: the master's set was empty when its agent was killed. Restarted, it took
    its own record for a stale one (it had seen no leader since), counted the other members as
    contenders and waited for one of them, which the record kept from racing: no master ever
    again (liveness). Now every member reads the record the same way, and the old master
    races."""
    run(3002, synchronous_mode="strict")


def test_seed_3003_a_new_master_ignores_a_view_older_than_its_term() -> None:
    """Strict mode, 5 members: a DCS stall fenced the master m3. When the store healed, m2
    won the key on a fresh read, then the watch delivered its queued view naming m3 at an
    older term: m2 fenced itself and went to rewind against m3, which was not master. m2 had
    written its own empty synchronous record, so only it might lead, and it waited in
    rewinding for someone else: no master for the rest of the run (liveness). Now a master
    ignores a key older than its own term, and a rewinding member with no master left starts
    read-only and stands for election."""
    run(3003, members=5, synchronous_mode="strict")


def test_seeds_2324_3060_new_parameters_keep_a_standbys_upstream() -> None:
    """A replica rewrote its config for the cluster's parameters (the config key read back
    after a DCS stall) with the upstream of the view it had then: no leader (seed 2324), or
    not yet the one it followed (seed 3060). Its machine still believed it followed its
    master, so when that master led again it never re-pointed: a standby streaming from
    nobody for the rest of the run (liveness). Found when the CI budget grew from 60 seeds to
    1,002. Now a rewrite for parameters keeps the upstream the machine chose."""
    run(2324, synchronous_mode="on")
    run(3060, synchronous_mode="strict")


def test_seeds_105160_105162_112992_115870_an_unanswered_write_of_the_synchronous_set_counts() -> (
    None
):
    """Synchronous mode on: the master added m1 (m2 in 105162) to synchronous_standby_names,
    saw it synchronous and sent the grown record into a stalled store; the call timed out. The
    next tick, that member cut off, set synchronous_standby_names to '' and acknowledged
    commits it never had. The grow landed when the store came back, and the member it named
    won the election without them (durability: 3 or 4 acknowledged commits lost in each).
    Found by the one-hour run, seeds 112992 and 115870 later in it, the same way. Now every write of the record is a compare-and-set from the index just
    read, and a write without an answer keeps its members waited for until a swap from that
    same index rules it out."""
    for seed in (105160, 105162, 112992, 115870):
        run(seed, synchronous_mode="on")
