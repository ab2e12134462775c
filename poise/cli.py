"""The ``poise`` command line: run, check, demo. No logic lives here."""

from __future__ import annotations

import logging
import sys

import click

from poise import __version__
from poise.errors import ConfigError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="poise")
def cli() -> None:
    """poise — a fast, correct load balancer."""


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False))
def run(config: str) -> None:
    """Run the balancer described by CONFIG in the foreground (SIGTERM stops it gracefully)."""
    from poise.config import load_config
    from poise.control.supervisor import run as run_supervisor

    logging.basicConfig(level=logging.INFO, format="poise %(levelname)s %(message)s")
    try:
        cfg = load_config(config)
    except ConfigError as e:
        _print_errors(config, e)
        sys.exit(2)
    _log_start()
    sys.exit(run_supervisor(cfg))


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False))
def check(config: str) -> None:
    """Validate CONFIG; exit 0 when valid, 2 (listing every error) when not."""
    from poise.config import load_config

    try:
        cfg = load_config(config)
    except ConfigError as e:
        _print_errors(config, e)
        sys.exit(2)
    click.echo(f"{config}: ok ({len(cfg.listeners)} listener(s), {len(cfg.clusters)} cluster(s), "
               f"{sum(len(c.backends) for c in cfg.clusters)} backend(s))")


@cli.command()
@click.option("--bind", default="127.0.0.1:8080", show_default=True,
              help="Where the demo balancer listens.")
def demo(bind: str) -> None:
    """Start three demo backends and a balancer in front of them."""
    from poise.config.units import parse_address
    from poise.demo.run import run_demo

    logging.basicConfig(level=logging.INFO, format="poise %(levelname)s %(message)s")
    host, port = parse_address(bind)
    _log_start()
    sys.exit(run_demo(host, port))


def _log_start() -> None:
    from poise import hot_path

    logging.getLogger("poise").info("poise %s (hot path: %s)", __version__, hot_path())


def _print_errors(path: str, error: ConfigError) -> None:
    click.echo(f"{path}: invalid configuration", err=True)
    for field, message in error.errors:
        click.echo(f"  {field}: {message}" if field else f"  {message}", err=True)


def main() -> None:
    cli()
