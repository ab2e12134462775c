"""Open-file limits at start (poise.control.limits) and how ``workers: auto`` sizes
itself by them (poise.config.workers): fake limits and CPU counts, no sockets."""

import logging
import os
import resource
import subprocess
import sys
import textwrap

import pytest
from click.testing import CliRunner

from poise.cli import cli
from poise.config import model
from poise.config.load import parse_config
from poise.config.workers import auto_workers, connection_cap, files_per_worker
from poise.control import limits

HARD = 20_000


def config_yaml(workers: object, *caps: int | None) -> str:
    listeners = "".join(
        f"  - name: l{i}\n    bind: 127.0.0.1:{18000 + i}\n    cluster: app\n"
        + (f"    max_connections: {cap}\n" if cap is not None else "")
        for i, cap in enumerate(caps or (None,)))
    return (f"workers: {workers}\nlisteners:\n{listeners}"
            "clusters:\n  - name: app\n    backends: [{address: 127.0.0.1:9001}]\n")


@pytest.fixture
def two_cpus_20k(monkeypatch):
    """The sandbox's box: 2 CPUs, 20,000 files per process."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(model, "nofile_hard", lambda: HARD)


class FakeLimits:
    def __init__(self, soft, hard, refuse=False):
        self.soft, self.hard, self.refuse, self.calls = soft, hard, refuse, []

    def get(self, which):
        assert which == resource.RLIMIT_NOFILE
        return self.soft, self.hard

    def set(self, which, value):
        self.calls.append(value)
        if self.refuse:
            raise ValueError("not allowed")
        self.soft = value[0]


# ---------------------------------------------------------------- raising the limit


def test_soft_limit_is_raised_to_the_hard_one():
    fake = FakeLimits(1024, HARD)
    raised = limits.raise_nofile(fake.get, fake.set)
    assert fake.calls == [(HARD, HARD)]
    assert (raised.before, raised.after, raised.hard, raised.error) == (1024, HARD, HARD, None)
    assert raised.describe() == ("open files limit raised from 1,024 to 20,000 per process "
                                 "(the hard limit)")


def test_a_soft_limit_already_at_the_hard_one_is_left_alone():
    fake = FakeLimits(HARD, HARD)
    raised = limits.raise_nofile(fake.get, fake.set)
    assert fake.calls == []
    assert raised.describe() == "open files limit: 20,000 per process (already the hard limit)"


def test_an_unlimited_hard_limit_raises_to_nr_open():
    fake = FakeLimits(1024, resource.RLIM_INFINITY)
    raised = limits.raise_nofile(fake.get, fake.set, nr_open=lambda: 1_048_576)
    assert fake.calls == [(1_048_576, resource.RLIM_INFINITY)]
    assert (raised.after, raised.hard) == (1_048_576, None)


def test_a_refused_raise_keeps_the_old_limit_and_says_why():
    fake = FakeLimits(1024, HARD, refuse=True)
    raised = limits.raise_nofile(fake.get, fake.set)
    assert (raised.before, raised.after, raised.error) == (1024, 1024, "not allowed")
    assert "raising it failed: not allowed" in raised.describe()


def test_the_raised_limit_is_real_and_inherited_by_child_processes():
    """As a worker started by the supervisor inherits it (no faking: a real process
    started with a lower soft limit raises it, and its own child sees the result)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard < 256:
        pytest.skip("needs a finite hard limit")
    code = textwrap.dedent("""\
        import resource, subprocess, sys
        from poise.control.limits import raise_nofile
        print(raise_nofile().describe())
        print(subprocess.run([sys.executable, "-c", "import resource; "
                              "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])"],
                             capture_output=True, text=True, check=True).stdout.strip())
        """)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (128, hard))).stdout
    line, child = out.splitlines()
    assert line == f"open files limit raised from 128 to {hard:,} per process (the hard limit)"
    assert int(child) == hard


# ---------------------------------------------------------------- workers: auto


@pytest.mark.parametrize(("cpus", "cap", "nofile", "expected"), [
    (2, None, HARD, 2),             # no max_connections: one worker per CPU
    (2, 50_000, HARD, 6),           # 100,000 files / 18,000 per worker
    (2, 9_000, HARD, 2),            # 18,000 files fit in two workers
    (2, 18_001, HARD, 3),
    (8, 50_000, HARD, 8),           # never fewer than the CPUs
    (2, 50_000, None, 2),           # no file limit
    (2, 50_000, 1_048_576, 2),
    (1, 10_000_000, 1024, 256),     # capped at the schema's maximum
    (0, None, None, 1),
])
def test_auto_workers(cpus, cap, nofile, expected):
    assert auto_workers(cpus, cap, nofile) == expected


