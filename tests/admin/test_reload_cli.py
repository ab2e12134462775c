"""``poise reload`` against a real admin server (a fake control plane behind it)."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap

import pytest
from click.testing import CliRunner

from poise.admin.api import AdminApi
from poise.admin.client import AdminTarget, admin_section, resolve
from poise.admin.ops import ReloadResult
from poise.cli import cli
from tests.admin.conftest import serve


@pytest.fixture(autouse=True)
def _no_token_in_env(monkeypatch):
    monkeypatch.delenv("POISE_ADMIN_TOKEN", raising=False)


@pytest.fixture
def secured(ops):
    yield from serve(AdminApi(ops, "s3cret"))


def where(server) -> str:
    host, port = server.addr
    return f"{host}:{port}"


def reload(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(cli, ["reload", *args], env=env)


def test_applied(server, ops):
    ops.reload_result = ReloadResult(True, 7)
    result = reload("--admin", where(server))
    assert result.exit_code == 0, result.output
    assert result.stdout == "reloaded: config version 7\n"
    assert result.stderr == ""
    assert ops.calls == [("reload",)]


def test_rejected_lists_every_error(server, ops):
    ops.reload_result = ReloadResult(False, 3, [
        ("clusters[0].backends[1].address", "expected host:port"),
        ("workers", "Input should be greater than or equal to 1"),
        ("", "not valid YAML: mapping values are not allowed here")])
    result = reload("--admin", where(server))
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr == textwrap.dedent("""\
        reload rejected: invalid configuration (version 3 keeps running)
          clusters[0].backends[1].address: expected host:port
          workers: Input should be greater than or equal to 1
          not valid YAML: mapping values are not allowed here
        """)


def test_unreachable(unused_port):
    result = reload("--admin", f"127.0.0.1:{unused_port}")
    assert result.exit_code == 1
    assert result.stderr == (f"poise reload: cannot reach the admin API at "
                             f"127.0.0.1:{unused_port}: Connection refused\n")


def test_no_answer_in_time(capsys):
    from poise.admin.client import reload as run_reload
    with socket.socket() as listener:    # accepts (in its backlog), never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        assert run_reload(None, f"127.0.0.1:{port}", None, env={}, timeout=0.2) == 1
    assert capsys.readouterr().err == (f"poise reload: no answer from the admin API at "
                                       f"127.0.0.1:{port} within 0.2s\n")


def test_missing_token(secured, ops):
    result = reload("--admin", where(secured))
    assert result.exit_code == 1
    assert result.stderr == (f"poise reload: the admin API at {where(secured)} needs a token "
                             f"(--token or $POISE_ADMIN_TOKEN)\n")
    assert ops.calls == []


def test_wrong_token(secured, ops):
    result = reload("--admin", where(secured), "--token", "guess")
    assert result.exit_code == 1
    assert result.stderr == f"poise reload: the admin API at {where(secured)} refused the token\n"
    assert ops.calls == []


def test_token_from_option_env_and_config(secured, ops, tmp_path):
    assert reload("--admin", where(secured), "--token", "s3cret").exit_code == 0
    env = {"POISE_ADMIN_TOKEN": "s3cret"}
    assert reload("--admin", where(secured), env=env).exit_code == 0
    config = tmp_path / "poise.yaml"
    config.write_text(f"admin:\n  bind: {where(secured)}\n  token: s3cret\n")
    assert reload(str(config)).exit_code == 0
    # --token wins over the environment, which wins over the file
    assert reload(str(config), "--token", "bad", env=env).exit_code == 1
    assert reload(str(config), env={"POISE_ADMIN_TOKEN": "bad"}).exit_code == 1
    assert ops.calls == [("reload",)] * 3


def test_other_status(server, ops):
    ops.raises["reload"] = RuntimeError("a bug")
    result = reload("--admin", where(server))
    assert result.exit_code == 1
    assert result.stderr == (f"poise reload: the admin API at {where(server)} answered 500: "
                             f"internal error\n")


def test_bad_admin_option():
    result = reload("--admin", "nowhere")
    assert result.exit_code == 1
    assert result.stderr == "poise reload: --admin nowhere: expected host:port\n"


def test_as_a_subprocess(server, ops, tmp_path):
    """The installed entry point, with an invalid config that still names the admin
    API: the server reports the problems, the CLI relays them."""
    ops.reload_result = ReloadResult(False, 1, [("listeners", "required")])
    config = tmp_path / "poise.yaml"
    config.write_text(f"workers: zero\nadmin: {{bind: '{where(server)}'}}\n")
    done = subprocess.run([sys.executable, "-m", "poise", "reload", str(config)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines()[1:] == ["  listeners: required"]


# -- where to call, read leniently --------------------------------------------------------

@pytest.mark.parametrize(("text", "name", "section"), [
    ("admin: {bind: '10.0.0.1:9000', token: t}\nworkers: nope\n", "p.yaml",
     {"bind": "10.0.0.1:9000", "token": "t"}),
    ('[admin]\nbind = "[::1]:9000"\n', "p.toml", {"bind": "[::1]:9000"}),
    ("admin: [1, 2]\n", "p.yaml", {}),
    ("- a\n- b\n", "p.yaml", {}),
    ("admin: {bind: x\n", "p.yaml", {}),         # not YAML at all
    ("\xff", "p.yaml", {}),
    ("admin = ", "p.toml", {}),
])
def test_admin_section(tmp_path, text, name, section):
    path = tmp_path / name
    path.write_text(text, encoding="latin-1")
    assert admin_section(str(path)) == section


def test_admin_section_of_a_missing_file(tmp_path):
    assert admin_section(str(tmp_path / "none.yaml")) == {}


@pytest.mark.parametrize(("text", "admin", "target"), [
    ("", None, AdminTarget("127.0.0.1", 9901, None)),
    ("admin: {bind: '10.1.2.3:7000', token: tt}", None, AdminTarget("10.1.2.3", 7000, "tt")),
    ("admin: {bind: '0.0.0.0:7000'}", None, AdminTarget("127.0.0.1", 7000, None)),
    ("admin: {bind: '[::]:7000'}", None, AdminTarget("::1", 7000, None)),
    ("admin: {bind: '[::1]:7000'}", None, AdminTarget("::1", 7000, None)),
    ("admin: {bind: 'garbage', token: 5}", None, AdminTarget("127.0.0.1", 9901, None)),
    ("admin: {bind: '10.1.2.3:7000'}", "localhost:1", AdminTarget("localhost", 1, None)),
])
def test_resolve(tmp_path, text, admin, target):
    path = tmp_path / "poise.yaml"
    path.write_text(text)
    assert resolve(str(path), admin, None, {}) == target


def test_resolve_without_config():
    assert resolve(None, None, None, {"POISE_ADMIN_TOKEN": "e"}) == \
        AdminTarget("127.0.0.1", 9901, "e")
    assert str(AdminTarget("::1", 9, None)) == "[::1]:9"


@pytest.fixture
def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
