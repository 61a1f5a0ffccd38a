"""The sim tier's figures: the seed runs record their reports here, and the end of the run
prints how many seeds ran and how fast (simulated seconds per wall second), so every CI log
carries the budget's measure beside the verdict."""

from __future__ import annotations

from typing import Any

import pytest

from pgsidecar.lab.sim.cluster import SeedsReport

_REPORTS: list[tuple[str, SeedsReport]] = []


@pytest.fixture
def sim_reports() -> list[tuple[str, SeedsReport]]:
    return _REPORTS


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _REPORTS:
        return
    seeds = sum(len(r.results) for _mode, r in _REPORTS)
    wall = sum(r.wall_seconds for _mode, r in _REPORTS)
    virtual = sum(r.virtual_seconds for _mode, r in _REPORTS)
    lines = [
        f"{mode}: {len(r.results)} seeds in {r.wall_seconds:.1f} s, "
        f"{r.simulated_per_wall_second:.0f} simulated s per wall s"
        for mode, r in _REPORTS
    ]
    terminalreporter.write_sep("=", "simulated clusters")
    for line in lines:
        terminalreporter.write_line(line)
    terminalreporter.write_line(
        f"all: {seeds} seeds, {virtual:.0f} simulated s in {wall:.1f} wall s "
        f"({virtual / wall:.0f} per wall s, {60 * seeds / wall:.0f} seeds per minute)"
    )
