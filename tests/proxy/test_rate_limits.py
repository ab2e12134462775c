"""Rate limits on the request path: first without sockets (which address a request
comes from behind trusted proxies; the rules a listener's config compiles into), then
over real sockets against a poise process and an h11 backend.

Limits in the socket tests are ``1/m`` (one request per 60 s after the burst), so
nothing refills while a test runs and every count is exact.  The module's poise trusts
127.0.0.0/8 as a proxy: a test picks its own client address with ``X-Forwarded-For``
(and so its own ``client_ip`` key) without disturbing the others.
"""

from __future__ import annotations

import itertools
import math
import socket
import struct
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from poise.config import parse_config
from poise.errors import RateLimited
from poise.proxy.http.limiting import CLIENT_IP, CONSTANT, HEADER
from poise.proxy.ratelimits import Limiters
from poise.proxy.trust import TrustedProxies
from poise.ratelimit.shared import SharedState
from tests.support.client import H11Client, RawReader, connect, read_until_close
from tests.support.control import TOKEN
from tests.support.procs import served
from tests.support.waiting import wait_for

# -- TrustedProxies: which address is the client -------------------------------------------------

TRUST = TrustedProxies(["10.0.0.0/8", "192.168.1.1/32", "2001:db8::/32"])


@pytest.mark.parametrize(("peer", "xff", "client"), [
    # a peer we do not trust is the client, whatever it claims
    (b"203.0.113.5", b"198.51.100.1", b"203.0.113.5"),
    (b"10.0.0.1", b"198.51.100.1", b"198.51.100.1"),
    # the right-most untrusted hop: what a client forged to its left is ignored
    (b"10.0.0.1", b"6.6.6.6, 198.51.100.1", b"198.51.100.1"),
    (b"10.0.0.1", b"6.6.6.6, 198.51.100.1, 10.9.9.9, 192.168.1.1", b"198.51.100.1"),
    (b"10.0.0.1", b" 198.51.100.1 ,10.2.3.4 ", b"198.51.100.1"),
    (b"10.0.0.1", b"198.51.100.1,,  ,10.2.3.4", b"198.51.100.1"),
    # every hop trusted: the left-most is the client
    (b"10.0.0.1", b"10.1.1.1, 192.168.1.1, 10.2.2.2", b"10.1.1.1"),
    # nothing usable in the header: the peer
    (b"10.0.0.1", b"", b"10.0.0.1"),
    (b"10.0.0.1", b" , ,", b"10.0.0.1"),
    # IPv4-mapped IPv6 peers and hops are their IPv4 address
    (b"::ffff:10.0.0.1", b"198.51.100.1", b"198.51.100.1"),
    (b"::ffff:203.0.113.5", b"198.51.100.1", b"::ffff:203.0.113.5"),
    (b"10.0.0.1", b"198.51.100.1, ::ffff:10.3.3.3", b"198.51.100.1"),
    # IPv6
    (b"2001:db8::7", b"2001:db8:1::1, 2001:db9::1", b"2001:db9::1"),
    (b"2001:db9::7", b"198.51.100.1", b"2001:db9::7"),
    # junk is not a trusted proxy: the right-most junk hop is the client (a trusted
    # proxy wrote it, so the client could not have), junk to the left is ignored
    (b"10.0.0.1", b"not-an-ip, 10.2.3.4", b"not-an-ip"),
    (b"10.0.0.1", b"\xff\xfe, 198.51.100.1", b"198.51.100.1"),
    (b"10.0.0.1", b"198.51.100.1:4711, 10.2.3.4", b"198.51.100.1:4711"),
    (b"junk", b"198.51.100.1", b"junk"),
])
def test_client_ip(peer, xff, client):
    assert TRUST.client_ip(peer, xff) == client


def test_trusts():
    assert TRUST.trusts(b"10.255.0.1") and TRUST.trusts(b"192.168.1.1")
    assert not TRUST.trusts(b"192.168.1.2") and not TRUST.trusts(b"")
    assert TRUST.trusts(b"::ffff:192.168.1.1")
    assert TRUST.trusts(b"2001:db8:ffff::1") and not TRUST.trusts(b"2001:db9::1")
    assert repr(TRUST) == "<TrustedProxies 10.0.0.0/8, 192.168.1.1/32, 2001:db8::/32>"


