"""Config models of the discovery sources (``clusters[].discovery``), chosen by ``type``.

Each source yields a cluster's whole backend set (see :mod:`poise.discovery`); the
cluster's ``backends`` are then only a seed, used until the source first answers.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from poise.config.units import parse_duration

_Duration = Annotated[float, BeforeValidator(parse_duration), Field(gt=0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FileDiscovery(_Strict):
    """A YAML or JSON list of ``{address, weight, zone, metadata}``, re-read on change."""

    type: Literal["file"]
    path: str = Field(min_length=1)
    # How often the file is looked at when watchfiles is not installed.
    poll_interval: _Duration = 1.0


class DnsDiscovery(_Strict):
    """A, AAAA or SRV records, re-resolved per TTL (clamped to ``min_ttl..max_ttl``)."""

    type: Literal["dns"]
    name: str = Field(min_length=1)
    # The backends' port for A/AAAA records (SRV records carry their own).
    port: int | None = Field(None, ge=1, le=65535)
    record: Literal["A", "AAAA", "SRV"] = "A"
    # "host:port" of the DNS server to ask; None: the system's resolvers.
    resolver: str | None = None
    min_ttl: _Duration = 1.0
    max_ttl: _Duration = 300.0
    timeout: _Duration = 2.0

    @model_validator(mode="after")
    def _port_needed(self) -> DnsDiscovery:
        if self.record != "SRV" and self.port is None:
            raise ValueError("A/AAAA records carry no port: `port` is required "
                             "(or record: SRV)")
        if self.min_ttl > self.max_ttl:
            raise ValueError("min_ttl must not exceed max_ttl")
        if self.resolver is not None:
            from poise.discovery.dns import parse_resolver
            try:
                parse_resolver(self.resolver)
            except ValueError as e:
                raise ValueError(f"resolver: {e}") from None
        return self


class EtcdDiscovery(_Strict):
    """Each key under ``prefix`` is one instance (value: JSON ``{"address", "weight"}``)."""

    type: Literal["etcd"]
    endpoints: list[str] = Field(default_factory=lambda: ["http://127.0.0.1:2379"],
                                 min_length=1)
    prefix: str = Field(min_length=1)
    username: str | None = None
    password: str | None = None
    timeout: _Duration = 5.0


class ZookeeperDiscovery(_Strict):
    """The children of the znode ``path`` are instances (data: JSON as for etcd)."""

    type: Literal["zookeeper"]
    hosts: str = "127.0.0.1:2181"
    path: str = Field(min_length=1)
    timeout: _Duration = 10.0


class ConsulDiscovery(_Strict):
    """``/v1/health/service/NAME`` with blocking queries."""

    type: Literal["consul"]
    address: str = "http://127.0.0.1:8500"
    service: str = Field(min_length=1)
    token: str | None = None
    # Only instances whose checks pass.
    passing: bool = True
    # How long a blocking query waits for a change.
    wait: _Duration = 30.0


Discovery = Annotated[
    FileDiscovery | DnsDiscovery | EtcdDiscovery | ZookeeperDiscovery | ConsulDiscovery,
    Field(discriminator="type")]
