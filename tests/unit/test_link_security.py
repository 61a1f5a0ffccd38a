"""Record signatures (events/recordauth.py), the Kafka and PostgreSQL TLS settings, pg_hba with
hostssl, and how history marks records that do not verify."""

from __future__ import annotations

import ssl
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydantic import SecretStr, ValidationError

from events.kafka import Skipped, _check, client_security, encode, record_keys
from events.recordauth import HEADER, RecordAuthError, RecordKeys
from events.settings import ConfigError, KafkaSettings
from fsm.records import Record, Transition
from pgsidecar.history import format_history
from pgsidecar.lab import tlsgen

KEY = b"0123456789abcdef0123456789abcdef-current"
OLD = b"0123456789abcdef0123456789abcdef-previous"


def record(seq: int = 1) -> Record:
    return Record("input", "c1", "pg-1", seq, time.time(), 3, {"type": "pg", "n": seq})


def message(value: bytes, headers: list[tuple[str, bytes]]) -> SimpleNamespace:
    return SimpleNamespace(value=value, key=b"pg-1", headers=headers, offset=0)


def test_a_signed_record_verifies_and_every_change_is_caught() -> None:
    keys = RecordKeys(KEY)
    value = encode(record())
    headers = keys.headers(value)
    assert headers[0][0] == HEADER
    keys.verify(value, headers)
    assert _check(message(value, headers), "c1", keys).seq == 1
    flipped = b"1" if headers[0][1].endswith(b"0") else b"0"
    cases = {
        "unsigned": (value, []),
        "value changed": (value.replace(b'"n":1', b'"n":2'), headers),
        "other key": (value, RecordKeys(b"x" * 40).headers(value)),
        "digest changed": (value, [(HEADER, headers[0][1][:-1] + flipped)]),
        "garbage header": (value, [(HEADER, b"\xff\xfe")]),
        "two signatures": (value, headers + headers),
    }
    for what, (v, h) in cases.items():
        with pytest.raises(RecordAuthError) as info:
            _check(message(v, h), "c1", keys)
        assert info.value.reason == ("unsigned" if what == "unsigned" else "forged"), what


def test_the_previous_key_still_verifies_during_a_rotation() -> None:
    value = encode(record())
    signed_by_old = RecordKeys(OLD).headers(value)
    RecordKeys(KEY, [OLD]).verify(value, signed_by_old)
    with pytest.raises(RecordAuthError, match="unknown key"):
        RecordKeys(KEY).verify(value, signed_by_old)


def test_keys_come_from_files_and_never_show(tmp_path: Path) -> None:
    (tmp_path / "key").write_bytes(KEY + b"\n")
    (tmp_path / "short").write_bytes(b"too-short-secret")
    settings = KafkaSettings(record_key_file=tmp_path / "key")
    keys = record_keys(settings)
    assert keys is not None and KEY.decode() not in repr(keys)
    value = encode(record())
    RecordKeys(KEY).verify(value, keys.headers(value))  # the newline is not part of the key
    with pytest.raises(ConfigError, match="at least 32") as info:
        record_keys(KafkaSettings(record_key_file=tmp_path / "short"))
    assert "too-short-secret" not in str(info.value)
    with pytest.raises(ConfigError, match="record_key_file"):
        record_keys(KafkaSettings(record_key_file=tmp_path / "missing"))
    assert record_keys(KafkaSettings()) is None


def test_history_marks_unauthenticated_records() -> None:
    t = Transition("c1", "pg-1", 1, time.time(), "init", "replica", "start", "", 1, 1, 0)
    skipped = [
        Skipped("partition 0 offset 3", "unauthenticated, forged: x", unauthenticated=True),
        Skipped("partition 0 offset 4", "not JSON"),
    ]
    text = format_history([t.to_record()], skipped=skipped)
    assert "2 records skipped (1 UNAUTHENTICATED: unsigned or forged, not used)" in text