def test_many_forwarded_addresses_keep_answers_right():
    trust = TrustedProxies(["10.0.0.0/8"])
    for i in range(20_000):      # more than the decision cache holds
        hop = f"172.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}".encode()
        assert trust.client_ip(b"10.0.0.1", hop + b", 10.0.0.2") == hop
    assert trust.client_ip(b"10.0.0.1", b"10.1.1.1") == b"10.1.1.1"
    assert trust.client_ip(b"172.0.0.1", b"10.1.1.1") == b"172.0.0.1"


# -- Limiters: the rules a listener compiles into --------------------------------------------------

CONFIG = """\
listeners:
  - name: web
    bind: 127.0.0.1:8080
    trusted_proxies: [10.0.0.0/8]
    rate_limit:
      - {rate: 100/s, burst: 3}
      - {rate: 20/m, key: 'header:X-Api-Key', name: keys}
    routes:
      - {match: {path_prefix: /a}, cluster: app}
      - {match: {path_prefix: /b}, cluster: app, name: bee}
      - {match: {path_prefix: /own}, cluster: other, name: own,
         rate_limit: [{rate: 1000/h, key: cluster}, {rate: 5/s, key: route, mode: shadow}]}
      - {match: {path_prefix: /free}, cluster: app, name: free, rate_limit: []}
clusters:
  - {name: app, backends: [{address: 127.0.0.1:9001}]}
  - {name: other, backends: [{address: 127.0.0.1:9002}]}
"""


def build(text: str = CONFIG, shared: SharedState | None = None,
          limiters: Limiters | None = None):
    listener = parse_config(text).listeners[0]
    limiters = limiters or Limiters(shared or SharedState.create(1024, shareable=False))
    limiters.begin([listener.name])
    routes = limiters.route_limits(listener)
    limiters.end()
    return limiters, routes


def test_limiters_compile_rules_per_route():
    limiters, (a, b, own, free) = build()
    assert free is None
    assert limiters.routes == [a, b, own]
    # routes without their own share the listener's rules (one bucket per key)
    assert a.rules is b.rules
    assert [(r.name, r.kind, r.header, r.shadow) for r in a.rules] == [
        ("web.0", CLIENT_IP, b"", False), ("keys", HEADER, b"x-api-key", False)]
    assert [r.interval for r in a.rules] == [10_000_000, 3_000_000_000]      # ns
    assert [r.span for r in a.rules] == [30_000_000, 60_000_000_000]
    assert a.trust is not None and a.trust.trusts(b"10.1.2.3")
    assert (a.label, b.label, own.label) == ("app", "bee", "own")
    # constant keys are precomputed: the cluster's name, the route's
    assert [(r.name, r.kind, r.shadow) for r in own.rules] == [
        ("web.own.0", CONSTANT, False), ("web.own.1", CONSTANT, True)]
    assert own.keys == [b"other", b"own"]
    assert all(h != 0 for h in own.hashes)
    assert repr(own.rules[1]) == "<Rule web.own.1 local 5/s burst=5 shadow>"
    assert repr(a.rules[0]) == "<Rule web.0 local 100/s burst=3>"
    assert repr(own) == "<RouteLimits web/own rules=2 denied=0 shadowed=0>"


def test_policy_and_denial_headers():
    _, (a, _, own, _) = build()
    assert a.rules[0].policy == b'ratelimit-policy: "web.0";q=100;w=1\r\n'
    assert a.rules[1].policy == b'ratelimit-policy: "keys";q=20;w=60\r\n'
    assert own.rules[0].policy == b'ratelimit-policy: "web.own.0";q=1000;w=3600\r\n'
    for wait, seconds in [(0.0001, 1), (0.5, 1), (1.0, 1), (1.01, 2), (59.2, 60)]:
        denial = a.rules[1].denial(wait)
        assert isinstance(denial, RateLimited) and denial.status == 429
        assert denial.headers == (b'ratelimit-policy: "keys";q=20;w=60\r\n'
                                  b'ratelimit: "keys";r=0;t=%d\r\nretry-after: %d\r\n'
                                  % (seconds, seconds))


