"""PostgreSQL with ``postgresql.tls`` against real PostgreSQL 15: hostssl for every non-local
address, verify-full connections, a replica streaming over TLS, certificate rotation by reload,
and generated certificates."""

from __future__ import annotations

import socket
import ssl
import struct
import subprocess
from pathlib import Path

import psycopg
import pytest
from cryptography import x509

from pgsidecar.config import PostgresTls
from pgsidecar.lab import tlsgen
from pgsidecar.postgres.control import PostgresControl
from pgsidecar.postgres.tls import REQUIRE_AUTH_MIN_LIBPQ, tools_libpq_version
from tests.support.pgtestutil import PG_BIN, SU_PASSWORD, Lab, query, wait_for

pytestmark = pytest.mark.timeout(240)


def outside_address() -> str | None:
    """An address of this host that is not loopback: a connection to it comes from it."""
    out = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        addr = line.split()[3].split("/")[0]
        if not addr.startswith("127."):
            return addr
    return None


ADDR = outside_address()
needs_address = pytest.mark.skipif(ADDR is None, reason="no non-loopback IPv4 address here")


def tls_member(lab: Lab, material: tlsgen.TlsMaterial, name: str) -> PostgresControl:
    assert ADDR is not None
    issued = material.member(name)
    return lab.control(
        name,
        listen=f"127.0.0.1,{ADDR}",
        connect_address=ADDR,
        hba_networks=["127.0.0.1/32", f"{ADDR}/32"],
        tls=PostgresTls(
            enabled=True, cert_file=issued.cert, key_file=issued.key, ca_file=material.ca_cert
        ),
    )


def server_certificate(host: str, port: int) -> x509.Certificate:
    """The certificate the server presents now (PostgreSQL's SSLRequest, then a handshake)."""
    with socket.create_connection((host, port), timeout=5) as raw:
        raw.sendall(struct.pack("!ii", 8, 80877103))
        assert raw.recv(1) == b"S", "the server refused TLS"
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # only reading what it presents
        with ctx.wrap_socket(raw, server_hostname=host) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def connect(host: str, port: int, **options: str) -> psycopg.Connection:
    return psycopg.connect(
        host=host,
        port=port,
        user="postgres",
        password=SU_PASSWORD,
        dbname="postgres",
        connect_timeout=5,
        autocommit=True,
        **options,
    )


@needs_address
async def test_plaintext_from_another_address_is_refused_verify_full_works(
    lab: Lab, tmp_path: Path
) -> None:
    assert ADDR is not None
    material = tlsgen.generate(tmp_path / "tls", ["a"], [ADDR])
    a = tls_member(lab, material, "a")
    a.write_config("primary", None, None)
    await a.start(30)
    hba = (a.data_dir / "pg_hba.conf").read_text()
    assert f"hostssl all          all   {ADDR}/32" in hba
    assert "host    all          all   127.0.0.1/32" in hba

    with pytest.raises(psycopg.OperationalError, match="no encryption"):
        connect(ADDR, a.settings.port, sslmode="disable")
    with connect(
        ADDR, a.settings.port, sslmode="verify-full", sslrootcert=str(material.ca_cert)
    ) as conn:
        row = conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()
        assert row == (True,)
    # a CA that did not sign the server's certificate: verify-full refuses the server
    other = tlsgen.generate(tmp_path / "other", [])
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        connect(ADDR, a.settings.port, sslmode="verify-full", sslrootcert=str(other.ca_cert))

    # the agent's own connections: verify-full to the outside address, verify-ca to loopback,
    # SCRAM only where psycopg's libpq knows require_auth
    peer = a.superuser_conninfo(ADDR)
    assert peer.sslmode == "verify-full" and peer.sslrootcert == str(a.tls.ca_cert)
    assert a.superuser_conninfo().sslmode == "verify-ca"
    want = "scram-sha-256" if psycopg.pq.version() >= REQUIRE_AUTH_MIN_LIBPQ else None
    assert peer.require_auth == want
    assert await query(
        peer, a.passfile, "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
    ) == [(True,)]
    assert await a.probe()
    assert SU_PASSWORD not in lab.log.text()


@needs_address
async def test_a_replica_streams_over_tls(lab: Lab, tmp_path: Path) -> None:
    assert ADDR is not None
    material = tlsgen.generate(tmp_path / "tls", ["a", "b"], [ADDR])
    a = tls_member(lab, material, "a")
    a.write_config("primary", None, None)
    await a.start(30)
    b = tls_member(lab, material, "b")
    await b.wipe_data()
    upstream = b.replication_conninfo(ADDR, a.settings.port)
    assert upstream.sslmode == "verify-full"
    await b.basebackup(upstream)  # pg_basebackup over verify-full
    b.write_config("standby", upstream, None)
    conf = (b.data_dir / "postgresql.conf").read_text()
    assert "sslmode=verify-full" in conf and f"sslrootcert={b.tls.ca_cert}" in conf
    if tools_libpq_version(PG_BIN) < REQUIRE_AUTH_MIN_LIBPQ:
        # the walreceiver's libpq would refuse the keyword
        assert "require_auth" not in conf
    await b.start(60)

    async def streaming_over_tls() -> list[tuple[object, ...]]:
        return await query(
            a.superuser_conninfo(),
            a.passfile,
            "SELECT r.application_name, s.ssl FROM pg_stat_replication r "
            "JOIN pg_stat_ssl s ON s.pid = r.pid WHERE r.state = 'streaming'",
        )

    rows = await wait_for(streaming_over_tls, 30, what="b streaming")
    assert rows == [("b", True)]


async def test_certificate_rotation_by_reload_and_generated_certificates(
    lab: Lab, tmp_path: Path
) -> None:
    material = tlsgen.generate(tmp_path / "tls", ["a"])
    issued = material.member("a")
    a = lab.control(
        "a",
        tls=PostgresTls(
            enabled=True, cert_file=issued.cert, key_file=issued.key, ca_file=material.ca_cert
        ),
    )
    a.write_config("primary", None, None)
    await a.start(30)
    port = a.settings.port
    before = server_certificate("127.0.0.1", port)
    with connect("127.0.0.1", port, sslmode="verify-full", sslrootcert=str(material.ca_cert)):
        pass
    # the operator replaces the files; the agent rewrites its config and reloads
    material.issue("a")
    a.write_config("primary", None, None)
    await a.reload()
    after = server_certificate("127.0.0.1", port)
    assert after.serial_number != before.serial_number
    assert (
        after.serial_number
        == x509.load_pem_x509_certificate(issued.cert.read_bytes()).serial_number
    )
    with connect("127.0.0.1", port, sslmode="verify-full", sslrootcert=str(material.ca_cert)):
        pass

    # no files at all: the member makes a CA and a certificate of its own
    g = lab.control("g", tls=PostgresTls(enabled=True))
    g.write_config("primary", None, None)
    await g.start(30)
    ca = g.tls.ca_cert
    assert ca.exists() and oct((g.tls.dir / "server.key").stat().st_mode & 0o777) == "0o600"
    with connect("127.0.0.1", g.settings.port, sslmode="verify-full", sslrootcert=str(ca)) as c:
        assert c.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone() == (
            True,
        )
