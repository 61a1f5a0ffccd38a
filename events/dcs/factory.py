"""Build the configured DCS backend. Backends are imported lazily so that an agent on etcd does
not import the Consul client and vice versa."""

from __future__ import annotations

from events.dcs.base import DCS
from events.settings import DcsSettings


def create_dcs(settings: DcsSettings, cluster: str) -> DCS:
    if settings.type == "etcd":
        from events.dcs.etcd import EtcdDCS

        return EtcdDCS(settings.etcd, cluster=cluster, prefix=settings.prefix)
    if settings.type == "consul":
        from events.dcs.consul import ConsulDCS

        return ConsulDCS(settings.consul, cluster=cluster, prefix=settings.prefix)
    raise ValueError(f"unknown dcs.type {settings.type!r}: use 'etcd' or 'consul'")