def test_seeds_follow_a_limits_identity():
    shared = SharedState.create(1024, shareable=False)
    _, (a1, _, own1, _) = build(shared=shared)
    _, (a2, _, own2, _) = build(shared=shared)
    # the same config (a reload that keeps a limit): the same seeds, so the same state
    assert [r.seed for r in a1.rules + own1.rules] == [r.seed for r in a2.rules + own2.rules]
    assert len({r.seed for r in a1.rules + own1.rules}) == 4
    # a changed rate: a new identity, starting afresh
    _, (a3, *_) = build(CONFIG.replace("{rate: 100/s, burst: 3}", "{rate: 50/s, burst: 3}"),
                        shared=shared)
    assert a3.rules[0].seed != a1.rules[0].seed
    assert a3.rules[1].seed == a1.rules[1].seed


def test_a_reload_keeps_the_routes_counts():
    limiters, (a, b, own, _) = build()
    a.denied, own.shadowed = 7, 3
    _, (a2, b2, own2, _) = build(limiters=limiters)
    assert (a2.denied, b2.denied, own2.shadowed) == (7, 0, 3)
    assert a2 is not a


def test_no_limits_anywhere():
    text = CONFIG.split("    rate_limit:\n")[0] + "    routes:\n      - {cluster: app}\n" \
        "clusters:\n  - {name: app, backends: [{address: 127.0.0.1:9001}]}\n"
    limiters, routes = build(text)
    assert routes == [None] and limiters.routes == []


# -- over sockets --------------------------------------------------------------------------------

PER_ROUTE = {"rate": "1/m", "burst": 2, "key": "route", "name": "per-route"}
PER_CLUSTER = {"rate": "1/m", "burst": 2, "key": "cluster", "name": "per-cluster"}


def route(prefix: str, name: str, limits=None, cluster: str = "app") -> dict:
    r = {"match": {"path_prefix": prefix}, "cluster": cluster, "name": name}
    if limits is not None:
        r["rate_limit"] = limits
    return r


ROUTES = [
    route("/inherit-a", "inherit-a"),
    route("/inherit-b", "inherit-b"),
    route("/own", "own", {"rate": "1/m", "burst": 1, "name": "own"}),
    route("/free", "free", []),
    route("/keyed", "keyed", {"rate": "1/m", "burst": 2, "key": "header:X-Api-Key",
                              "name": "apikey"}),
    route("/route-x", "rx", PER_ROUTE),
    route("/route-y", "ry", PER_ROUTE),
    route("/cl-a", "cla", PER_CLUSTER),
    route("/cl-b", "clb", PER_CLUSTER),
    route("/cl-c", "clc", PER_CLUSTER, cluster="other"),
    route("/shadow", "shadow", {"rate": "1/m", "burst": 1, "mode": "shadow",
                                "name": "shadow"}),
    route("/mixed", "mixed", [{"rate": "1/m", "burst": 1, "mode": "shadow", "name": "sh2"},
                              {"rate": "1/m", "burst": 3, "name": "en2"}]),
    {"cluster": "app"},
]

_clients = itertools.count(1)


def new_client() -> tuple[str, str]:
    """An X-Forwarded-For header naming a client address no other test uses."""
    n = next(_clients)
    return ("X-Forwarded-For", f"198.51.{n >> 8}.{n & 255}")


@pytest.fixture(scope="module")
def site(module_stack):
    app = module_stack.backend("app")
    other = module_stack.backend("other")
    px = module_stack.poise(
        [app], admin={"token": TOKEN},
        listener={"trusted_proxies": ["127.0.0.0/8"], "routes": ROUTES,
                  "rate_limit": {"rate": "1/m", "burst": 2, "name": "default"}},
        extra_clusters=[{"name": "other", "backends": [{"address": other.address}]}])
    return px, app