def test_auto_workers_plan_fits_each_worker():
    for cap in (1, 999, 9_000, 9_001, 50_000, 123_457):
        workers = auto_workers(2, cap, HARD)
        assert files_per_worker(cap, workers) <= 0.9 * HARD


def test_config_auto_counts_every_listener_cap(two_cpus_20k):
    assert parse_config(config_yaml("auto", 50_000)).workers == 6
    assert parse_config(config_yaml("auto", 30_000, 20_000)).workers == 6
    assert parse_config(config_yaml("auto", 30_000, None)).workers == 4
    assert parse_config(config_yaml("auto")).workers == 2
    assert parse_config(config_yaml("auto", 100)).workers == 2


def test_config_auto_with_a_high_file_limit_is_one_per_cpu(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(model, "nofile_hard", lambda: None)
    assert parse_config(config_yaml("auto", 50_000)).workers == 4


def test_config_explicit_workers_are_kept(two_cpus_20k):
    assert parse_config(config_yaml(2, 50_000)).workers == 2
    assert parse_config(config_yaml(1, 50_000)).workers == 1


def test_config_auto_in_toml(two_cpus_20k):
    text = textwrap.dedent("""\
        workers = "auto"
        [[listeners]]
        name = "web"
        bind = "127.0.0.1:18000"
        cluster = "app"
        max_connections = 50000
        [[clusters]]
        name = "app"
        backends = [{ address = "127.0.0.1:9001" }]
        """)
    assert parse_config(text, "toml").workers == 6


def test_connection_cap():
    cfg = parse_config(config_yaml(1, 10, None, 5))
    assert connection_cap(cfg.listeners) == 15
    assert connection_cap(parse_config(config_yaml(1)).listeners) is None


# ---------------------------------------------------------------- the warning


def test_no_warning_when_the_plan_fits():
    assert limits.budget_problem(50_000, 6, HARD, cpus=2) is None
    assert limits.budget_problem(None, 1, 1024, cpus=2) is None


def test_warning_names_the_numbers():
    text = limits.budget_problem(50_000, 2, HARD, cpus=2)
    assert text == (
        "listeners allow 50,000 client connections (max_connections), which with as many "
        "backend connections need about 50,000 files per worker with workers: 2, more than "
        "90% of the open files limit of 20,000 (18,000); raise the limit (ulimit -n, "
        "systemd LimitNOFILE=) or run 6 workers (workers: auto does)")
    assert "in its one process with workers: 1" in limits.budget_problem(20_000, 1, HARD, 2)


def test_apply_logs_the_limit_and_the_warning(monkeypatch, caplog, two_cpus_20k):
    monkeypatch.setattr(limits, "raise_nofile", lambda: limits.Raised(1024, HARD, HARD))
    cfg = parse_config(config_yaml(2, 50_000))
    with caplog.at_level(logging.INFO, logger="poise"):
        raised = limits.apply(cfg, cpus=2)
    assert raised.after == HARD
    records = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert records[0] == ("INFO", "open files limit raised from 1,024 to 20,000 per process "
                                  "(the hard limit)")
    assert records[1][0] == "WARNING"
    assert records[1][1].startswith("open files: listeners allow 50,000 client connections")
    assert len(records) == 2


def test_apply_is_quiet_about_a_plan_that_fits(monkeypatch, caplog, two_cpus_20k):
    monkeypatch.setattr(limits, "raise_nofile", lambda: limits.Raised(HARD, HARD, HARD))
    with caplog.at_level(logging.INFO, logger="poise"):
        limits.apply(parse_config(config_yaml("auto", 50_000)), cpus=2)
    assert [r.levelname for r in caplog.records] == ["INFO"]


def test_poise_check_warns_on_stderr_and_still_exits_0(tmp_path, monkeypatch, two_cpus_20k):
    monkeypatch.setattr(limits, "nofile_hard", lambda: HARD)
    path = tmp_path / "poise.yaml"
    path.write_text(config_yaml(2, 50_000))
    result = CliRunner().invoke(cli, ["check", str(path)])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"{path}: ok (1 listener(s), 1 cluster(s), 1 backend(s))"
    assert result.stderr.startswith(f"{path}: warning: open files: listeners allow 50,000")
    path.write_text(config_yaml("auto", 50_000))
    result = CliRunner().invoke(cli, ["check", str(path)])
    assert (result.exit_code, result.stderr) == (0, "")
