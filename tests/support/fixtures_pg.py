"""Real-PostgreSQL fixtures for the tests that drive pgsidecar.postgres directly.

``pg_template`` is one initdb'd data directory with the replication role, shut down cleanly,
made once per session; ``lab`` is a :class:`tests.support.pgtestutil.Lab` whose members start as
copies of it (a copy takes milliseconds where initdb takes seconds) and whose every process is
stopped, by pid, at the test's teardown."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.support.pgtestutil import Lab


@pytest.fixture(scope="session")
def pg_template() -> Iterator[Path]:
    lab = Lab()

    async def build() -> Path:
        ctl = lab.control("template", from_template=False)
        await ctl.initdb()
        ctl.write_config("primary", None, None)
        await ctl.start(30)
        await ctl.ensure_roles()
        await ctl.stop("fast")
        return ctl.data_dir

    try:
        yield asyncio.run(build())
    finally:
        asyncio.run(lab.close())


@pytest.fixture
async def lab(pg_template: Path) -> AsyncIterator[Lab]:
    lab = Lab(pg_template)
    try:
        yield lab
    finally:
        await lab.close()