def statuses(px, target: str, n: int, headers=(), method: str = "GET") -> list[int]:
    """``n`` requests on one keep-alive connection; their statuses."""
    with H11Client(px.addr) as c:
        out = []
        for _ in range(n):
            out.append(c.request(method, target, list(headers)).status)
            assert c.reusable
        return out


def one(px, target: str, headers=()) -> int:
    with H11Client(px.addr) as c:
        return c.get(target, list(headers)).status


def too_many(name: str, q: int, w: int, t: int, close: bool = False) -> bytes:
    return (b"HTTP/1.1 429 Too Many Requests\r\n"
            b"content-type: text/plain\r\ncontent-length: 22\r\n"
            b'ratelimit-policy: "%s";q=%d;w=%d\r\n'
            b'ratelimit: "%s";r=0;t=%d\r\nretry-after: %d\r\n'
            % (name.encode(), q, w, name.encode(), t, t)
            + (b"connection: close\r\n" if close else b"")
            + b"\r\n")


def read_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def metric(px, name: str, **labels) -> float:
    r = px.admin.get("/metrics")
    assert r.status == 200, r
    total = 0.0
    for family in text_string_to_metric_families(r.body.decode()):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def test_the_429_response_exactly_and_the_connection_is_kept(site):
    px, app = site
    client = new_client()
    head = b"GET /shape?%d HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: %s\r\n\r\n"
    with connect(px.addr) as s:
        reader = RawReader(s)
        for i in range(2):
            s.sendall(head % (i, client[1].encode()))
            assert reader.read_response().status == 200
        began = time.monotonic()
        for i in range(2, 4):
            s.sendall(head % (i, client[1].encode()))
            # 60 s after the burst, less what has passed since (rounded up)
            t = 60 - math.floor(time.monotonic() - began)
            body = b"429 Too Many Requests\n"
            got = read_exactly(s, len(too_many("default", 1, 60, t) + body))
            assert got in (too_many("default", 1, 60, t) + body,
                           too_many("default", 1, 60, t - 1) + body), got
        s.sendall(head % (4, client[1].encode()))
        assert status_line(s) == b"HTTP/1.1 429 Too Many Requests"
    assert [r["target"] for r in served(app) if r["target"].startswith("/shape?")][-2:] == \
        ["/shape?0", "/shape?1"]


