"""The tcp listener around its relayed connections: active tcp health checks and
backups, an operator's drain, connection limits, the idle timeout, reloads and
SIGTERM (a relayed connection carries on until ``drain_timeout``, then is cut) and
warm connections, over real loopback sockets and a real poise process.

Which backend a connection reached is what a ``hello`` backend says first: its name.
"""

from __future__ import annotations

import copy
import signal
import socket
import time
from collections import Counter

import pytest

from tests.support.control import refuses, snapshot, wait_snapshot
from tests.support.procs import LOOPBACK, free_port, refused_address
from tests.support.tcp import (
    TcpBackend,
    backends,
    closed_within,
    connect,
    connect_errors,
    greeting,
    hello,
    metric,
    read_to_close,
    recv_line,
    round_trip,
    settle_probe,
    still_open,
    tcp,
    wait_metric,
    wait_state,
)
from tests.support.waiting import wait_for

CHECK = {"type": "tcp", "interval": "0.2s", "timeout": "0.2s", "jitter": 0, "rise": 1,
         "fall": 1}


# -- health checks and backups --------------------------------------------------------------

def test_tcp_health_check_takes_a_dead_backend_out_and_back(stack):
    with backends("h1", "h2", handler=hello) as (h1, h2):
        px = stack.poise([h1.address, h2.address], listener=tcp(), admin={},
                         cluster={"health_check": CHECK})
        assert {greeting(px.addr) for _ in range(6)} == {"h1", "h2"}
        h2.stop_listening()
        wait_state(px, h2.address, "down")
        failures = connect_errors(px, h2.address)
        # Taken out: not even tried any more.
        assert {greeting(px.addr) for _ in range(10)} == {"h1"}
        time.sleep(1.1)                     # (a worker's report may lag a second)
        assert connect_errors(px, h2.address) == failures
        back = TcpBackend("h2-again", handler=hello, port=h2.port)
        try:
            wait_state(px, h2.address, "up")
            assert "h2-again" in {greeting(px.addr) for _ in range(6)}
        finally:
            back.stop()


def test_backup_is_used_only_while_every_primary_is_down(stack):
    with backends("p1", "p2", "bk", handler=hello) as (p1, p2, bk):
        members = [{"address": p1.address}, {"address": p2.address},
                   {"address": bk.address, "backup": True}]
        px = stack.poise([], listener=tcp(), admin={}, cluster={
            "backends": members, "health_check": CHECK, "panic_threshold": 0})
        assert Counter(greeting(px.addr) for _ in range(10)) == {"p1": 5, "p2": 5}
        p1.stop_listening()
        wait_state(px, p1.address, "down")
        assert {greeting(px.addr) for _ in range(5)} == {"p2"}
        p2.stop_listening()
        wait_state(px, p2.address, "down")
        assert {greeting(px.addr) for _ in range(5)} == {"bk"}
        again = TcpBackend("p1-again", handler=hello, port=p1.port)
        try:
            wait_state(px, p1.address, "up")
            assert {greeting(px.addr) for _ in range(5)} == {"p1-again"}
        finally:
            again.stop()


def test_no_ready_backend_closes_the_client_as_no_backend(stack):
    with backends("h", handler=hello) as (h,):
        px = stack.poise([h.address], listener=tcp(), admin={},
                         cluster={"health_check": CHECK, "panic_threshold": 0})
        assert greeting(px.addr) == "h"
        h.stop_listening()
        wait_state(px, h.address, "down")
        for _ in range(2):
            with connect(px.addr) as s:
                closed_within(s, 3)
        wait_metric(px, "poise_connections_rejected_total", 2, listener="web",
                    reason="no_backend")
        assert metric(px, "poise_connections_rejected_total", listener="web",
                      reason="connect_failed") == 0


# -- an operator's drain ---------------------------------------------------------------------

def test_drained_backend_gets_no_new_connection_and_keeps_its_open_ones(stack):
    with backends("d1", "d2", handler=hello) as (d1, d2):
        px = stack.poise([d1.address, d2.address], listener=tcp(), admin={})
        held = _one_to_each(px, 2)
        try:
            version = snapshot(px)
            r = px.admin.post(f"/clusters/app/backends/{d2.address}/drain")
            assert (r.status, r.json()["state"]) == (200, "drained"), r
            wait_snapshot(px, version + 1)
            assert {greeting(px.addr) for _ in range(8)} == {"d1"}
            # The relayed connection to the drained backend goes on.
            for _ in range(3):
                assert round_trip(held["d2"], b"still here" * 500) == b"still here" * 500
            assert round_trip(held["d1"], b"d1" * 500) == b"d1" * 500
        finally:
            for s in held.values():
                s.close()


