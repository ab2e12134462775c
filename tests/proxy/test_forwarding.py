"""Request/response header rewriting over real sockets: Host, X-Forwarded-*, hop-by-hop
removal in both directions, and `Upgrade: h2c` never reaching the backend."""

from __future__ import annotations

import pytest

from tests.support.client import H11Client, RawReader, connect, echo_headers

HOP_BY_HOP = ("connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade",
              "transfer-encoding")


@pytest.fixture(scope="module")
def proxy(module_stack):
    backend = module_stack.backend("fw")
    return module_stack.poise([backend]), backend


def echo(proxy, headers=None, method="GET", target="/echo", body=None, chunks=None) -> dict:
    px, _ = proxy
    with H11Client(px.addr) as c:
        r = c.request(method, target, headers, body, chunks)
        assert r.status == 200, r
        return r.json()


def test_host_is_kept(proxy):
    seen = echo(proxy, [("Host", "app.example:8443")])
    assert echo_headers(seen, "host") == ["app.example:8443"]


def test_request_target_and_method_are_forwarded_unchanged(proxy):
    seen = echo(proxy, method="DELETE", target="/echo/a%20b/../c?q=1&q=2#")
    assert seen["method"] == "DELETE"
    assert seen["target"] == "/echo/a%20b/../c?q=1&q=2#"


def test_absolute_form_target_becomes_origin_form_with_its_host(proxy):
    px, _ = proxy
    with connect(px.addr) as s:
        s.sendall(b"GET http://abs.example:81/echo/p?q=1 HTTP/1.1\r\nHost: ignored.example\r\n\r\n")
        seen = RawReader(s).read_response().json()
    assert seen["target"] == "/echo/p?q=1"
    assert echo_headers(seen, "host") == ["abs.example:81"]


