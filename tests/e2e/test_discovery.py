"""Discovery end to end: a real poise (two workers) whose cluster follows a file
source, under steady load.  A backend added to the file gets traffic within a second;
one removed takes no new requests while none fails; a broken file keeps the last set
and shows the source as down in the admin API and the metrics."""

from __future__ import annotations

import json
import time

from tests.support.control import TOKEN
from tests.support.loadgen import LoadGen
from tests.support.waiting import wait_for


def write(path, *backends) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps([{"address": b.address} for b in backends]))
    tmp.replace(path)


def source_state(px) -> dict:
    return px.admin.get("/clusters/app").json()["discovery"]


def test_a_file_source_drives_membership_under_load(stack, tmp_path):
    b1, b2, b3 = stack.backend("b1"), stack.backend("b2"), stack.backend("b3")
    path = tmp_path / "backends.json"
    write(path, b1)
    px = stack.poise([b3], workers=2, admin={"token": TOKEN},
                     cluster={"discovery": {"type": "file", "path": str(path),
                                            "poll_interval": "100ms"}})
    wait_for(lambda: source_state(px)["state"] == "up", 5, "the file source up")
    with LoadGen(px.addr, connections=16) as load:
        load.wait_more(200)
        since = time.monotonic()
        wait_for(lambda: set(load.backends(since)) == {"b1"}, 5,
                 lambda: f"only b1 (the file's) serving: {load.backends(since)}")

        write(path, b1, b2)
        added = time.monotonic()
        wait_for(lambda: load.backends(added)["b2"] > 0, 5, "b2 gets traffic")
        first = min(sent for sent, _, b in list(load.records) if b == "b2" and sent >= added)
        assert first - added < 1.0, f"b2's first request came {first - added:.2f}s later"

        write(path, b2)
        removed = time.monotonic()
        wait_for(lambda: load.backends(removed + 1.0)["b2"] > 50, 10, "b2 alone")
        assert load.backends(removed + 1.0)["b1"] == 0

        path.write_text("[{address: ")           # broken: the last set stays
        wait_for(lambda: source_state(px)["state"] == "down", 5, "the source down")
        assert source_state(px)["error"]
        broken = time.monotonic()
        load.wait_more(200)
        assert set(load.backends(broken)) == {"b2"}
        metrics = px.admin.get("/metrics").body.decode()
        assert 'poise_discovery_up{cluster="app"} 0.0' in metrics

        write(path, b1, b2)
        wait_for(lambda: source_state(px)["state"] == "up", 5, "the source up again")
        load.stop()
    assert load.failures == [], load.summary()
    backends = {b["address"] for b in px.admin.get("/clusters/app").json()["backends"]}
    assert backends == {b1.address, b2.address}


def test_discovered_backends_are_health_checked_like_listed_ones(stack, tmp_path):
    b1 = stack.backend("b1")
    path = tmp_path / "backends.json"
    write(path, b1)
    px = stack.poise([], workers=1, admin={"token": TOKEN}, cluster={
        "discovery": {"type": "file", "path": str(path), "poll_interval": "100ms"},
        "health_check": {"type": "tcp", "interval": "100ms", "timeout": "50ms", "fall": 1}})

    def states() -> dict[str, str]:
        return {b["address"]: b["state"]
                for b in px.admin.get("/clusters/app").json()["backends"]}
    wait_for(lambda: states() == {b1.address: "up"}, 5, "b1 discovered and up")
    path.write_text(json.dumps([{"address": b1.address}, {"address": "127.0.0.1:9"}]))
    wait_for(lambda: states() == {b1.address: "up", "127.0.0.1:9": "down"}, 5,
             lambda: f"the discovered dead backend checked down: {states()}")