def test_backend_removed_by_a_reload_keeps_its_open_connections(stack):
    with backends("r1", "r2", handler=hello) as (r1, r2):
        px = stack.poise([r1.address, r2.address], listener=tcp(), admin={},
                         drain_timeout="0.5s")
        held = _one_to_each(px, 2)
        try:
            new = copy.deepcopy(px.config)
            new["clusters"][0]["backends"] = [{"address": r1.address}]
            assert px.reload(new).status == 200
            px.wait_workers(config_version=2)
            assert {greeting(px.addr) for _ in range(4)} == {"r1"}
            time.sleep(1.0)                 # (beyond drain_timeout: not cut either)
            assert round_trip(held["r2"], b"r2 lives" * 300) == b"r2 lives" * 300
        finally:
            for s in held.values():
                s.close()


def _one_to_each(px, n: int) -> dict[str, socket.socket]:
    """Held connections, one to each of ``n`` backends (by their greetings)."""
    held = {}
    for _ in range(10 * n):
        s = connect(px.addr)
        name = recv_line(s).decode().strip()
        if name in held:
            s.close()
        else:
            held[name] = s
        if len(held) == n:
            return held
    raise AssertionError(f"connections reached only {sorted(held)}")


# -- limits and timeouts ------------------------------------------------------------------------

def test_max_connections_closes_the_one_over_at_once(stack):
    with backends("b", handler=hello) as (b,):
        px = stack.poise([b.address], listener=tcp(max_connections=1), admin={})
        settle_probe(px, b)
        wait_metric(px, "poise_connections_active", 0, listener="web")
        with connect(px.addr) as first:
            assert recv_line(first) == b"b\n"
            with connect(px.addr) as second:
                closed_within(second, 2)
            assert round_trip(first, b"first" * 100) == b"first" * 100
            assert b.accepted == 1, b.connections
            wait_metric(px, "poise_connections_rejected_total", 1, listener="web",
                        reason="max_connections")
        # Its slot is free again once it closed.
        wait_for(lambda: greeting_or_none(px) == "b", 5, "a connection admitted again")


@pytest.mark.parametrize("cap", ["backend", "cluster"])
def test_connection_caps_skip_a_full_backend_and_close_when_all_are_full(stack, cap):
    with backends("c1", "c2", handler=hello) as (c1, c2):
        if cap == "backend":
            cluster = {"backends": [{"address": c1.address, "max_connections": 1},
                                    {"address": c2.address, "max_connections": 1}]}
        else:
            cluster = {"backends": [{"address": c1.address}, {"address": c2.address}],
                       "max_connections": 2}
        # ip_hash: every connection from here prefers the same backend.
        px = stack.poise([], listener=tcp(), admin={}, drain_timeout="1s",
                         cluster={**cluster, "policy": "ip_hash"})
        settle_probe(px, c1, c2)
        wait_metric(px, "poise_connections_active", 0, listener="web")
        first = connect(px.addr)
        second = connect(px.addr)
        try:
            names = [recv_line(first), recv_line(second)]
            if cap == "backend":        # the preferred one is full: the other one
                assert sorted(names) == [b"c1\n", b"c2\n"], names
            with connect(px.addr) as third:
                closed_within(third, 3)
            assert len(c1.open()) + len(c2.open()) == 2
            wait_metric(px, "poise_connections_rejected_total", 1, listener="web",
                        reason="overflow")
            # One refused client is one overflow, whatever the backends skipped.
            limit = "backend_max_connections" if cap == "backend" else "max_connections"
            wait_metric(px, "poise_overflow_total", 1, cluster="app", limit=limit)
            assert round_trip(first, b"1" * 1000) == b"1" * 1000
            first.close()
            # A slot is free again once the first one is closed.
            wait_for(lambda: greeting_or_none(px) is not None, 5, "a connection relayed again")
        finally:
            first.close()
            second.close()


def greeting_or_none(px) -> str | None:
    with connect(px.addr) as s:
        try:
            return recv_line(s).decode().strip()
        except (EOFError, ConnectionResetError):
            return None


