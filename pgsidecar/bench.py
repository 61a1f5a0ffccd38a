"""`pgsidecar bench failover`: measured later in this file."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    pass
