"""Pure text helpers: libpq connection strings, pgpass lines, postgresql.conf values, pg_controldata.

No I/O here, so the quoting rules (where a stray quote or backslash would break a config file, or a
password would end up in the wrong field) can be unit-tested without a server.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from fsm.records import format_lsn as format_lsn  # re-exported: the one formatter

# libpq keyword/value strings: a value with spaces, quotes or backslashes (or an empty one) must be
# single-quoted, with ' and \ escaped by a backslash (libpq "Keyword/Value Connection Strings").
_DSN_BARE = re.compile(r"^[^\s'\\]+$")


def dsn_quote(value: str) -> str:
    if _DSN_BARE.match(value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def make_dsn(params: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={dsn_quote(str(v))}" for k, v in params.items() if v is not None)


def pgpass_escape(field: str) -> str:
    # .pgpass: ':' separates fields, so ':' and '\' inside a field are backslash-escaped
    return field.replace("\\", "\\\\").replace(":", "\\:")


def pgpass_line(user: str, password: str) -> str:
    if "\n" in password or "\n" in user:
        # a newline would end the line early and leave the rest of the password as a bogus entry
        raise ValueError(
            f"the password of user {user!r} contains a newline, which .pgpass cannot hold"
        )
    return f"*:*:*:{pgpass_escape(user)}:{pgpass_escape(password)}"


def conf_value(value: str | int | float | bool) -> str:
    """A postgresql.conf value. Strings are always quoted: '' doubles a quote, and a backslash is an
    escape character inside quoted GUC strings, so it is doubled too."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int | float):
        return str(value)
    text = str(value)
    if "\n" in text or "\r" in text:
        raise ValueError("a postgresql.conf value cannot contain a newline")
    return "'" + text.replace("\\", "\\\\").replace("'", "''") + "'"


def render_conf(params: Mapping[str, str | int | float | bool], header: str) -> str:
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    lines.append("")
    for key, value in params.items():
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_.]*$", key):
            raise ValueError(f"invalid PostgreSQL parameter name {key!r}")
        lines.append(f"{key} = {conf_value(value)}")
    return "\n".join(lines) + "\n"


def parse_lsn(text: str | None) -> int | None:
    """'16/B374D848' -> 0x16B374D848; None/'' -> None."""
    if not text:
        return None
    hi, sep, lo = text.strip().partition("/")
    if not sep:
        raise ValueError(f"not an LSN: {text!r}")
    return (int(hi, 16) << 32) | int(lo, 16)


def parse_controldata(output: str) -> dict[str, str]:
    """pg_controldata's "Key:   value" lines as a dict (run it with LC_ALL=C: keys are translated)."""
    out: dict[str, str] = {}
    for line in output.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key.strip()] = value.strip()
    return out


def parse_timeline_history(text: str) -> list[tuple[int, int]]:
    """A timeline history file: "<parent tli>\\t<switchpoint LSN>\\t<reason>" per line, '#' comments."""
    entries: list[tuple[int, int]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) < 2:
            continue
        lsn = parse_lsn(fields[1])
        if lsn is not None:
            entries.append((int(fields[0]), lsn))
    return entries


def strip_auto_conf(text: str, keys: frozenset[str]) -> tuple[str, bool]:
    """Drop ``key = ...`` lines for ``keys`` from postgresql.auto.conf (an ALTER SYSTEM there would
    silently override the upstream the agent chose). Returns (new text, changed)."""
    kept: list[str] = []
    changed = False
    for line in text.splitlines(keepends=True):
        m = re.match(r"^\s*([A-Za-z_][A-Za-z0-9_.]*)\s*=?", line)
        if m and m.group(1).lower() in keys:
            changed = True
            continue
        kept.append(line)
    return "".join(kept), changed