def test_idle_timeout_closes_silent_connections_only(stack):
    # A byte every 0.2 s against a 1 s idle timeout: a pause would have to stretch by
    # 0.8 s for the chatty connection to look idle (with 0.5 s a loaded CI box had 0.3 s).
    with backends("b", handler=hello) as (b,):
        px = stack.poise([b.address], listener=tcp(idle_timeout="1s"))
        with connect(px.addr) as silent, connect(px.addr) as chatty:
            assert recv_line(silent) == recv_line(chatty) == b"b\n"
            start = time.monotonic()
            silent_closed = None
            while time.monotonic() - start < 2.0:       # a byte every 0.2 s
                time.sleep(0.2)
                assert round_trip(chatty, b".") == b"."
                if silent_closed is None and not still_open(silent, 0.01):
                    silent_closed = time.monotonic() - start
            assert round_trip(chatty, b"alive") == b"alive"
            assert silent_closed is not None, "the silent connection is still open"
            assert 0.9 <= silent_closed <= 2.0, silent_closed


def test_idle_timeout_counts_bytes_either_way(stack):
    """A connection where only the backend speaks is not idle either."""
    # 8 bytes 0.2 s apart outlast the 1 s idle timeout; a pause would have to stretch
    # by 0.8 s to reach it (with 0.5 s a loaded CI box had 0.3 s to spare).
    def tick(conn) -> None:
        for _ in range(8):
            conn.sendall(b"t")
            time.sleep(0.2)

    with backends("b", handler=tick) as (b,):
        px = stack.poise([b.address], listener=tcp(idle_timeout="1s"))
        settle_probe(px, b, timeout=5)
        with connect(px.addr) as s:
            assert read_to_close(s, 5) == b"t" * 8
        assert b.connections[0].error is None


def test_reload_changing_idle_timeout_applies_to_open_connections(stack):
    with backends("b", handler=hello) as (b,):
        px = stack.poise([b.address], listener=tcp(idle_timeout="3s"), admin={})
        with connect(px.addr) as s:
            assert recv_line(s) == b"b\n"
            new = copy.deepcopy(px.config)
            new["listeners"][0]["idle_timeout"] = "0.3s"
            assert px.reload(new).status == 200
            px.wait_workers(config_version=2)
            # Closed by its next check (every 0.75 s with 3 s), well before 3 s idle.
            closed_within(s, 1.6)


# -- reloads and shutdown ----------------------------------------------------------------------

def _removed(config: dict) -> dict:
    """The tcp listener replaced by one on another port."""
    out = copy.deepcopy(config)
    out["listeners"][0].update(name="moved", bind=f"{LOOPBACK}:{free_port()}")
    return out


def _made_http(config: dict) -> dict:
    """The same address now an http listener (rebound: another protocol)."""
    out = copy.deepcopy(config)
    out["listeners"][0]["protocol"] = "http"
    out["listeners"][0]["routes"] = [{"cluster": "gone"}]
    out["clusters"].append({"name": "gone", "backends": [{"address": refused_address()}]})
    return out


@pytest.mark.parametrize("change", [_removed, _made_http], ids=["removed", "protocol"])
def test_reload_replacing_the_listener_drains_relayed_connections(stack, change):
    with backends("b", handler=hello) as (b,):
        px = stack.poise([b.address], listener=tcp(), admin={}, drain_timeout="2s")
        with connect(px.addr) as s:
            assert recv_line(s) == b"b\n"
            new = change(px.config)
            # (Taken before asking: the drain may start before the answer comes back,
            # which a loaded CI box may take a while to read.)
            reloaded = time.monotonic()
            r = px.reload(new)
            assert (r.status, r.json()) == (200, {"applied": True, "version": 2}), r
            px.wait_workers(config_version=2)
            if change is _removed:
                wait_for(lambda: refuses(px.addr), 2, "the removed listener refusing")
                with connect((LOOPBACK, int(new["listeners"][0]["bind"].split(":")[1]))) as n:
                    assert recv_line(n) == b"b\n"
            else:
                with connect(px.addr) as n:      # new connections: the new protocol
                    n.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                    assert n.recv(100).startswith(b"HTTP/1.1 50")
            # The old connection carries on during drain_timeout ...
            while time.monotonic() - reloaded < 1.2:
                assert round_trip(s, b"during" * 100) == b"during" * 100
                time.sleep(0.1)
            # ... and is cut once it has passed.
            read_to_close(s, 4)
            assert time.monotonic() - reloaded >= 1.5


def test_reload_keeping_the_listener_keeps_its_connections(stack):
    with backends("b", "o", handler=hello) as (b, o):
        px = stack.poise([b.address], listener=tcp(), admin={}, drain_timeout="1s",
                         extra_clusters=[{"name": "other", "backends": [{"address": o.address}]}])
        with connect(px.addr) as s:
            assert recv_line(s) == b"b\n"
            new = copy.deepcopy(px.config)
            new["listeners"][0]["routes"] = [{"cluster": "other"}]
            new["listeners"][0]["idle_timeout"] = "30s"
            r = px.reload(new)
            assert (r.status, r.json()) == (200, {"applied": True, "version": 2}), r
            px.wait_workers(config_version=2)
            assert {greeting(px.addr) for _ in range(3)} == {"o"}
            time.sleep(1.5)                 # beyond drain_timeout: nothing to drain
            assert round_trip(s, b"kept" * 1000) == b"kept" * 1000
            assert still_open(s, 0.1)


