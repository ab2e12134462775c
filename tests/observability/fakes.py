"""A data plane's counters without sockets, for the shipper's tests."""

from __future__ import annotations

from types import SimpleNamespace

from poise.core.health import HealthFlag
from poise.proxy.http.accounting import Counts, Tries
from poise.proxy.ratelimits import Limiters
from poise.ratelimit.shared import SharedState


def fake_server():
    """``(server, site, pool)``: one listener ``web`` and one cluster ``app`` with the
    backend ``h:1``, every counter at zero."""
    site = SimpleNamespace(name="web", accepted=0, bytes_in=0, bytes_out=0, served={},
                           rejected={}, connections=set(), last_served=Counts())
    backend = type("Backend", (), {"address": "h:1"})()     # (hashable, as a Backend)
    pool = SimpleNamespace(backend=backend, tries=Tries(), idle=[], parked=[], active=0,
                           stats=SimpleNamespace(in_flight=0))
    health = SimpleNamespace(ejections={}, panic=False, flags=lambda b: HealthFlag(0))
    cluster = SimpleNamespace(retries=0, limits=None, health=health, pools={backend: pool},
                              _retired=[])
    shared = SharedState.create(1024, shareable=False)
    server = SimpleNamespace(sites={("127.0.0.1", 1): site}, retiring=[],
                             clusters={"app": cluster},
                             access_logs=SimpleNamespace(dropped=0),
                             shared=shared, limiters=Limiters(shared))
    return server, site, pool
