"""The client side of TLS to a service of ours (etcd, the Kafka brokers): a context from the files
the settings name, and why a load or a handshake failed, said without a file's content."""

from __future__ import annotations

import ssl
from pathlib import Path

from events.settings import ConfigError


def client_context(
    ca_file: Path | None,
    cert_file: Path | None,
    key_file: Path | None,
    *,
    ca_setting: str,
    cert_setting: str,
    key_setting: str,
) -> ssl.SSLContext:
    """The server's CA from ``ca_file`` (else the system's) and, when both files are given, our
    client certificate and key. A file that cannot be loaded is a ConfigError naming its
    setting (``ca_setting`` ...), the path and why."""
    try:
        context = ssl.create_default_context(cafile=str(ca_file) if ca_file is not None else None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load {ca_setting} {ca_file}: {tls_reason(exc)}") from None
    if cert_file is not None and key_file is not None:
        try:
            context.load_cert_chain(str(cert_file), str(key_file))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"cannot load {cert_setting} {cert_file} with {key_setting} {key_file}: "
                f"{tls_reason(exc)}"
            ) from None
    return context


def tls_reason(exc: BaseException) -> str:
    """An SSLError's reason or an OSError's strerror: never the content of a file."""
    return str(getattr(exc, "reason", None) or getattr(exc, "strerror", None) or type(exc).__name__)
