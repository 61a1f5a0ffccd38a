"""PostgreSQL's TLS: the server's certificate files, the server parameters that use them, and the
client options every connection to a member carries.

The server reads its files from ``state_dir/tls`` (server.crt, server.key, ca.crt), owned by the
OS user that runs PostgreSQL, the key 0600: PostgreSQL refuses a key anyone else can read, and a
key the operator mounted as root (a Kubernetes Secret) is not readable by that user. So the
provided files are copied there each time the configuration is written, and a reload makes
PostgreSQL read them again: replacing the provided files and reloading rotates the certificate.

Clients: connections to another member use ``postgresql.tls.sslmode`` (verify-full by
default) with ``sslrootcert`` = the CA; connections to a loopback address use verify-ca (the
certificate a user provides rarely names 127.0.0.1, and the connection never leaves the host).
``require_auth=scram-sha-256`` refuses a server that asks for anything but SCRAM; it is a libpq
16 option: it is added to the agent's own connections when psycopg's libpq has it, and to the
connection strings of PostgreSQL's tools (walreceiver, pg_basebackup, pg_rewind) only when the
libpq of ``bin_dir``'s programs has it (Debian's PostgreSQL 15 links libpq 15: not there).
"""

from __future__ import annotations

import functools
import ipaddress
import os
import re
import socket
import subprocess
from pathlib import Path
from typing import Any

from pgsidecar import tlscerts
from pgsidecar.config import PostgresSettings
from pgsidecar.postgres.errors import PostgresError
from pgsidecar.postgres.osuser import OsUser

REQUIRE_AUTH_MIN_LIBPQ = 160000
SERVER_CERT = "server.crt"
SERVER_KEY = "server.key"
CA_CERT = "ca.crt"


def psycopg_libpq_version() -> int:
    import psycopg

    return int(psycopg.pq.version())


@functools.cache
def tools_libpq_version(bin_dir: Path) -> int:
    """The libpq major version (as 150000) the programs in ``bin_dir`` load, from the file name
    ldd resolves (libpq.so.5.<major>); 0 when it cannot be told."""
    try:
        out = subprocess.run(
            ["ldd", str(bin_dir / "pg_basebackup")], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    match = re.search(r"libpq\.so\.5 => (\S+)", out)
    if match is None:
        return 0
    minor = re.search(r"libpq\.so\.5\.(\d+)", os.path.realpath(match.group(1)))
    return int(minor.group(1)) * 10000 if minor else 0


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class PostgresTlsFiles:
    def __init__(self, settings: PostgresSettings, state_dir: Path, osuser: OsUser) -> None:
        self.settings = settings
        self.tls = settings.tls
        self.dir = state_dir / "tls"
        self.osuser = osuser

    @property
    def enabled(self) -> bool:
        return self.tls.enabled

    @property
    def ca_cert(self) -> Path:
        """The CA clients verify members with: a copy of ``ca_file`` (readable by the OS user,
        which runs the walreceiver, pg_basebackup and pg_rewind), else the generated CA."""
        return self.dir / CA_CERT

    def names(self) -> list[str]:
        """What a generated server certificate names: the addresses peers use, the host name,
        loopback."""
        out = [self.settings.host, socket.gethostname(), socket.getfqdn()]
        out += [a.strip() for a in self.settings.listen.split(",")]
        out += ["localhost", "127.0.0.1", "::1"]
        return [n for n in out if n and n not in ("*", "0.0.0.0", "::")]

    def install(self) -> None:
        """Put the server's files in place (copies of the provided ones, or generated)."""
        if not self.enabled:
            return
        self.osuser.ensure_dir(self.dir, "state_dir/tls (PostgreSQL's certificate and key)")
        tls = self.tls
        if tls.ca_file is not None:
            self._copy(tls.ca_file, CA_CERT, "postgresql.tls.ca_file", 0o644)
        if tls.cert_file is not None and tls.key_file is not None:
            self._copy(tls.cert_file, SERVER_CERT, "postgresql.tls.cert_file", 0o644)
            self._copy(tls.key_file, SERVER_KEY, "postgresql.tls.key_file", 0o600)
            return
        if tls.ca_file is not None and tls.ca_key_file is not None:
            ca_cert, ca_key = self.dir / CA_CERT, tls.ca_key_file
        else:
            ca_cert, ca_key = self.dir / CA_CERT, self.dir / "ca.key"
            if not (ca_cert.exists() and ca_key.exists()):
                tlscerts.make_ca(ca_cert, ca_key, f"pgsidecar CA of {self.settings.host}")
                self.osuser.chown(ca_key)
                self.osuser.chown(ca_cert)
        stamp = self.dir / "issued-by"
        want = _fingerprint(ca_cert) + " " + " ".join(self.names())
        current = stamp.read_text() if stamp.exists() else ""
        if current != want or not (self.dir / SERVER_CERT).exists():
            try:
                tlscerts.issue(
                    ca_cert,
                    ca_key,
                    self.dir / SERVER_CERT,
                    self.dir / SERVER_KEY,
                    self.settings.host,
                    self.names(),
                )
            except tlscerts.CertError as exc:
                raise PostgresError(f"postgresql.tls: {exc}") from None
            for name in (SERVER_CERT, SERVER_KEY):
                self.osuser.chown(self.dir / name)
            self.osuser.write_file(stamp, want, 0o644)

    def _copy(self, source: Path, name: str, setting: str, mode: int) -> None:
        try:
            data = source.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise PostgresError(
                f"cannot read {setting} {source}: {getattr(exc, 'strerror', None) or 'not PEM text'}"
            ) from None
        self.osuser.write_file(self.dir / name, data, mode)

    def server_parameters(self) -> dict[str, Any]:
        if not self.enabled:
            return {}
        return {
            "ssl": True,
            "ssl_cert_file": str(self.dir / SERVER_CERT),
            "ssl_key_file": str(self.dir / SERVER_KEY),
            "ssl_min_protocol_version": "TLSv1.2",
        }

    def client_options(self, host: str, *, for_tools: bool = False) -> dict[str, str | None]:
        """libpq options of a connection to ``host``: sslmode, sslrootcert, require_auth."""
        if not self.enabled:
            return {}
        libpq = tools_libpq_version(self.settings.bin_dir) if for_tools else psycopg_libpq_version()
        return {
            "sslmode": "verify-ca" if is_loopback(host) else self.tls.sslmode,
            "sslrootcert": str(self.ca_cert),
            "require_auth": "scram-sha-256" if libpq >= REQUIRE_AUTH_MIN_LIBPQ else None,
        }


def _fingerprint(path: Path) -> str:
    import hashlib

    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    except OSError as exc:
        raise PostgresError(f"cannot read the CA {path}: {exc.strerror}") from None
