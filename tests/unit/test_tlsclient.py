"""events.tlsclient: the TLS client context of etcd and Kafka from the files their settings name;
a file that does not load is a ConfigError naming the setting and the path, never the file's
content."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from events.settings import ConfigError
from events.tlsclient import client_context
from pgsidecar.lab import tlsgen

NAMES = {"ca_setting": "x.ca", "cert_setting": "x.cert", "key_setting": "x.key"}


def test_the_ca_and_the_client_certificate_are_loaded(tmp_path: Path) -> None:
    material = tlsgen.generate(tmp_path / "tls", ["server"])
    client = material.member("client")
    context = client_context(material.ca_cert, client.cert, client.key, **NAMES)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert len(context.get_ca_certs()) == 1


def test_a_ca_file_that_does_not_load_names_its_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=rf"cannot load x\.ca {tmp_path}/nope\.crt: "):
        client_context(tmp_path / "nope.crt", None, None, **NAMES)


def test_a_key_that_does_not_load_names_both_settings_and_not_its_content(
    tmp_path: Path,
) -> None:
    material = tlsgen.generate(tmp_path / "tls", ["server"])
    client = material.member("client")
    bad_key = tmp_path / "bad.key"
    bad_key.write_text("-----BEGIN PRIVATE KEY-----\nSECRET-MATERIAL\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ConfigError) as err:
        client_context(material.ca_cert, client.cert, bad_key, **NAMES)
    message = str(err.value)
    assert message.startswith(f"cannot load x.cert {client.cert} with x.key {bad_key}: ")
    assert "SECRET-MATERIAL" not in message
