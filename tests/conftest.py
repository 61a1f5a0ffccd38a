"""Shared fixtures. Backend-specific fixtures live in their own plugin modules."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = [
    "tests.support.fixtures_etcd",
    "tests.support.fixtures_consul",
    "tests.support.fixtures_kafka",
    "tests.support.fixtures_sim",
    "tests.support.fixtures_pg",  # pg_template and lab: real PostgreSQL members
    "tests.support.fenceutil",  # the procs fixture
    "tests.support.dcswatch",  # the watchers fixture
]


@pytest.fixture(params=["etcd", "consul", "sim"])
def dcs_backend(request: pytest.FixtureRequest):
    """A factory ``make_dcs(cluster: str) -> DCS`` for each backend, over a real etcd (started by
    tests.support.fixtures_etcd), the Consul emulator (tests.support.fixtures_consul) and the simulator's store
    (tests.support.fixtures_sim, on the test's ordinary loop). Every DCS made is closed at teardown by the
    backend fixture."""
    if request.param == "etcd":
        return request.getfixturevalue("etcd_dcs_factory")
    if request.param == "sim":
        return request.getfixturevalue("sim_dcs_factory")
    return request.getfixturevalue("consul_dcs_factory")


# The tiers are folders (docs/testing.md): the marker of every test comes from its folder, so
# `pytest tests/unit` and `-m "not integration"` select the same tests. A test that starts a real
# process (etcd, Kafka) cannot sit in tests/unit: collection fails and says where it belongs.
TIER_MARKERS = {
    "unit": (),
    "sim": ("sim",),
    "contract": ("integration",),
    "e2e": ("integration",),
    "faults": ("integration", "faults"),
}


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    from tests.support.fixtures_etcd import starts_etcd
    from tests.support.fixtures_kafka import KAFKA_FIXTURES

    for item in items:
        parts = item.path.relative_to(config.rootpath).parts
        tier = parts[1] if len(parts) > 2 and parts[0] == "tests" else None
        if tier not in TIER_MARKERS:
            raise pytest.UsageError(
                f"{item.nodeid}: every test lives in a tier folder ({', '.join(TIER_MARKERS)}) "
                "under tests/; move it there"
            )
        starts = starts_etcd(item) or bool(KAFKA_FIXTURES & set(getattr(item, "fixturenames", ())))
        if tier in ("unit", "sim") and starts:
            raise pytest.UsageError(
                f"{item.nodeid} starts a real etcd or Kafka but lives in tests/{tier} (which starts "
                "no external process): move it to tests/contract or tests/e2e"
            )
        for name in TIER_MARKERS[tier]:
            if item.get_closest_marker(name) is None:
                item.add_marker(getattr(pytest.mark, name))
    if any(item.get_closest_marker("integration") for item in items):
        check_agents_run_this_checkout(config.rootpath)


def check_agents_run_this_checkout(root: Path) -> None:
    """The agents these tests start (`python -m pgsidecar` in a member's directory) import
    pgsidecar as this interpreter would from anywhere: an editable install of another checkout
    would put other code under test, silently. Refused, saying how to fix it."""
    import subprocess
    import sys

    probe = "import os, pgsidecar; print(os.path.realpath(pgsidecar.__file__))"
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd="/", capture_output=True, text=True, timeout=30
    )
    found = Path(done.stdout.strip()).parent.parent if done.returncode == 0 else None
    if found != root.resolve():
        raise pytest.UsageError(
            f"the agents these tests start would import pgsidecar from {found or 'nowhere'}, not "
            f"from {root}: run `pip install -e .` here (scripts/setup.sh does), or set "
            f"PYTHONPATH={root}"
        )


# `pytest tests/unit` runs in two worker processes (pytest-xdist), one file per worker at a
# time: a third of the tier's time is the fence tests waiting on real clocks (a deadline, a
# second between SIGQUIT and SIGKILL), which the other worker fills with the CPU-bound files.
# Only when every path asked for is in tests/unit, one of them a folder (the other tiers start
# real clusters on free ports and time failovers: they stay serial), and no -n was given;
# `-n 0` runs it serially, and so do --pdb, --collect-only and a machine without pytest-xdist.
UNIT_WORKERS = 2


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook reads -n
def pytest_cmdline_main(config: pytest.Config) -> None:
    option = config.option
    if (
        not config.pluginmanager.hasplugin("xdist")
        or hasattr(config, "workerinput")  # a worker: the controller decided
        or getattr(option, "numprocesses", None) is not None
        or option.usepdb
        or option.collectonly
    ):
        return
    unit = config.rootpath / "tests" / "unit"
    paths = [Path(arg.split("::")[0]).resolve() for arg in config.args]
    in_unit = bool(paths) and all(p == unit or unit in p.parents for p in paths)
    # a file or a test asked for alone runs serially: two workers cost more than they save
    if in_unit and any(p.is_dir() for p in paths):
        option.numprocesses = UNIT_WORKERS
        option.dist = "loadfile"
