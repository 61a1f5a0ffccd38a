"""Fault injection against a local cluster (issue 6): `pgsidecar chaos`."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `pgsidecar chaos` to the top-level parser."""