def test_asterisk_form_options_is_forwarded(proxy):
    px, _ = proxy
    with connect(px.addr) as s:
        s.sendall(b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n")
        seen = RawReader(s).read_response().json()
    assert (seen["method"], seen["target"]) == ("OPTIONS", "*")


def test_request_is_forwarded_as_http11(proxy):
    px, _ = proxy
    with connect(px.addr) as s:
        s.sendall(b"GET /echo HTTP/1.0\r\n\r\n")
        seen = RawReader(s).read_response().json()
    assert seen["version"] == "1.1"


def test_x_forwarded_for_is_set_to_the_client_ip(proxy):
    seen = echo(proxy)
    assert echo_headers(seen, "x-forwarded-for") == ["127.0.0.1"]


def test_x_forwarded_for_appends_to_an_existing_value(proxy):
    seen = echo(proxy, [("X-Forwarded-For", "203.0.113.7")])
    assert echo_headers(seen, "x-forwarded-for") == ["203.0.113.7, 127.0.0.1"]


def test_x_forwarded_for_joins_several_existing_headers_in_order(proxy):
    seen = echo(proxy, [("X-Forwarded-For", "203.0.113.7"),
                        ("X-Forwarded-For", "198.51.100.1, 192.0.2.9")])
    assert echo_headers(seen, "x-forwarded-for") == [
        "203.0.113.7, 198.51.100.1, 192.0.2.9, 127.0.0.1"]


def test_x_forwarded_proto_and_host_are_set_by_the_proxy(proxy):
    # Client-supplied values must not survive: the proxy knows the truth.
    seen = echo(proxy, [("Host", "shop.example"), ("X-Forwarded-Proto", "https"),
                        ("X-Forwarded-Host", "evil.example")])
    assert echo_headers(seen, "x-forwarded-proto") == ["http"]
    assert echo_headers(seen, "x-forwarded-host") == ["shop.example"]


def test_end_to_end_request_headers_pass_unchanged(proxy):
    # names keep their case, values their bytes, repeated headers their order
    sent = [("X-Custom", "a,b ;c"), ("accept", "*/*"), ("X-CUSTOM", "second"),
            ("Cookie", "a=1; b=2"), ("X-Tab", "a\tb"), ("X-Latin1", b"caf\xe9")]
    seen = echo(proxy, sent)
    keep = {"x-custom", "accept", "cookie", "x-tab", "x-latin1"}
    got = [(n, v) for n, v in seen["headers"] if n.lower() in keep]
    assert got == [(n, v.decode("latin-1") if isinstance(v, bytes) else v) for n, v in sent]


def test_hop_by_hop_request_headers_are_removed(proxy):
    seen = echo(proxy, [
        ("Connection", "keep-alive, X-Hop-A, x-hop-b"),
        ("X-Hop-A", "1"), ("X-Hop-B", "2"),
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Connection", "keep-alive"),
        ("TE", "trailers"),
        ("Trailer", "X-Checksum"),
        ("X-Stays", "yes"),
    ])
    names = {n.lower() for n, _ in seen["headers"]}
    for gone in ("connection", "x-hop-a", "x-hop-b", "keep-alive", "proxy-connection",
                 "te", "trailer", "upgrade"):
        assert gone not in names, f"{gone} reached the backend: {seen['headers']}"
    assert echo_headers(seen, "x-stays") == ["yes"]


def test_connection_listing_content_length_does_not_remove_it(proxy):
    body = b"hello, world"
    seen = echo(proxy, [("Connection", "Content-Length, X-Hop")], "POST", "/echo", body)
    assert seen["body_len"] == len(body) and seen["body"] == body.decode()
    assert echo_headers(seen, "content-length") == [str(len(body))]


def test_connection_listing_transfer_encoding_does_not_break_framing(proxy):
    parts = [b"abc", b"defgh", b"i" * 1000]
    seen = echo(proxy, [("Connection", "transfer-encoding, host")], "POST", "/echo",
                chunks=parts)
    assert seen["body"] == b"".join(parts).decode()
    assert echo_headers(seen, "host"), "Host must never be removed by being listed"


def test_websocket_handshake_is_forwarded_and_a_refusal_closes_the_connection(proxy):
    # A WebSocket handshake keeps Connection/Upgrade for this hop (the relay itself is
    # tests/proxy/test_websocket.py); a backend that answers it with anything but 101
    # gives an ordinary response, after which the connection closes (nothing the
    # client sent after the handshake was parsed).
    px, _ = proxy
    with H11Client(px.addr) as c:
        r = c.request("GET", "/echo", [("Connection", "Upgrade"), ("Upgrade", "websocket"),
                                       ("Sec-WebSocket-Version", "13")])
        assert r.status == 200, r
        seen = r.json()
        assert r.header("connection") == "close", r
    assert echo_headers(seen, "upgrade") == ["websocket"]
    assert echo_headers(seen, "connection") == ["upgrade"]
    assert echo_headers(seen, "sec-websocket-version") == ["13"]


@pytest.mark.parametrize("headers", [
    [("Connection", "Upgrade"), ("Upgrade", "websocket")],
], ids=["websocket-disabled-on-route"])
def test_websocket_upgrade_declined_where_the_route_disables_it(module_stack, headers):
    backend = module_stack.backend("fw-nows")
    px = module_stack.poise([backend], listener={
        "routes": [{"cluster": "app", "websocket": {"enabled": False}}]})
    with H11Client(px.addr) as c:
        r = c.request("GET", "/echo", headers)
        assert r.status == 200, r
    names = {n.lower() for n, _ in r.json()["headers"]}
    assert "upgrade" not in names and "connection" not in names


@pytest.mark.parametrize("method,headers,body", [
    ("POST", [("Connection", "Upgrade"), ("Upgrade", "websocket"),
              ("Content-Length", "3")], b"abc"),
    ("GET", [("Connection", "Upgrade"), ("Upgrade", "websocketx")], None),
], ids=["post-with-body", "other-protocol"])
def test_upgrade_that_is_not_a_websocket_handshake_is_declined(proxy, method, headers, body):
    px, _ = proxy
    with H11Client(px.addr) as c:
        r = c.request(method, "/echo", headers, body)
        assert r.status == 200, r
        seen = r.json()
        again = c.request("GET", "/echo")     # declined: the connection carries on
        assert again.status == 200, again
    names = {n.lower() for n, _ in seen["headers"]}
    assert "upgrade" not in names and "connection" not in names
    if body:
        assert seen["body"] == body.decode()


def test_h2c_upgrade_never_reaches_the_backend(proxy):
    px, backend = proxy
    backend.reset()
    with connect(px.addr) as s:
        s.sendall(b"GET /echo HTTP/1.1\r\nHost: h2c.example\r\n"
                  b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                  b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
                  b"GET /echo?second HTTP/1.1\r\nHost: h2c.example\r\n\r\n")
        reader = RawReader(s)
        first = reader.read_response()
        assert first.status == 200, "an h2c upgrade must be answered as plain HTTP/1.1"
        seen = first.json()
        names = {n.lower() for n, _ in seen["headers"]}
        assert not names & {"upgrade", "http2-settings", "connection"}, seen["headers"]
        second = reader.read_response()
        assert second.status == 200 and second.json()["target"] == "/echo?second"
    assert backend.targets() == ["/echo", "/echo?second"]


@pytest.mark.parametrize("framing", [b"Content-Length: 5\r\n\r\nhello",
                                     b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"],
                         ids=["content-length", "chunked"])
def test_h2c_upgrade_offer_with_a_body_is_answered_normally(proxy, framing):
    # e.g. an HTTP/1.1 client offering h2c on a POST: we never upgrade, so the offer is
    # dropped and the request served as HTTP/1.1.
    px, backend = proxy
    backend.reset()
    with connect(px.addr) as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: h2c.example\r\n"
                  b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                  b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n" + framing
                  + b"GET /echo?second HTTP/1.1\r\nHost: h2c.example\r\n\r\n")
        reader = RawReader(s)
        first = reader.read_response()
        assert first.status == 200, first.body
        seen = first.json()
        assert seen["body"] == "hello"
        assert not {n.lower() for n, _ in seen["headers"]} & {"upgrade", "http2-settings"}
        assert reader.read_response().json()["target"] == "/echo?second"


def test_upgrade_header_without_connection_upgrade_keeps_the_body(proxy):
    # Regression: only a request llhttp really treats as an upgrade (Connection: upgrade)
    # has its body parsed separately; a bare Upgrade header must not stall the request.
    px, backend = proxy
    backend.reset()
    with connect(px.addr) as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: h2c.example\r\nUpgrade: h2c\r\n"
                  b"Content-Length: 5\r\n\r\nhello"
                  b"GET /echo?second HTTP/1.1\r\nHost: h2c.example\r\n\r\n")
        reader = RawReader(s)
        first = reader.read_response()
        assert first.status == 200 and first.json()["body"] == "hello"
        assert reader.read_response().json()["target"] == "/echo?second"


