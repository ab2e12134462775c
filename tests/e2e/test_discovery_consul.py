"""Consul discovery through a real poise (two workers) and the test suite's fake Consul
agent (no Consul server can be installed here; see docs/discovery.md): instances
registered with ``poise.discovery.register`` get traffic, a deregistration fails
nothing, and the two workers make one blocking query at the agent, not two."""

from __future__ import annotations

import time
import uuid

from poise.discovery import register
from tests.support import consul_fake as consul_support
from tests.support.control import TOKEN
from tests.support.loadgen import LoadGen
from tests.support.waiting import wait_for

consul_fake = consul_support.consul_fake


def test_consul_registrations_drive_membership_under_load(stack, consul_fake):
    b1, b2 = stack.backend("b1"), stack.backend("b2")
    service = f"app-{uuid.uuid4().hex[:6]}"
    options = {"consul": consul_fake.url, "service": service, "ttl": 3.0}
    first = register("consul", address=b1.address, **options)
    try:
        px = stack.poise([], workers=2, admin={"token": TOKEN}, cluster={"discovery": {
            "type": "consul", "address": consul_fake.url, "service": service}})
        wait_for(lambda: len(px.admin.get("/clusters/app").json()["backends"]) == 1, 10,
                 "b1 from Consul")
        wait_for(lambda: consul_fake.blocking_by_service.get(service) == 1, 5,
                 "one blocking query held")
        time.sleep(0.3)         # (a second worker's query, if any, would show by now)
        assert consul_fake.blocking_by_service.get(service) == 1
        with LoadGen(px.addr, connections=8) as load:
            load.wait_more(200)
            with register("consul", address=b2.address, **options):
                added = time.monotonic()
                wait_for(lambda: load.backends(added)["b2"] > 0, 5, "b2 traffic")
            gone = time.monotonic()
            wait_for(lambda: load.backends(gone + 1.0)["b1"] > 50, 10, "b1 alone again")
            assert load.backends(gone + 1.0)["b2"] == 0
            load.stop()
        assert load.failures == [], load.summary()
    finally:
        first.stop()
