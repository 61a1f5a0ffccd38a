"""Certificates for a local or test cluster: one CA and a certificate per member (server and
client use), written into one directory. ``pgsidecar local up --tls`` and the TLS tests take
their material from here; a production cluster brings its own CA.

Layout of ``directory``::

    ca.crt, ca.key                 the CA (ca.key 0600; keep it, or delete it once issued)
    <member>.crt, <member>.key     one per member: CN = the member's name, subjectAltName = the
                                   name, localhost, 127.0.0.1, ::1 and the extra hosts given
    client.crt, client.key         for clients of etcd (the agents, the CLI, tests): no
                                   CommonName, which etcd's JSON gateway refuses when
                                   authentication is on
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pgsidecar import tlscerts

LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


@dataclass(frozen=True)
class TlsMaterial:
    directory: Path
    ca_cert: Path
    ca_key: Path

    def member(self, name: str) -> Issued:
        return Issued(self.directory / f"{name}.crt", self.directory / f"{name}.key")

    def issue(self, name: str, hosts: Iterable[str] = (), *, subject_cn: bool = True) -> Issued:
        """(Re)issue ``name``'s certificate, for the loopback names and ``hosts``."""
        out = self.member(name)
        tlscerts.issue(
            self.ca_cert,
            self.ca_key,
            out.cert,
            out.key,
            name,
            [*LOCAL_NAMES, *hosts],
            subject_cn=subject_cn,
        )
        return out


def generate(
    directory: Path | str,
    members: Iterable[str],
    hosts: Iterable[str] = (),
    *,
    client: str = "client",
) -> TlsMaterial:
    """A CA in ``directory`` (kept if it is there already) and a certificate for each member and
    for ``client``, valid for the loopback names plus ``hosts``."""
    directory = Path(directory)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    material = TlsMaterial(directory, directory / "ca.crt", directory / "ca.key")
    if not (material.ca_cert.exists() and material.ca_key.exists()):
        tlscerts.make_ca(material.ca_cert, material.ca_key, "pgsidecar local CA")
    extra = list(hosts)
    for name in members:
        material.issue(name, extra)
    material.issue(client, extra, subject_cn=False)
    return material
