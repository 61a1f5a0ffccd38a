"""The settings the adapters in events/ are built from, and the error a bad one raises. They live
here, below both, so that events/ imports nothing of pgsidecar; ``pgsidecar.config`` builds the
agent's whole config from them and re-exports them under their old names."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator


class ConfigError(Exception):
    """The configuration is invalid; the message names the field and what to do."""


def resolve_secret(
    value: SecretStr | None, path: Path | None, what: str, hint: str = ""
) -> str | None:
    """The secret given inline, or read from the file that holds it (a mounted Secret), stripped
    of surrounding whitespace; None when neither is set. An unreadable file is a ConfigError
    naming the setting (``what``) and the path, never the secret."""
    if value is not None:
        return value.get_secret_value()
    if path is None:
        return None
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}{hint}") from None


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EtcdSettings(Strict):
    # http(s)://host:port of the etcd v3 JSON gateway (the client URL)
    endpoints: list[str] = Field(default_factory=lambda: ["http://127.0.0.1:2379"], min_length=1)
    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = None
    # TLS (https:// endpoints): the CA that signed etcd's server certificate (default: the
    # system's CAs), and a client certificate and key for etcd's --client-cert-auth
    ca_cert: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    # a username and password over http:// travel in clear: refused unless this says so
    allow_plaintext_credentials: bool = False

    @model_validator(mode="after")
    def _check_security(self) -> EtcdSettings:
        schemes = {e.split("://", 1)[0].lower() if "://" in e else "" for e in self.endpoints}
        if not schemes <= {"http", "https"}:
            raise ValueError("every endpoint must start with http:// or https://")
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("client_cert and client_key go together: set both or neither")
        if self.password is not None and self.password_file is not None:
            raise ValueError("set password or password_file, not both")
        if self.username is not None and "http" in schemes and not self.allow_plaintext_credentials:
            raise ValueError(
                "username and password would travel in clear over an http:// endpoint: use "
                "https:// endpoints (with ca_cert), or set allow_plaintext_credentials: true "
                "to accept that"
            )
        return self

    def resolve_password(self) -> str | None:
        return resolve_secret(self.password, self.password_file, "dcs.etcd.password_file")


class ConsulSettings(Strict):
    url: str = "http://127.0.0.1:8500"
    token: SecretStr | None = None
    token_file: Path | None = None
    ca_cert: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    verify: bool = True
    register_service: bool = True
    # the Consul servers' session_ttl_min (Consul's default 10 s); a session TTL is never below it
    session_ttl_min: float = Field(default=10.0, gt=0, le=86400)


class DcsSettings(Strict):
    type: Literal["etcd", "consul"] = "etcd"
    prefix: str = "pgsidecar"
    etcd: EtcdSettings = EtcdSettings()
    consul: ConsulSettings = ConsulSettings()


class KafkaSettings(Strict):
    bootstrap_servers: list[str] = Field(default_factory=list)
    topic: str | None = None  # default pgsidecar.<cluster>.events
    partitions: int = Field(default=3, ge=1)
    retention_ms: int = Field(default=7 * 24 * 3600 * 1000, ge=60_000)
    spool_max_bytes: int = Field(default=64 * 1024 * 1024, ge=64 * 1024)
    linger_ms: int = Field(default=5, ge=0, le=1000)
    # of the topic the agent creates when it is missing: 1 suits a one-broker local cluster;
    # use 3 with a production Kafka cluster
    replication_factor: int = Field(default=1, ge=1)
    # PLAINTEXT, SSL (TLS) or SASL_SSL (TLS and a SCRAM login); SASL without TLS is not offered
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_SSL"] = "PLAINTEXT"
    # TLS: the CA of the brokers' certificates (default: the system's CAs), and a client
    # certificate and key for brokers that ask for one (ssl.client.auth)
    ssl_ca_file: Path | None = None
    ssl_cert_file: Path | None = None
    ssl_key_file: Path | None = None
    sasl_mechanism: Literal["SCRAM-SHA-512", "SCRAM-SHA-256"] = "SCRAM-SHA-512"
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    sasl_password_file: Path | None = None
    # the cluster's record key (at least 32 bytes, in a file): every record the agent publishes
    # is signed with it (HMAC-SHA256), and records read back are verified with it
    record_key_file: Path | None = None
    # keys that verify but do not sign: the previous key while a new one is rolled out
    record_verify_key_files: list[Path] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check_security(self) -> KafkaSettings:
        tls_files = (self.ssl_ca_file, self.ssl_cert_file, self.ssl_key_file)
        if self.security_protocol == "PLAINTEXT" and any(f is not None for f in tls_files):
            raise ValueError("ssl_* files are set but security_protocol is PLAINTEXT: use SSL")
        if (self.ssl_cert_file is None) != (self.ssl_key_file is None):
            raise ValueError("ssl_cert_file and ssl_key_file go together: set both or neither")
        sasl_set = (
            self.sasl_username is not None
            or self.sasl_password is not None
            or self.sasl_password_file is not None
        )
        if self.security_protocol == "SASL_SSL":
            if self.sasl_username is None or (
                self.sasl_password is None and self.sasl_password_file is None
            ):
                raise ValueError("SASL_SSL needs sasl_username and sasl_password(_file)")
        elif sasl_set:
            raise ValueError(
                "sasl_username/sasl_password are set but security_protocol is not SASL_SSL: "
                "a SCRAM login is only sent over TLS"
            )
        if self.sasl_password is not None and self.sasl_password_file is not None:
            raise ValueError("set sasl_password or sasl_password_file, not both")
        if self.record_verify_key_files and self.record_key_file is None:
            raise ValueError("record_verify_key_files needs record_key_file (the signing key)")
        return self

    def resolve_sasl_password(self) -> str | None:
        return resolve_secret(
            self.sasl_password, self.sasl_password_file, "kafka.sasl_password_file"
        )


class KubernetesSettings(Strict):
    enabled: bool = False
    namespace: str | None = None
    pod_name: str | None = None
    label_selector: str | None = None
    kill_unhealthy_pods: bool = False
    unhealthy_pod_timeout: float = Field(default=300.0, gt=0)
    pod_kill_interval: float = Field(default=600.0, gt=0)
    # explicit API access (tests, out-of-cluster); by default the in-cluster service account:
    # https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT, its token and CA bundle
    api_url: str | None = None
    token_file: Path | None = None
    ca_file: Path | None = None
    # server-side timeout of one watch request; the agent re-watches from its resourceVersion
    watch_timeout: float = Field(default=60.0, ge=1.0, le=3600.0)
