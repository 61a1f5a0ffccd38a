"""The one exception of pgsidecar.postgres."""

from __future__ import annotations


class PostgresError(Exception):
    """A PostgreSQL operation failed. The message names the command or statement, and for a tool
    its exit code and the last lines of its stderr; it never contains a password."""


def tail(text: str, lines: int = 15) -> str:
    """The last non-blank ``lines`` of a tool's output or of the server log, for an error message."""
    kept = [ln for ln in text.strip().splitlines() if ln.strip()][-lines:]
    return "\n".join(kept) if kept else "(no output)"