def test_sigterm_lets_a_relayed_connection_run_until_drain_timeout(stack):
    with backends("b", handler=hello) as (b,):
        px = stack.poise([b.address], listener=tcp(), drain_timeout="1.5s")
        with connect(px.addr) as s:
            assert recv_line(s) == b"b\n"
            px.signal(signal.SIGTERM)
            stopped = time.monotonic()
            wait_for(lambda: refuses(px.addr), 2, "no new connections once stopping")
            while time.monotonic() - stopped < 1.0:
                assert round_trip(s, b"draining" * 100) == b"draining" * 100
                time.sleep(0.1)
            read_to_close(s, 5)
            assert time.monotonic() - stopped >= 1.2
        assert px.proc.wait(10) == 0
        b.wait_idle()


def test_sigterm_with_nothing_open_exits_at_once(stack):
    with backends("b", handler=hello) as (b,):
        px = stack.poise([b.address], listener=tcp(), drain_timeout="30s")
        assert greeting(px.addr) == "b"
        b.wait_idle()
        px.signal(signal.SIGTERM)
        assert px.proc.wait(10) == 0


# -- warm connections -------------------------------------------------------------------------

def test_warm_connections_are_opened_ahead_and_replaced(stack):
    with backends("w", handler=hello) as (w,):
        px = stack.poise([w.address], listener=tcp(), admin={},
                         cluster={"warm_connections": 2})
        # (poise's start-up check took the first connection: a spare or its own.)
        wait_for(lambda: w.accepted >= 1 and w.connections[0].closed.is_set(), 5,
                 "the start-up check done")
        wait_for(lambda: len(w.open()) == 2, 5, "two spares opened")
        spares = w.open()
        assert all(c.count == 0 for c in spares)
        wait_metric(px, "poise_upstream_connections_active", 2, backend=w.address)
        opened = w.accepted
        with connect(px.addr) as s:
            assert recv_line(s) == b"w\n"       # the greeting waited in the spare
            assert round_trip(s, b"mine" * 10) == b"mine" * 10
            (used,) = [c for c in w.connections if c.count]
            assert used in spares
            # A replacement, and nothing else: the client connected to no one.
            wait_for(lambda: len(w.open()) == 3, 5, "a replacement spare")
            assert w.accepted == opened + 1

        # Spares the backend closes are never handed out.
        spares = [c for c in w.open() if c.count == 0]
        assert len(spares) == 2
        for c in spares:
            c.sock.shutdown(socket.SHUT_RDWR)
        for c in spares:
            assert c.closed.wait(5)
        for _ in range(3):
            with connect(px.addr) as s:
                assert recv_line(s) == b"w\n"
                assert round_trip(s, b"fresh" * 100) == b"fresh" * 100
        wait_for(lambda: len(w.open()) == 2, 5, "two spares again")


def test_warm_connections_skipped_when_refused_does_not_break_clients(stack):
    with backends("w", handler=hello) as (w,):
        dead = refused_address()
        px = stack.poise([dead, w.address], listener=tcp(), admin={},
                         cluster={"warm_connections": 1})
        wait_for(lambda: len(w.open()) == 1, 5, "a spare at the live backend")
        assert {greeting(px.addr) for _ in range(6)} == {"w"}
        wait_metric(px, "poise_connections_total", 1 + 6, listener="web")
        assert metric(px, "poise_connections_rejected_total", listener="web") == 0


def test_spares_of_a_drained_backend_are_closed(stack):
    with backends("w1", "w2", handler=hello) as (w1, w2):
        px = stack.poise([w1.address, w2.address], listener=tcp(), admin={},
                         cluster={"warm_connections": 1})
        wait_for(lambda: len(w1.open()) == 1 and len(w2.open()) == 1, 5, "a spare each")
        r = px.admin.post(f"/clusters/app/backends/{w2.address}/drain")
        assert r.status == 200, r
        wait_for(lambda: not w2.open(), 3, "w2's spare closed")
        assert {greeting(px.addr) for _ in range(4)} == {"w1"}
        assert not w2.open() and all(c.count == 0 for c in w2.connections)
