"""The command line, run as a user would: ``python -m poise`` and the ``poise`` script."""

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import poise

VALID_YAML = textwrap.dedent("""\
    workers: 1
    listeners:
      - name: web
        bind: 127.0.0.1:8080
        protocol: http
        routes:
          - cluster: app          # a route without `match` catches everything
    clusters:
      - name: app
        policy: round_robin
        backends:
          - address: 127.0.0.1:9001
          - address: 127.0.0.1:9002
            weight: 2
    """)

VALID_TOML = textwrap.dedent("""\
    workers = 1

    [[listeners]]
    name = "web"
    bind = "127.0.0.1:8080"
    routes = [{ cluster = "app" }]

    [[clusters]]
    name = "app"
    policy = { type = "round_robin" }
    backends = [{ address = "127.0.0.1:9001" }, { address = "127.0.0.1:9002", weight = 2 }]
    """)

# Four independent schema errors.
INVALID_YAML = textwrap.dedent("""\
    workers: 0
    listeners:
      - name: web
        bind: 127.0.0.1:8080
        client_header_timeout: soon
        routes:
          - cluster: app
    clusters:
      - name: app
        backends:
          - address: 127.0.0.1:9001
          - address: localhost
          - address: 127.0.0.1:9003
            colour: blue
    """)


def poise_cmd(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "poise", *args], capture_output=True,
                          text=True, timeout=60, cwd=cwd)


def script() -> str | None:
    """The installed ``poise`` console script next to this interpreter."""
    candidate = Path(sys.executable).parent / "poise"
    return str(candidate) if candidate.exists() else shutil.which("poise")


@pytest.fixture
def write(tmp_path):
    def _write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path
    return _write


# -- check ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "text"), [
    ("poise.yaml", VALID_YAML), ("poise.yml", VALID_YAML), ("poise.toml", VALID_TOML)])
def test_check_valid(write, name, text):
    path = write(name, text)
    result = poise_cmd("check", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{path}: ok (1 listener(s), 1 cluster(s), 2 backend(s))"
    assert result.stderr == ""


def test_check_invalid_lists_every_error_with_its_path(write):
    path = write("bad.yaml", INVALID_YAML)
    result = poise_cmd("check", str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[0] == f"{path}: invalid configuration"
    body = lines[1:]
    assert "  clusters[0].backends[1].address: expected host:port" in body
    assert "  clusters[0].backends[2].colour: unknown key" in body
    assert ("  listeners[0].client_header_timeout: expected a duration such as 250ms, 2s or 1m"
            in body)
    assert any(line.startswith("  workers: ") for line in body)
    assert len(body) == 4
    assert "Traceback" not in result.stderr


def test_check_reports_semantic_errors(write):
    text = VALID_YAML.replace("- cluster: app", "- cluster: api").replace(
        "policy: round_robin", "policy: fastest")
    result = poise_cmd("check", str(write("bad.yaml", text)))
    assert result.returncode == 2
    body = result.stderr.splitlines()[1:]
    assert "  listeners[0].routes[0].cluster: unknown cluster 'api'" in body
    assert any(line.startswith("  clusters[0].policy: unknown policy 'fastest'") for line in body)
    assert len(body) == 2


def test_check_invalid_toml(write):
    text = VALID_TOML.replace('bind = "127.0.0.1:8080"', 'bind = "8080"\nbacklog = 10')
    result = poise_cmd("check", str(write("bad.toml", text)))
    assert result.returncode == 2
    body = result.stderr.splitlines()[1:]
    assert sorted(body) == ["  listeners[0].backlog: unknown key",
                            "  listeners[0].bind: expected host:port"]


def test_check_syntax_error(write):
    result = poise_cmd("check", str(write("broken.yaml", "listeners: [\n")))
    assert result.returncode == 2
    assert "not valid YAML" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_missing_file(tmp_path):
    result = poise_cmd("check", str(tmp_path / "missing.yaml"))
    assert result.returncode == 2
    assert "cannot read" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_unknown_format(write):
    result = poise_cmd("check", str(write("poise.ini", "[x]\n")))
    assert result.returncode == 2
    assert "unknown config format" in result.stderr


def test_check_needs_a_file():
    result = poise_cmd("check")
    assert result.returncode == 2          # click's usage error
    assert "Usage:" in result.stderr


def test_run_refuses_an_invalid_config(write):
    # Validation happens before anything is bound: exit 2 at once, same listing.
    path = write("bad.yaml", INVALID_YAML)
    result = poise_cmd("run", str(path))
    assert result.returncode == 2
    assert f"{path}: invalid configuration" in result.stderr
    assert "  clusters[0].backends[1].address: expected host:port" in result.stderr


# -- version and help ----------------------------------------------------------------------------


def test_version_via_module():
    result = poise_cmd("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"poise, version {poise.__version__}"


def test_version_via_script():
    exe = script()
    if exe is None:
        pytest.skip("the poise console script is not installed")
    result = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert result.stdout.strip() == f"poise, version {poise.__version__}"


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help(flag):
    result = poise_cmd(flag)
    assert result.returncode == 0
    assert "Usage:" in result.stdout
    for command in ("run", "check", "demo"):
        assert f"  {command} " in result.stdout


def test_script_and_module_agree():
    exe = script()
    if exe is None:
        pytest.skip("the poise console script is not installed")
    by_script = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    by_module = poise_cmd("--help")
    # Only the program name in the usage line may differ.
    assert by_script.stdout.splitlines()[1:] == by_module.stdout.splitlines()[1:]


def test_unknown_command():
    result = poise_cmd("frobnicate")
    assert result.returncode == 2
    assert "No such command" in result.stderr
