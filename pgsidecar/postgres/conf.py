"""Pure text helpers: libpq connection strings, pgpass lines, postgresql.conf values and sizes,
pg_controldata, LSNs and timeline history files.

No I/O here, so the quoting rules (where a stray quote or backslash would break a config file, or a
password would end up in the wrong field) can be unit-tested without a server.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
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


@dataclass(frozen=True)
class Conninfo:
    """A PostgreSQL server to connect to (a peer, or the local one)."""

    host: str
    port: int | str  # "5432,5433" with a host list: libpq tries each in turn
    user: str
    dbname: str = "postgres"
    application_name: str | None = None
    # TLS: libpq's sslmode and the CA to verify the server with; require_auth refuses any
    # authentication but the one named (libpq >= 16; see postgres/tls.py)
    sslmode: str | None = None
    sslrootcert: str | None = None
    require_auth: str | None = None

    def dsn(self, passfile: Path, **extra: Any) -> str:
        """libpq keyword/value string. The password comes from ``passfile``, never inline.
        ``extra`` adds/overrides libpq keywords (connect_timeout, options, ...); an extra of
        None removes the keyword."""
        params: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "dbname": self.dbname,
            "application_name": self.application_name,
            "passfile": str(passfile),
            "sslmode": self.sslmode,
            "sslrootcert": self.sslrootcert,
            "require_auth": self.require_auth,
        }
        params.update(extra)
        if "password" in params:
            raise ValueError("passwords belong in the passfile, not in a connection string")
        return make_dsn(params)


def local_host(listen: str) -> str:
    """The address the agent reaches its own server at: the first of ``listen_addresses``, or the
    loopback address when it listens on every address."""
    first = listen.split(",")[0].strip()
    if first in ("", "*", "0.0.0.0"):
        return "127.0.0.1"
    if first == "::":
        return "::1"
    return first


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


# PostgreSQL's memory units, powers of 1024, spelled as postgresql.conf wants them (case matters
# there; parse_size, for values a person types on the command line or in a URL, ignores case)
MEMORY_UNITS: dict[str, int] = {"B": 1, "kB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}
_SIZE_UNITS = {"": 1, **{unit.lower(): size for unit, size in MEMORY_UNITS.items()}}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*")


def parse_size(text: str, *, whole: bool = False) -> int:
    """``1048576``, ``1024kB``, ``10MB``, ``1.5GB`` -> bytes (rounded down); a unit is one of
    PostgreSQL's memory units in any case. ``whole`` refuses a fraction. Raises ValueError."""
    m = _SIZE.fullmatch(text)
    if m is None or m.group(2).lower() not in _SIZE_UNITS or (whole and not m.group(1).isdigit()):
        raise ValueError(f"not a size: {text!r}")
    number, unit = m.group(1), _SIZE_UNITS[m.group(2).lower()]
    # a whole number stays exact (a float loses bytes above 2**53)
    return int(number) * unit if number.isdigit() else int(float(number) * unit)


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
