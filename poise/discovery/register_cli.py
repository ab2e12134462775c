"""``poise register KIND ...``: register an address in a registry, keep it alive with
heartbeats, and remove it on SIGTERM/SIGINT before exiting (so that balancers stop
routing there first).  Killed hard, the entry goes when its lease, session or TTL check
expires."""

from __future__ import annotations

import logging
import signal
import sys
from typing import Any

import click

from poise.config.units import parse_address, parse_duration

log = logging.getLogger("poise")


def _address(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        parse_address(value)
    except ValueError as e:
        raise click.BadParameter(f"{value}: {e}") from None
    return value


def _ttl(ctx: click.Context, param: click.Parameter, value: str) -> float:
    try:
        ttl = parse_duration(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    if ttl <= 0:
        raise click.BadParameter("must be positive")
    return ttl


_COMMON = [
    click.option("--address", required=True, callback=_address,
                 help="This instance's HOST:PORT, as balancers should reach it."),
    click.option("--weight", type=click.IntRange(1, 10_000), default=1, show_default=True),
    click.option("--ttl", default="10s", show_default=True, callback=_ttl,
                 help="Lease / session / check TTL: how long the entry outlives a crash."),
]


def _common(f: Any) -> Any:
    for option in reversed(_COMMON):
        f = option(f)
    return f


@click.group("register")
def register_group() -> None:
    """Register this service in etcd, ZooKeeper or Consul until SIGTERM/SIGINT."""


@register_group.command("etcd")
@_common
@click.option("--endpoints", default="http://127.0.0.1:2379", show_default=True,
              help="Comma-separated etcd endpoints.")
@click.option("--prefix", required=True, help="The key prefix balancers watch.")
@click.option("--username")
@click.option("--password")
def etcd(endpoints: str, **options: Any) -> None:
    """A key PREFIX+ADDRESS bound to a lease kept alive."""
    _serve("etcd", endpoints=[e.strip() for e in endpoints.split(",") if e.strip()],
           **options)


@register_group.command("zookeeper")
@_common
@click.option("--hosts", default="127.0.0.1:2181", show_default=True)
@click.option("--path", required=True, help="The znode whose children balancers watch.")
def zookeeper(**options: Any) -> None:
    """An ephemeral node under PATH, alive as long as the session."""
    _serve("zookeeper", **options)


@register_group.command("consul")
@_common
@click.option("--consul", default="http://127.0.0.1:8500", show_default=True,
              help="The Consul agent.")
@click.option("--service", required=True)
@click.option("--token", help="Consul ACL token.")
def consul(**options: Any) -> None:
    """A service instance with a TTL check passed regularly."""
    _serve("consul", **options)


def _serve(kind: str, **options: Any) -> None:
    from poise.discovery import register

    logging.basicConfig(level=logging.INFO, format="poise %(levelname)s %(message)s")
    options = {k: v for k, v in options.items() if v is not None}
    stop = [signal.SIGTERM, signal.SIGINT]
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)      # (sigwait below takes them)
    try:
        registration = register(kind, **options)
    except Exception as e:      # the registry's own errors, as one line
        click.echo(f"poise register {kind}: {e}", err=True)
        sys.exit(1)
    log.info("registered %s in %s; SIGTERM or SIGINT removes it", options["address"], kind)
    received = signal.sigwait(stop)
    log.info("%s: deregistering %s", signal.Signals(received).name, options["address"])
    registration.stop()