def test_kafka_security_settings(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="SASL_SSL needs"):
        KafkaSettings(security_protocol="SASL_SSL")
    with pytest.raises(ValidationError, match="only sent over TLS"):
        KafkaSettings(sasl_username="u", sasl_password=SecretStr("p"))
    with pytest.raises(ValidationError, match="security_protocol is PLAINTEXT"):
        KafkaSettings(ssl_ca_file=tmp_path / "ca.crt")
    assert client_security(KafkaSettings()) == {}

    material = tlsgen.generate(tmp_path / "tls", ["kafka"])
    (tmp_path / "pw").write_text("secret-pw\n")
    sasl = KafkaSettings(
        security_protocol="SASL_SSL",
        ssl_ca_file=material.ca_cert,
        sasl_username="agent",
        sasl_password_file=tmp_path / "pw",
    )
    args = client_security(sasl)
    assert args["security_protocol"] == "SASL_SSL"
    assert args["sasl_mechanism"] == "SCRAM-SHA-512"
    assert args["sasl_plain_password"] == "secret-pw"
    assert isinstance(args["ssl_context"], ssl.SSLContext)
    assert args["ssl_context"].verify_mode == ssl.CERT_REQUIRED
    assert args["ssl_context"].check_hostname
    assert "secret-pw" not in repr(sasl) and "secret-pw" not in str(sasl)

    client = material.member("client")
    mutual = KafkaSettings(
        security_protocol="SSL",
        ssl_ca_file=material.ca_cert,
        ssl_cert_file=client.cert,
        ssl_key_file=client.key,
    )
    assert "sasl_mechanism" not in client_security(mutual)
    broken = KafkaSettings(security_protocol="SSL", ssl_ca_file=tmp_path / "nope.crt")
    with pytest.raises(ConfigError, match="kafka.ssl_ca_file"):
        client_security(broken)


def test_postgres_tls_settings_and_hba() -> None:
    from pgsidecar.config import PostgresTls
    from pgsidecar.postgres.config import render_hba

    with pytest.raises(ValidationError, match="enabled is false"):
        PostgresTls(ca_file=Path("/x"))
    with pytest.raises(ValidationError, match="cert_file needs ca_file"):
        PostgresTls(enabled=True, cert_file=Path("/c"), key_file=Path("/k"))
    with pytest.raises(ValidationError, match="go together"):
        PostgresTls(enabled=True, cert_file=Path("/c"), ca_file=Path("/ca"))
    PostgresTls(enabled=True, ca_file=Path("/ca"), ca_key_file=Path("/cakey"))
    PostgresTls(enabled=True)
    nets = ["127.0.0.1/32", "127.0.0.0/8", "::1/128", "10.0.0.0/8", "0.0.0.0/0"]
    plain = render_hba(nets)
    assert "hostssl" not in plain
    lines = render_hba(nets, tls=True).splitlines()[2:]
    kinds = {line.split()[3]: line.split()[0] for line in lines}
    assert kinds == {
        "127.0.0.1/32": "host",
        "127.0.0.0/8": "host",
        "::1/128": "host",
        "10.0.0.0/8": "hostssl",
        "0.0.0.0/0": "hostssl",
    }


@pytest.mark.parametrize("backend", ["cryptography", "openssl"])
def test_generated_certificates_verify_against_their_ca(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil
    import subprocess

    from pgsidecar import tlscerts

    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to check the certificates")
    if backend == "openssl":
        monkeypatch.setattr(tlscerts, "_have_cryptography", lambda: False)
    material = tlsgen.generate(tmp_path, ["pg-1"], ["10.1.2.3", "pg-1.example"])
    for name in ("pg-1", "client"):
        issued = material.member(name)
        assert oct(issued.key.stat().st_mode & 0o777) == "0o600"
        check = subprocess.run(
            ["openssl", "verify", "-CAfile", str(material.ca_cert), str(issued.cert)],
            capture_output=True,
            text=True,
        )
        assert check.returncode == 0, check.stdout + check.stderr
        text = subprocess.run(
            ["openssl", "x509", "-noout", "-text", "-in", str(issued.cert)],
            capture_output=True,
            text=True,
        ).stdout
        assert "IP Address:10.1.2.3" in text and "DNS:pg-1.example" in text
        assert ("CN = pg-1" in text or "CN=pg-1" in text) == (name == "pg-1")
