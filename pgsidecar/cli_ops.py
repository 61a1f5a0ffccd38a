"""Day-to-day operator commands (issue 7): registered into the `pgsidecar` parser by cli.py."""

from __future__ import annotations

import argparse


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add this module's subcommands to the top-level parser."""
