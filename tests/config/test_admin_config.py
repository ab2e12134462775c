"""The ``admin`` section as ``poise check`` judges it: an admin API reachable beyond
loopback needs a token (field path ``admin.token``), and it may not share a listener's
address."""

import textwrap

import pytest
from click.testing import CliRunner

from poise.cli import cli

CONFIG = textwrap.dedent("""\
    workers: 2
    listeners:
      - name: web
        bind: 127.0.0.1:8080
        routes: [{cluster: app}]
    clusters:
      - name: app
        backends: [{address: 127.0.0.1:9001}]
    """)


def check(tmp_path, admin: str):
    path = tmp_path / "poise.yaml"
    path.write_text(CONFIG + admin)
    return CliRunner().invoke(cli, ["check", str(path)])


@pytest.mark.parametrize("bind", ["0.0.0.0:9901", "10.1.2.3:9901", "[::]:9901"])
def test_an_admin_api_beyond_loopback_needs_a_token(tmp_path, bind):
    result = check(tmp_path, f"admin: {{bind: '{bind}'}}\n")
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines()[1:] == [
        f"  admin.token: required when the admin API listens beyond loopback ({bind})"]


@pytest.mark.parametrize("admin", [
    "admin: {bind: '0.0.0.0:9901', token: s3cret}\n",
    "admin: {bind: '127.0.0.1:9901'}\n",
    "admin: {bind: 'localhost:9901'}\n",
    "admin: {bind: '[::1]:9901'}\n",
    "admin: {}\n",                       # 127.0.0.1:9901 by default
])
def test_a_token_or_loopback_is_enough(tmp_path, admin):
    result = check(tmp_path, admin)
    assert result.exit_code == 0, result.output


def test_the_admin_api_may_not_share_a_listeners_address(tmp_path):
    result = check(tmp_path, "admin: {bind: '127.0.0.1:8080'}\n")
    assert result.exit_code == 2
    assert "  admin.bind: 127.0.0.1:8080 is also bound by listeners[0]" in result.stderr


def test_a_token_must_be_printable_without_spaces(tmp_path):
    result = check(tmp_path, "admin: {token: 'two words'}\n")
    assert result.exit_code == 2
    assert "  admin.token: " in result.stderr
