"""Shared fixtures: real backend processes (h11) and real poise processes.

``stack`` (per test) and ``module_stack`` (per module) start processes on demand::

    b = stack.backend()                       # h11 backend process
    px = stack.poise([b], listener={"client_header_timeout": "1s"})
    with H11Client(px.addr) as c: ...

At teardown poise is stopped with SIGTERM and must exit 0 without a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hypothesis import settings

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support.procs import Stack  # noqa: E402

# No per-example deadline (Hypothesis' default is 200 ms): one example that a loaded CI
# box happens to run slowly would fail its test (DeadlineExceeded, or Flaky when the
# replay is fast), and no test here is about speed.
settings.register_profile("poise", deadline=None)
settings.load_profile("poise")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "slow: long-running (e.g. 1 GiB transfers); still part of `make test`")


def _finish(stack: Stack) -> None:
    problems = stack.close()
    if problems:
        pytest.fail("\n\n".join(problems), pytrace=False)


@pytest.fixture
def stack(tmp_path: Path):
    s = Stack(tmp_path)
    yield s
    _finish(s)


@pytest.fixture(scope="module")
def module_stack(tmp_path_factory: pytest.TempPathFactory):
    s = Stack(tmp_path_factory.mktemp("stack"))
    yield s
    _finish(s)
