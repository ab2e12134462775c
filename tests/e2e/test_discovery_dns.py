"""DNS discovery through a real poise and a real dnsmasq: SRV records (ports, weights,
priorities) become the cluster's backends, and a change of records moves the traffic."""

from __future__ import annotations

import shutil
import time
import uuid

import pytest

from tests.support import dnsmasq as dnsmasq_support
from tests.support.control import TOKEN
from tests.support.loadgen import LoadGen
from tests.support.waiting import wait_for

pytestmark = pytest.mark.skipif(shutil.which("dnsmasq") is None, reason="no dnsmasq")
dnsmasq_server = dnsmasq_support.dnsmasq_server


def members(px) -> dict[str, tuple[int, bool]]:
    return {b["address"]: (b["weight"], b["backup"])
            for b in px.admin.get("/clusters/app").json()["backends"]}


def test_srv_records_drive_membership_under_load(stack, dnsmasq_server):
    b1, b2 = stack.backend("b1"), stack.backend("b2")
    target = f"t-{uuid.uuid4().hex[:6]}.poise.test"
    name = f"_app._tcp.{uuid.uuid4().hex[:6]}.poise.test"
    dnsmasq_server.set_host(target, "127.0.0.1")
    dnsmasq_server.set_srv(name, [(target, b1.port, 10, 5)])
    px = stack.poise([], workers=2, admin={"token": TOKEN}, cluster={"discovery": {
        "type": "dns", "name": name, "record": "SRV", "resolver": dnsmasq_server.address,
        "min_ttl": "100ms", "max_ttl": "200ms"}})
    wait_for(lambda: members(px) == {b1.address: (5, False)}, 10, "b1 from its SRV record")
    with LoadGen(px.addr, connections=8) as load:
        load.wait_more(200)
        dnsmasq_server.set_srv(name, [(target, b1.port, 10, 5), (target, b2.port, 20, 1)])
        wait_for(lambda: members(px) == {b1.address: (5, False), b2.address: (1, True)}, 10,
                 "b2 as a backup (a higher SRV priority)")
        dnsmasq_server.set_srv(name, [(target, b2.port, 10, 3)])
        # (set_srv restarts dnsmasq: the source may fail meanwhile and back off first)
        wait_for(lambda: members(px) == {b2.address: (3, False)}, 20, "b2 alone")
        moved = time.monotonic()
        wait_for(lambda: load.backends(moved + 1.0)["b2"] > 50, 10, "traffic on b2")
        assert load.backends(moved + 1.0)["b1"] == 0
        load.stop()
    assert load.failures == [], load.summary()
