"""``pgsidecar run``: the agent beside one PostgreSQL instance (what a container runs). Imports
neither the lab nor the other commands."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

import structlog

from pgsidecar.cli.common import EXIT_CONFIG
from pgsidecar.config import ConfigError, load_config


def setup_logging(level: str = "info") -> None:
    lvl = getattr(logging, level.upper(), logging.INFO)
    logging.basicConfig(level=lvl, stream=sys.stderr, format="%(message)s")
    # the transitions library logs every callback at INFO: our own transition records say more
    logging.getLogger("transitions").setLevel(logging.WARNING)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.JSONRenderer(sort_keys=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


def cmd_run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"pgsidecar: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(cfg.log_level)
    from pgsidecar.agent import build_agent

    agent = build_agent(cfg)
    return asyncio.run(agent.run())


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    r = sub.add_parser("run", help="run the agent beside one PostgreSQL instance")
    r.add_argument("--config", required=True, help="agent YAML config")
    r.set_defaults(func=cmd_run)
