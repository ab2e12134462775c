"""The discovery runner (failure rules, without sockets) and the file source."""

from __future__ import annotations

import asyncio
import json
import logging
import random

import pytest

from poise.config.discovery import FileDiscovery
from poise.discovery.base import BACKOFF_MAX, Instance, Runner, parse_entry
from poise.discovery.file import FileSource

A = Instance("127.0.0.1:9001")
B = Instance("127.0.0.1:9002", weight=3)


class Scripted:
    """A source whose watches follow a script: each watch yields its sets, then fails
    with the given error (None: stays open until cancelled)."""

    def __init__(self, watches):
        self.watches = list(watches)
        self.calls = 0

    async def watch(self):
        self.calls += 1
        sets, error = self.watches.pop(0) if self.watches else ([], None)
        for s in sets:
            yield s
        if error is None:
            await asyncio.Event().wait()
        raise error


async def run_until(runner, source, watches_done, sleeps):
    runner.start(asyncio.get_running_loop())
    for _ in range(200):
        await asyncio.sleep(0)
        if source.calls >= watches_done and len(sleeps) >= watches_done - 1:
            break
    await asyncio.sleep(0.01)
    runner.stop()


async def test_a_failing_source_keeps_the_last_set_and_backs_off_capped_and_jittered(caplog):
    seen, sleeps = [], []

    async def sleep(d):
        sleeps.append(d)

    source = Scripted([([[A]], ConnectionError("refused"))] +
                      [([], ConnectionError("refused"))] * 12 + [([[A, B], [A, B]], None)])
    runner = Runner("app", "etcd", source, seen.append, rng=random.Random(1), sleep=sleep)
    with caplog.at_level(logging.INFO, logger="poise"):
        await run_until(runner, source, 14, sleeps)
    assert seen == [[A], [A, B]]            # repeated sets are not passed on
    assert runner.status.state == "up" and runner.status.updates == 2
    assert all(0.25 <= d <= BACKOFF_MAX for d in sleeps) and max(sleeps) > 10
    assert sleeps[0] < sleeps[3] < sleeps[8]
    failed = [r for r in caplog.records if "source failed" in r.getMessage()]
    assert len(failed) == 1                 # once per change of state, not per retry
    assert sum("source is up" in r.getMessage() for r in caplog.records) == 2


async def test_a_healthy_empty_set_is_honoured_and_status_says_down_with_the_error():
    seen = []

    async def sleep(d):
        pass

    source = Scripted([([[A], []], ValueError("bad file"))])
    runner = Runner("app", "file", source, seen.append, sleep=sleep)
    runner.start(asyncio.get_running_loop())
    for _ in range(20):
        await asyncio.sleep(0)
    assert seen == [[A], []]
    status = runner.status.to_json()
    assert status["type"] == "file" and status["state"] in ("down", "up")
    runner.stop()


def test_invalid_entries_are_skipped_with_a_warning_naming_them(caplog):
    with caplog.at_level(logging.WARNING, logger="poise"):
        assert parse_entry({"address": "nohost"}, "key/1") is None
        assert parse_entry({"address": "127.0.0.1:1", "weight": 0}, "key/2") is None
        assert parse_entry(["x"], "key/3") is None
    assert [r for r in caplog.records if "key/1" in r.getMessage()]
    assert parse_entry({"address": "10.0.0.1", "weight": 2}, "k", default_port=80) == \
        Instance("10.0.0.1:80", 2)


async def test_the_file_source_yields_each_change_and_fails_on_a_broken_file(tmp_path):
    path = tmp_path / "backends.json"
    path.write_text(json.dumps([{"address": "127.0.0.1:9001"}, {"address": "bad"}]))
    source = FileSource(FileDiscovery(type="file", path=str(path), poll_interval=0.02))
    watch = source.watch()
    assert await asyncio.wait_for(anext(watch), 5) == [A]
    path.write_text("- {address: '127.0.0.1:9001'}\n- {address: '127.0.0.1:9002', weight: 3}\n")
    assert await asyncio.wait_for(anext(watch), 5) == [A, B]
    path.write_text("[]")
    assert await asyncio.wait_for(anext(watch), 5) == []
    path.write_text("- {address: '127.0.0.1:9001'\n")        # half-written
    with pytest.raises(ValueError, match="not valid YAML"):
        await asyncio.wait_for(anext(watch), 5)
    path.unlink()
    with pytest.raises(OSError, match="cannot read"):
        await anext(source.watch())
