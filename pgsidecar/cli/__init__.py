"""The `pgsidecar` command line: the parser and ``main``. One module per group of commands, each
adding its own subparsers; none imports this package or another command module, only
``common`` (tests/unit/test_layers.py checks there is no cycle).

    run.py      run                                  the agent (what a container runs)
    cluster.py  list, pause, resume, config          the cluster as the DCS holds it
    members.py  switchover, restart, reinit, failover
    records.py  history, replay                      the recorded transitions and inputs
    local.py    local up | down | status | stop | start
    backup.py   backup, backup list                  pgBackRest backups of the cluster
    rollout.py  rollout                              update an OnDelete StatefulSet, member by member
    common.py   exit codes, --config / --dir, a DCS connection for one command

The lab's commands (bench, chaos, lab sim) have their parsers in pgsidecar/lab/, imported only
when the command line names one of them or asks for the list of commands; the lab's tooling used
by the other commands (a local cluster for --dir) is imported when the command runs. `pgsidecar run`
never imports pgsidecar.lab.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from pgsidecar.cli import backup, cluster, local, members, records, rollout, run
from pgsidecar.cli.common import EXIT_CONFIG
from pgsidecar.cli.run import cmd_run
from pgsidecar.config import ConfigError

__all__ = ["build_parser", "cmd_run", "main"]

# commands whose parsers live in the lab (pgsidecar/lab/): their modules are imported only when
# the command line names one of them, or asks for the list of commands
LAB_PARSERS = {
    "bench": "pgsidecar.lab.bench",
    "chaos": "pgsidecar.lab.faults",
    "lab": "pgsidecar.lab.sim.command",
}


def _command(argv: list[str] | None) -> str | None:
    args = sys.argv[1:] if argv is None else argv
    return next((a for a in args if not a.startswith("-")), None)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The CLI's parser. ``argv`` (default sys.argv[1:]) decides whether the lab's commands are
    added: `pgsidecar run` in a container never imports the lab (tests/unit/test_layers.py)."""
    p = argparse.ArgumentParser(prog="pgsidecar", description="PostgreSQL high-availability agent")
    sub = p.add_subparsers(dest="cmd", required=True)
    # in the order `pgsidecar --help` lists them
    run.add_parser(sub)
    cluster.add_list_parser(sub)
    members.add_switchover_parser(sub)
    records.add_parsers(sub)
    local.add_parser(sub)
    cluster.add_parsers(sub)
    backup.add_parser(sub)
    rollout.add_parser(sub)
    command = _command(argv)
    if command is None or command in LAB_PARSERS:
        for module in LAB_PARSERS.values():
            importlib.import_module(module).add_parser(sub)
    members.add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"pgsidecar: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130
