"""The ``poise`` command line: run, check, demo, reload. No logic lives here."""

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
    sys.exit(run_supervisor(cfg, config))


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False))
def check(config: str) -> None:
    """Validate CONFIG; exit 0 when valid, 2 (listing every error) when not."""
    from poise.config import load_config
    from poise.control.limits import check_warning

    try:
        cfg = load_config(config)
    except ConfigError as e:
        _print_errors(config, e)
        sys.exit(2)
    click.echo(f"{config}: ok ({len(cfg.listeners)} listener(s), {len(cfg.clusters)} cluster(s), "
               f"{sum(len(c.backends) for c in cfg.clusters)} backend(s))")
    if (warning := check_warning(cfg)) is not None:
        click.echo(f"{config}: warning: open files: {warning}", err=True)


@cli.command()
@click.option("--bind", default="127.0.0.1:8080", show_default=True,
              help="Where the demo balancer listens.")
@click.option("--admin", default="127.0.0.1:9901", show_default=True,
              help="Where its admin API listens.")
def demo(bind: str, admin: str) -> None:
    """Start three demo backends and a balancer (with its admin API) in front of them."""
    from poise.config.units import parse_address
    from poise.demo.run import run_demo

    for value in (bind, admin):
        try:
            parse_address(value)
        except ValueError as e:
            raise click.BadParameter(f"{value}: {e}") from None
    logging.basicConfig(level=logging.INFO, format="poise %(levelname)s %(message)s")
    _log_start()
    sys.exit(run_demo(bind, admin))


@cli.command("reload")
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.option("--admin", metavar="HOST:PORT",
              help="The admin API [default: admin.bind of CONFIG, else 127.0.0.1:9901].")
@click.option("--token", help="Its bearer token [default: $POISE_ADMIN_TOKEN, else "
                              "admin.token of CONFIG].")
def reload_config(config: str | None, admin: str | None, token: str | None) -> None:
    """Make a running poise re-read its config file (POST /reload to its admin API).

    Exit 0 when applied, 2 when rejected (listing every error), 1 when the admin API
    cannot be asked."""
    from poise.admin.client import reload

    sys.exit(reload(config, admin, token))


def _register_commands() -> None:
    from poise.discovery.register_cli import register_group

    cli.add_command(register_group)


_register_commands()


def _log_start() -> None:
    from poise import hot_path

    logging.getLogger("poise").info("poise %s (hot path: %s)", __version__, hot_path())


def _print_errors(path: str, error: ConfigError) -> None:
    click.echo(f"{path}: invalid configuration", err=True)
    for field, message in error.errors:
        click.echo(f"  {field}: {message}" if field else f"  {message}", err=True)


def main() -> None:
    cli()
