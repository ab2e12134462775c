"""Service discovery: sources that yield a cluster's backends (run once, in the control
plane) and registration of a service's own address (``poise register``).

:func:`make_source` builds the source a cluster's ``discovery`` names; the
:class:`~poise.discovery.base.Runner` keeps it going through failures.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from poise.discovery.base import Instance, Runner, Source, SourceStatus

__all__ = ["Instance", "Runner", "Source", "SourceStatus", "make_source", "register"]

# type → (module, class) of its source and of its registrar (None: cannot register).
SOURCES = {
    "file": ("poise.discovery.file", "FileSource"),
    "dns": ("poise.discovery.dns", "DnsSource"),
    "etcd": ("poise.discovery.etcd", "EtcdSource"),
    "zookeeper": ("poise.discovery.zookeeper", "ZookeeperSource"),
    "consul": ("poise.discovery.consul", "ConsulSource"),
}
REGISTRARS = {
    "etcd": ("poise.discovery.register_etcd", "EtcdRegistrar"),
    "zookeeper": ("poise.discovery.register_zookeeper", "ZookeeperRegistrar"),
    "consul": ("poise.discovery.register_consul", "ConsulRegistrar"),
}


def make_source(spec: Any) -> Source:
    """The source for a cluster's ``discovery`` config."""
    module, name = SOURCES[spec.type]
    return getattr(import_module(module), name)(spec)


class register:  # noqa: N801 (used as a function: ``with register("etcd", ...):``)
    """Register this service's address in a registry and keep it alive with heartbeats,
    until :meth:`stop` or the end of the ``with`` block (which removes the entry before
    returning).  ``kind``: etcd, zookeeper or consul; ``options``: the registrar's
    (``address``, ``weight``, ``ttl``, and where the registry is)."""

    def __init__(self, kind: str, **options: Any) -> None:
        if kind not in REGISTRARS:
            raise ValueError(f"cannot register in {kind!r} (known: {', '.join(REGISTRARS)})")
        module, name = REGISTRARS[kind]
        self.registrar = getattr(import_module(module), name)(**options)
        self.registrar.start()

    def stop(self) -> None:
        self.registrar.stop()

    def __enter__(self) -> register:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