def status_line(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(1)
        assert chunk, "closed before a status line"
        data += chunk
    return data[:-2]


def test_head_gets_a_429_without_a_body(site):
    px, _ = site
    client = new_client()
    with connect(px.addr) as s:
        reader = RawReader(s)
        for _ in range(2):
            s.sendall(b"HEAD /head HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: %s\r\n\r\n"
                      % client[1].encode())
            assert reader.read_response("HEAD").status == 200
        s.sendall(b"HEAD /head HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: %s\r\n\r\n"
                  % client[1].encode())
        head = too_many("default", 1, 60, 60)
        got = read_exactly(s, len(head))
        assert got in (head, head.replace(b"t=60", b"t=59").replace(b": 60", b": 59"))
        # no body follows: the next response starts right after the head
        s.sendall(b"GET /free HTTP/1.1\r\nHost: x\r\n\r\n")
        assert reader.read_response().status == 200


@pytest.mark.parametrize("body", ["sent", "not yet sent", "chunked"])
def test_a_denied_request_with_a_body_closes_the_connection(site, body):
    px, app = site
    client = new_client()
    with H11Client(px.addr) as c:
        assert c.request("POST", "/own?admitted", [client], b"hello").status == 200
        assert c.reusable
    app.reset()
    with connect(px.addr) as s:
        base = b"POST /own?denied HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: %s\r\n" \
            % client[1].encode()
        if body == "sent":
            s.sendall(base + b"Content-Length: 5\r\n\r\nhello")
        elif body == "not yet sent":
            s.sendall(base + b"Content-Length: 100000\r\n\r\n")
        else:
            s.sendall(base + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        data = read_until_close(s, timeout=5)
    assert data.startswith(too_many("own", 1, 60, 60, close=True)) or \
        data.startswith(too_many("own", 1, 60, 59, close=True)), data
    assert data.endswith(b"\r\n\r\n429 Too Many Requests\n")
    assert served(app) == []


def test_pipelined_requests_partly_limited_keep_their_order(site):
    px, app = site
    keys = ["p1", "p2", "p1", "p1", "p2", "p2", "p1"]
    with H11Client(px.addr) as c:
        responses = c.pipeline([("GET", f"/keyed/{i}", [("X-Api-Key", f"pipe-{k}")], None)
                                for i, k in enumerate(keys)])
        assert c.reusable
    assert [r.status for r in responses] == [200, 200, 200, 429, 200, 429, 429]
    for i, r in enumerate(responses):
        if r.status == 200:
            assert r.json()["target"] == f"/keyed/{i}"
        else:
            assert r.header("ratelimit") in ('"apikey";r=0;t=60', '"apikey";r=0;t=59')
            assert r.body == b"429 Too Many Requests\n"


def test_pipelined_denied_request_with_a_body(site):
    px, app = site
    client = new_client()
    app.reset()
    with H11Client(px.addr) as c:
        responses = c.pipeline([
            ("GET", "/own/0", [client], None),
            ("POST", "/own/1", [client], b"x" * 10),
            ("GET", "/own/2", [client], None),
        ])
    # The POST is answered once the GET before it is; its body has been read by then,
    # so the connection may go on (or, were it answered at once, close): either way
    # in order, and no byte of its body is taken for a request.
    statuses = [r.status for r in responses]
    if responses[1].header("connection") == "close":
        assert statuses == [200, 429]
    else:
        assert statuses == [200, 429, 429]
    assert [r["target"] for r in served(app)] == ["/own/0"]


def test_header_keys(site):
    px, _ = site
    key = ("X-Api-Key", "alpha")
    assert statuses(px, "/keyed", 2, [key]) == [200, 200]
    assert one(px, "/keyed", [key]) == 429
    # the header's name is case-insensitive; its value is the key, exactly
    assert one(px, "/keyed", [("x-API-key", "alpha")]) == 429
    assert statuses(px, "/keyed", 3, [("X-API-KEY", "Alpha")]) == [200, 200, 429]
    assert statuses(px, "/keyed", 3, [("X-Api-Key", "beta")]) == [200, 200, 429]
    # not the client address: every address shares the key
    assert one(px, "/keyed", [key, new_client()]) == 429


def test_requests_without_the_header_share_one_key(site):
    px, _ = site
    assert statuses(px, "/keyed", 2) == [200, 200]
    assert one(px, "/keyed", [new_client()]) == 429
    assert one(px, "/keyed", [("X-Api-Key", "")]) == 429      # empty is the same key
    assert one(px, "/keyed", [("X-Api-Key", "gamma")]) == 200


def test_route_keys(site):
    px, _ = site
    # one limit (same name and settings) on two routes, keyed by route: a bucket each,
    # whoever the client is
    assert one(px, "/route-x", [new_client()]) == 200
    assert one(px, "/route-x", [new_client()]) == 200
    assert one(px, "/route-x", [new_client()]) == 429
    assert statuses(px, "/route-y", 3, [new_client()]) == [200, 200, 429]


def test_cluster_keys(site):
    px, _ = site
    # /cl-a and /cl-b both go to cluster app: one bucket; /cl-c goes to other
    assert one(px, "/cl-a", [new_client()]) == 200
    assert one(px, "/cl-b", [new_client()]) == 200
    assert one(px, "/cl-a", [new_client()]) == 429
    assert one(px, "/cl-b", [new_client()]) == 429
    r_other = statuses(px, "/cl-c", 3, [new_client()])
    assert r_other == [200, 200, 429]


def test_listener_default_route_override_and_none(site):
    px, _ = site
    client = [new_client()]
    # routes without their own limits share the listener's (one bucket per client)
    assert one(px, "/inherit-a", client) == 200
    assert one(px, "/inherit-b", client) == 200
    assert one(px, "/inherit-a", client) == 429
    assert one(px, "/anything-else", client) == 429
    # a route's own limit is its own bucket
    assert statuses(px, "/own", 2, client) == [200, 429]
    # rate_limit: [] on a route: no limit at all
    assert statuses(px, "/free", 20, client) == [200] * 20
    # another client is not affected
    assert statuses(px, "/inherit-b", 3, [new_client()]) == [200, 200, 429]


def test_shadow_mode_only_counts(site):
    px, _ = site
    before = metric(px, "poise_rate_limited_total", route="shadow", mode="shadow")
    assert statuses(px, "/shadow", 5, [new_client()]) == [200] * 5
    wait_for(lambda: metric(px, "poise_rate_limited_total", route="shadow",
                            mode="shadow") == before + 4, 5, "4 shadowed requests counted")
    assert metric(px, "poise_rate_limited_total", route="shadow", mode="enforce") == 0


def test_shadow_and_enforced_limits_together(site):
    px, _ = site
    before = metric(px, "poise_rate_limited_total", route="mixed", mode="shadow")
    with H11Client(px.addr) as c:
        client = [new_client()]
        codes = [c.get("/mixed", client).status for _ in range(3)]
        denied = c.get("/mixed", client)
    assert codes == [200, 200, 200]
    assert denied.status == 429
    assert denied.header("ratelimit-policy") == '"en2";q=1;w=60'
    # every request past the shadow rule's burst was counted by it, the denied one too
    wait_for(lambda: metric(px, "poise_rate_limited_total", route="mixed",
                            mode="shadow") == before + 3, 5, "3 shadowed requests counted")
    assert metric(px, "poise_rate_limited_total", route="mixed", mode="enforce") >= 1


def test_x_forwarded_for_from_a_trusted_peer_names_the_client(site):
    px, app = site
    n = next(_clients)
    client, forged = f"198.51.{n >> 8}.{n & 255}", "6.6.6.6"
    assert one(px, "/xff", [("X-Forwarded-For", client)]) == 200
    # what the client forged to the left is ignored: the same client
    assert one(px, "/xff", [("X-Forwarded-For", f"{forged}, {client}")]) == 200
    assert one(px, "/xff", [("X-Forwarded-For", f"203.0.113.1, {client}")]) == 429
    # two X-Forwarded-For fields are one list
    with H11Client(px.addr) as c:
        r = c.get("/xff", [("X-Forwarded-For", forged), ("X-Forwarded-For", client)])
    assert r.status == 429
    # every hop trusted: the left-most is the client
    other = [("X-Forwarded-For", "127.0.0.9, 127.0.0.8")]
    assert statuses(px, "/xff", 3, other) == [200, 200, 429]
    # the backend still sees the whole chain, with the peer appended
    with H11Client(px.addr) as c:
        echo = c.get("/free", [("X-Forwarded-For", f"{forged}, {client}")]).json()
    assert [v for n, v in echo["headers"] if n.lower() == "x-forwarded-for"] == \
        [f"{forged}, {client}, 127.0.0.1"]


def test_x_forwarded_for_from_an_untrusted_peer_is_ignored(stack):
    b = stack.backend()
    px = stack.poise([b], listener={"trusted_proxies": ["10.0.0.0/8"],
                                    "rate_limit": {"rate": "1/m", "burst": 2}})
    assert one(px, "/", [("X-Forwarded-For", "198.51.100.1")]) == 200
    assert one(px, "/", [("X-Forwarded-For", "198.51.100.2")]) == 200
    assert one(px, "/", [("X-Forwarded-For", "198.51.100.3")]) == 429
    assert one(px, "/", []) == 429


def abort(sock: socket.socket) -> None:
    """Close with a reset (SO_LINGER 0), as a client that crashed."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_clients_that_leave_right_after_sending(site):
    px, app = site
    client = new_client()[1].encode()
    get = b"GET /leave HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: %s\r\n\r\n" % client
    post = (b"POST /leave HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: %s\r\n"
            b"Content-Length: 1000\r\n\r\npart" % client)
    for i in range(60):
        s = connect(px.addr)
        s.sendall((get, get * 5, post, get + post)[i % 4])
        if i % 2:
            abort(s)
        else:
            s.shutdown(socket.SHUT_WR)
            s.close()
    # poise goes on serving (and logs no traceback: see the stack fixture), and the
    # client is still limited
    with H11Client(px.addr) as c:
        assert c.get("/leave", [("X-Forwarded-For", client.decode())]).status == 429
        assert c.get("/free").status == 200


@pytest.mark.parametrize("leave", ["fin", "reset"])
def test_a_client_that_leaves_at_once_is_still_limited_by_its_address(stack, leave):
    """BUG (poise/proxy/http/protocol.py, ClientConnection.connection_made): a client
    that connects, sends a request and resets the connection (SO_LINGER 0) before poise
    runs connection_made gets ``peer_ip = b"unix"`` (peername is None by then), yet
    its buffered request is still served: rate-limited under the key ``unix`` (shared
    by every such connection, whoever sent it) instead of 127.0.0.1, so it is admitted
    although 127.0.0.1 has no budget left, and reaches the backend with
    ``x-forwarded-for: unix`` (the access log says client "unix" too).  The address
    accept() returned should be used, or such a connection dropped unserved."""
    b = stack.backend()
    px = stack.poise([b], listener={"rate_limit": {"rate": "1/m", "burst": 1}})
    with H11Client(px.addr) as c:
        assert c.get("/first").status == 200
    for i in range(30):
        s = connect(px.addr)
        s.sendall(b"GET /late?%d HTTP/1.1\r\nHost: x\r\n\r\n" % i)
        if leave == "reset":
            abort(s)
        else:
            s.shutdown(socket.SHUT_WR)
            s.close()
    with H11Client(px.addr) as c:
        assert c.get("/last").status == 429
    assert [r["target"] for r in served(b)] == ["/first"]


# -- hostile: many keys against a small table --------------------------------------------------


def test_twenty_thousand_api_keys_against_a_small_table(stack):
    """20,000 distinct X-Api-Key values (and a hot key among them, every 100th
    request) against a table of 1024 slots: every new key is admitted, the table
    evicts, the hot key (whose TAT lies furthest ahead) stays limited."""
    b = stack.backend()
    px = stack.poise([b], admin={"token": TOKEN}, rate_limit_table_slots=1024,
                     listener={"rate_limit": {"rate": "1/m", "burst": 2,
                                              "key": "header:X-Api-Key"}})
    n, batch = 20_000, 250
    hot_statuses, fresh_statuses = [], []
    started = time.monotonic()
    with connect(px.addr, timeout=30) as s:
        reader = RawReader(s)
        for start in range(0, n, batch):
            wire, hot = [], []
            for i in range(start, start + batch):
                is_hot = i % 100 == 0
                key = b"hot" if is_hot else b"k%d" % i
                wire.append(b"GET /x HTTP/1.1\r\nHost: x\r\nX-Api-Key: %s\r\n\r\n" % key)
                hot.append(is_hot)
            s.sendall(b"".join(wire))
            for is_hot in hot:
                status = reader.read_response().status
                (hot_statuses if is_hot else fresh_statuses).append(status)
    elapsed = time.monotonic() - started
    assert elapsed < 55, "the test relies on no key refilling (1/m)"
    assert fresh_statuses == [200] * (n - n // 100)
    assert hot_statuses[:2] == [200, 200]
    assert hot_statuses.count(200) == 2, "the hot key got through again"
    # every insertion into a full bucket evicted a live key: all but the first 1023
    # (the hot key holds the 1024th slot)
    wait_for(lambda: metric(px, "poise_rate_limit_evictions_total") == n - n // 100 - 1023,
             5, lambda: f"evictions {metric(px, 'poise_rate_limit_evictions_total')}")
    with H11Client(px.addr) as c:
        assert c.get("/x", [("X-Api-Key", "hot")]).status == 429
        assert c.get("/x", [("X-Api-Key", "new")]).status == 200