def test_hop_by_hop_response_headers_are_removed(proxy):
    px, _ = proxy
    with H11Client(px.addr) as c:
        r = c.get("/hop")
        assert r.status == 200 and r.body == b"hop\n"
        names = r.names()
        for gone in ("x-resp-hop", "keep-alive", "proxy-connection", "te", "trailer", "upgrade"):
            assert gone not in names, f"{gone} reached the client: {r.headers}"
        assert r.header("connection") in (None, "keep-alive")
        assert r.header("x-resp-end") == "kept"
        # Listed in Connection by the backend, but framing headers are never removed.
        assert r.header("content-length") == "4"
        assert c.reusable
        assert c.get("/echo").status == 200


def test_1xx_informational_responses_are_forwarded_to_http11_clients(proxy):
    px, _ = proxy
    with H11Client(px.addr) as c:
        r = c.get("/early")
        assert r.informational == [103]
        assert r.status == 200 and c.reusable


def test_1xx_informational_responses_are_not_sent_to_http10_clients(proxy):
    px, _ = proxy
    with connect(px.addr) as s:
        s.sendall(b"GET /early HTTP/1.0\r\n\r\n")
        r = RawReader(s).read_response()
    assert r.status == 200 and r.informational == []


def test_forwarded_headers_can_be_turned_off(stack):
    b = stack.backend()
    px = stack.poise([b], listener={"forwarded_headers": False})
    with H11Client(px.addr) as c:
        seen = c.get("/echo", [("Host", "h.example"), ("X-Forwarded-For", "203.0.113.7")]).json()
    assert echo_headers(seen, "host") == ["h.example"]
    assert not echo_headers(seen, "x-forwarded-proto")
    assert not echo_headers(seen, "x-forwarded-host")
    assert echo_headers(seen, "x-forwarded-for") in ([], ["203.0.113.7"])
