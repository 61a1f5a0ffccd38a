"""Authenticated records: each record an agent publishes to Kafka carries an HMAC-SHA256 of its
value (the record's canonical JSON: sorted keys, no spaces, as ``events.kafka.encode`` writes
it) under the cluster's record key, in the Kafka header ``pgsidecar-hmac``.

Anyone who can write to the topic but does not hold the key can still write records, but not
ones that verify: the peer consumer drops them (counted) and ``history``/``replay`` mark them and
never use them. The key is a file (at least 32 bytes, e.g. ``head -c 48 /dev/urandom | base64``),
the same on every member; ``record_verify_key_files`` lists previous keys that still verify
while a new one is rolled out.

The header's value is ``v1:<key id>:<hex digest>``; the key id (the first 8 bytes of the
SHA-256 of the key, in hex) says which key signed, so verification needs no trial and
rotation can be told apart from forgery. It reveals nothing usable about the key.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Sequence
from pathlib import Path

from events.settings import ConfigError

HEADER = "pgsidecar-hmac"
MIN_KEY_BYTES = 32
_VERSION = "v1"


class RecordAuthError(ValueError):
    """A record that does not verify; ``reason`` is "unsigned" or "forged"."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


def key_id(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()[:16]


def _read_key(path: Path, setting: str) -> bytes:
    try:
        key = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read kafka.{setting} {path}: {exc.strerror}") from None
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(
            f"kafka.{setting} {path} holds {len(key)} bytes; a record key needs at least "
            f"{MIN_KEY_BYTES} (head -c 48 /dev/urandom | base64 > FILE)"
        )
    return key


class RecordKeys:
    """The key that signs and the keys that verify (the signing key among them)."""

    def __init__(self, signing: bytes, previous: Iterable[bytes] = ()) -> None:
        self._signing = signing
        self._signing_id = key_id(signing)
        self._verifying = {key_id(k): k for k in (signing, *previous)}

    @classmethod
    def from_files(cls, key_file: Path, previous_files: Sequence[Path] = ()) -> RecordKeys:
        """Read the keys; a ConfigError names the setting and file, never the content."""
        signing = _read_key(key_file, "record_key_file")
        previous = [_read_key(p, "record_verify_key_files") for p in previous_files]
        return cls(signing, previous)

    def __repr__(self) -> str:  # never shows a key
        return f"RecordKeys(signing={self._signing_id}, verifying={sorted(self._verifying)})"

    def sign(self, value: bytes) -> bytes:
        """The header value for a record whose Kafka value is ``value``."""
        digest = hmac.new(self._signing, value, hashlib.sha256).hexdigest()
        return f"{_VERSION}:{self._signing_id}:{digest}".encode()

    def headers(self, value: bytes) -> list[tuple[str, bytes]]:
        return [(HEADER, self.sign(value))]

    def verify(self, value: bytes, headers: Iterable[tuple[str, bytes]] | None) -> None:
        """Raise RecordAuthError unless ``headers`` carry a valid signature of ``value``."""
        signatures = [v for k, v in headers or () if k == HEADER]
        if not signatures:
            raise RecordAuthError("unsigned", "no record signature (header pgsidecar-hmac)")
        if len(signatures) > 1:
            raise RecordAuthError("forged", "more than one record signature")
        try:
            version, kid, digest = signatures[0].decode("ascii").split(":")
        except (UnicodeDecodeError, ValueError):
            raise RecordAuthError("forged", "malformed record signature") from None
        key = self._verifying.get(kid)
        if version != _VERSION or key is None:
            raise RecordAuthError("forged", f"signed with an unknown key (id {kid[:16]!r})")
        expected = hmac.new(key, value, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, digest):
            raise RecordAuthError("forged", "signature does not match the record")


def from_settings(key_file: Path | None, previous_files: Sequence[Path] = ()) -> RecordKeys | None:
    return None if key_file is None else RecordKeys.from_files(key_file, previous_files)
