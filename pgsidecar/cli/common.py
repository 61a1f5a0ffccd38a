"""What the command modules share: exit codes, the error line, the --config / --dir target of a
command, and a DCS connection for one command. Imports nothing of the other command modules."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from events.dcs import DCS, DCSError
from pgsidecar.config import AgentConfig, ConfigError, load_config
from pgsidecar.ops import OpsError

# a refusal (bad request, DCS unreachable, the cluster not in the needed state): nothing changed
EXIT_REFUSED = 1
# the agent's config could not be read or is invalid
EXIT_CONFIG = 2


def err(msg: str) -> None:
    print(f"pgsidecar: {msg}", file=sys.stderr)


def add_target(sp: argparse.ArgumentParser) -> None:
    """--config FILE or --dir DIR: which cluster a command talks to."""
    g = sp.add_mutually_exclusive_group()
    g.add_argument("--config", help="an agent's config file (names the DCS and the cluster)")
    g.add_argument("--dir", help="a local cluster's directory")


def config_from_args(args: argparse.Namespace) -> AgentConfig:
    """The agent config a command's --config names, or the first member's of the local cluster
    in --dir."""
    if getattr(args, "config", None):
        return load_config(args.config)
    if getattr(args, "dir", None):
        # the lab is imported only when a command is aimed at a local cluster
        from pgsidecar.lab.local import LocalCluster

        lc = LocalCluster(Path(args.dir))
        if not lc.members:
            raise ConfigError(
                f"{args.dir} holds no local cluster (no cluster.json); run `pgsidecar local up` first"
            )
        return load_config(lc.config_path(lc.members[0].name))
    raise ConfigError("give --config FILE (an agent's config) or --dir DIR (a local cluster)")


def run_with_dcs(
    args: argparse.Namespace, what: str, body: Callable[[AgentConfig, DCS], Awaitable[int]]
) -> int:
    """Connect to the cluster's DCS (no session: an operator holds no lease), run ``body``,
    close. DCS errors and refusals become exit 1 with the reason."""
    from events.dcs.factory import create_dcs

    cfg = config_from_args(args)

    async def go() -> int:
        dcs = create_dcs(cfg.dcs, cfg.cluster)
        try:
            await asyncio.wait_for(dcs.connect(), timeout=15)
            return await body(cfg, dcs)
        finally:
            with contextlib.suppress(Exception):
                await dcs.close()

    try:
        return asyncio.run(go())
    except OpsError as exc:
        err(f"{what} refused: {exc}")
    except (DCSError, TimeoutError) as exc:
        err(f"{what}: cannot reach the DCS ({cfg.dcs.type}): {exc or 'timed out'}; nothing changed")
    return EXIT_REFUSED
