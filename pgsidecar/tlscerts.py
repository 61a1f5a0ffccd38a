"""A small certificate authority: a self-signed CA and certificates it signs (server and client
use, with the names they answer to), as PEM files whose keys are 0600.

Used where the user asks for generated certificates instead of providing their own: PostgreSQL's
server certificate (``postgresql.tls`` with a CA key, or with no files at all) and the lab's
``tlsgen`` (a CA and a certificate per member for a local cluster). With the ``cryptography``
package installed it is used; without it, the ``openssl`` command. Keys are ECDSA P-256 in
PKCS#8 (PostgreSQL, etcd, Kafka's PEM key store and Python's ssl all read it).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

CA_DAYS = 3650
CERT_DAYS = 825
KEY_MODE = 0o600


class CertError(RuntimeError):
    """A certificate could not be generated; the message says why (never a key)."""


def _have_cryptography() -> bool:
    try:
        import cryptography  # noqa: F401
    except ImportError:
        return False
    return True


def _write_key(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, KEY_MODE)
    try:
        os.fchmod(fd, KEY_MODE)
        os.write(fd, data)
    finally:
        os.close(fd)


def split_names(names: Iterable[str]) -> tuple[list[str], list[str]]:
    """(DNS names, IP addresses) of ``names``, in order, without duplicates."""
    dns: list[str] = []
    ips: list[str] = []
    for name in names:
        try:
            ip = str(ipaddress.ip_address(name))
        except ValueError:
            if name and name not in dns:
                dns.append(name)
            continue
        if ip not in ips:
            ips.append(ip)
    return dns, ips


def make_ca(cert: Path, key: Path, common_name: str = "pgsidecar CA", days: int = CA_DAYS) -> None:
    """A self-signed CA certificate at ``cert`` and its key at ``key`` (0600)."""
    if _have_cryptography():
        _crypto_ca(cert, key, common_name, days)
    else:
        _openssl_ca(cert, key, common_name, days)


def issue(
    ca_cert: Path,
    ca_key: Path,
    cert: Path,
    key: Path,
    common_name: str,
    names: Iterable[str] = (),
    days: int = CERT_DAYS,
    *,
    subject_cn: bool = True,
) -> None:
    """A certificate for ``common_name`` signed by the CA, valid for server and client
    authentication, whose subjectAltName lists ``names`` (host names and IP addresses) and the
    common name. ``subject_cn=False`` leaves the CommonName out of the subject (O=pgsidecar
    instead): etcd's JSON gateway refuses a client certificate with a CommonName when
    authentication is on, as it cannot pass the name on as the user."""
    dns, ips = split_names([common_name, *names])
    subject = f"CN={common_name}" if subject_cn else "O=pgsidecar"
    if _have_cryptography():
        _crypto_issue(ca_cert, ca_key, cert, key, subject, dns, ips, days)
    else:
        _openssl_issue(ca_cert, ca_key, cert, key, subject, dns, ips, days)


# ------------------------------------------------------------------------------ cryptography


def _crypto_ca(cert: Path, key: Path, common_name: str, days: int) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    built = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(private.public_key()), False)
        .sign(private, hashes.SHA256())
    )
    _write_crypto_pair(cert, key, built, private)


def _crypto_issue(
    ca_cert: Path,
    ca_key: Path,
    cert: Path,
    key: Path,
    subject: str,
    dns: list[str],
    ips: list[str],
    days: int,
) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    try:
        ca = x509.load_pem_x509_certificate(ca_cert.read_bytes())
        signer = serialization.load_pem_private_key(ca_key.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        # the exception's text never holds key material; name only the files
        raise CertError(f"cannot read the CA {ca_cert} / {ca_key}: {type(exc).__name__}") from None
    if not isinstance(signer, ec.EllipticCurvePrivateKey | _rsa_key_type()):
        raise CertError(f"the CA key {ca_key} is neither an EC nor an RSA key")
    attribute, value = subject.split("=", 1)
    oid = NameOID.COMMON_NAME if attribute == "CN" else NameOID.ORGANIZATION_NAME
    private = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    alt: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    alt += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    built = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(oid, value)]))
        .issuer_name(ca.subject)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(signer, hashes.SHA256())  # type: ignore[arg-type]
    )
    _write_crypto_pair(cert, key, built, private)


def _write_crypto_pair(
    cert: Path, key: Path, built: x509.Certificate, private: ec.EllipticCurvePrivateKey
) -> None:
    """The key (PKCS#8 PEM, 0600) and the certificate (PEM) made with ``cryptography``."""
    from cryptography.hazmat.primitives import serialization

    _write_key(
        key,
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    cert.parent.mkdir(parents=True, exist_ok=True)
    cert.write_bytes(built.public_bytes(serialization.Encoding.PEM))


def _rsa_key_type() -> type:
    from cryptography.hazmat.primitives.asymmetric import rsa

    return rsa.RSAPrivateKey


# ------------------------------------------------------------------------------ openssl


def _openssl(*args: str) -> None:
    binary = shutil.which("openssl")
    if binary is None:
        raise CertError(
            "neither the Python package cryptography nor the openssl command is installed: "
            "install one (pip install cryptography, or apt-get install openssl)"
        )
    proc = subprocess.run([binary, *args], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise CertError(f"openssl {args[0]} failed: {proc.stderr.strip()[-500:]}")


def _openssl_key(key: Path) -> None:
    key.parent.mkdir(parents=True, exist_ok=True)
    _write_key(key, b"")  # created 0600 before the key is in it
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(key))


def _openssl_ca(cert: Path, key: Path, common_name: str, days: int) -> None:
    _openssl_key(key)
    _openssl(
        "req", "-x509", "-new", "-key", str(key), "-sha256", "-days", str(days),
        "-subj", f"/CN={common_name}", "-out", str(cert),
        "-addext", "basicConstraints=critical,CA:TRUE,pathlen:0",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
    )  # fmt: skip


def _openssl_issue(
    ca_cert: Path,
    ca_key: Path,
    cert: Path,
    key: Path,
    subject: str,
    dns: list[str],
    ips: list[str],
    days: int,
) -> None:
    _openssl_key(key)
    alt = ",".join([f"DNS:{d}" for d in dns] + [f"IP:{i}" for i in ips])
    with tempfile.TemporaryDirectory() as tmp:
        csr = Path(tmp) / "req.csr"
        ext = Path(tmp) / "ext.cnf"
        ext.write_text(
            f"basicConstraints=critical,CA:FALSE\nsubjectAltName={alt}\n"
            "extendedKeyUsage=serverAuth,clientAuth\n"
        )
        _openssl("req", "-new", "-key", str(key), "-subj", f"/{subject}", "-out", str(csr))
        _openssl(
            "x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
            "-CAcreateserial", "-CAserial", str(Path(tmp) / "ca.srl"), "-sha256",
            "-days", str(days), "-extfile", str(ext), "-out", str(cert),
        )  # fmt: skip
