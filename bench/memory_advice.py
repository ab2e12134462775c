"""What an idle poise connection holds that it need not hold, and what each change would
save, computed from memory_inproc.py's breakdown of the compiled hot path (so that an
item already done shows 0 B, and the figures follow the code).

Each rule picks objects from the exclusive set of one idle connection (by type or by
the attribute that holds them), adds the C memory behind them (libuv's handles, named
by memory_inproc.calibrate), and says how the connection could do without them.  The
list is sorted by bytes saved: the order to work in.
"""

from __future__ import annotations

TIMER_TYPES = ("Deadline", "TimerHandle", "UVTimer")


def _held(part: dict, pred) -> int:
    return sum(e["bytes"] for e in part.get("exclusive", []) if pred(e))


def _c_memory(part: dict, label: str) -> float:
    """Bytes per connection of unnamed allocations the ``label`` probe makes: whole
    ones per connection (a C struct each; a fraction is rather objects of varying size,
    such as bytes, that happen to share a probe's size), a size that several probes
    make shared out evenly between them."""
    return sum(z["size"] * int(z["unnamed_per_conn"] + 0.1) / len(z["c_sources"])
               for z in part.get("sizes", []) if any(label in c for c in z["c_sources"]))


def _with_c(part: dict, pred, label: str) -> int:
    """Objects held (``pred``) and, if there are any, the C memory behind them."""
    held = _held(part, pred)
    return round(held + _c_memory(part, label)) if held else 0


def _timer(e: dict) -> bool:
    return e["type"].rsplit(".", 1)[-1] in TIMER_TYPES or \
        e["via"].startswith(("Deadline.", "TimerHandle"))


def _via(suffix: str):
    return lambda e: e["via"].endswith(suffix)


def _type(name: str):
    return lambda e: e["type"].rsplit(".", 1)[-1] == name


def _uvloop_floor(part: dict) -> int:
    """What any uvloop Protocol pays per connection whatever poise does: the transport,
    libuv's uv_tcp_t, the bound data_received it caches, its write-buffer list and
    Context, and its entry in the loop's transports-by-fd weak dictionary."""
    held = _held(part, lambda e: e["type"].endswith("TCPTransport")
                 or (e["via"] == "TCPTransport" and not e["type"].endswith("PseudoSocket")))
    keyed = sum(t["bytes_per_conn"] for t in part.get("types", [])
                if t["type"] == "weakref.KeyedRef")
    return round(held + _c_memory(part, "TCP transport") + keyed) if held else 0


def advise(inproc: dict) -> list[dict]:
    """``[{"title", "client_bytes", "upstream_bytes", "how"}]``: bytes saved per idle
    client and per idle upstream connection, client savings first, largest first."""
    cl, up = inproc["clients"], inproc["upstreams"]
    empty = [a["name"] for a in cl.get("attributes", [])
             if a["empty"] and a["type"] not in ("bool",)]
    items = [
        ("Create httptools' parser only when a message needs it",
         _with_c(cl, _via(".parser"), "httptools parser"),
         _with_c(up, _via(".parser"), "httptools parser"),
         "An idle connection needs no parser: with the one-call head parser, httptools' "
         "is only needed for what that declines (chunked bodies, upgrades, odd heads), "
         "so create it then (and drop it again at the next message boundary)."),
        ("Create the pipelining queue only when a request is pipelined",
         _held(cl, _via(".queue")), 0,
         "`Downstream.queue` is a `collections.deque` made with every connection: even "
         "empty it is an object and a first block of 64 slots. Only a request pipelined "
         "behind another ever waits there: keep None until then (or a plain list)."),
        ("No loop timer per idle client connection",
         _with_c(cl, _timer, "loop timer"), 0,
         "Going idle arms the Deadline's loop timer for `client_idle_timeout`: the "
         "Deadline and two bound methods, uvloop's TimerHandle and UVTimer, libuv's "
         "`uv_timer_t`, a Context copied per `call_at` and floats. One timer per Site "
         "sweeping its idle connections in idle order (an insertion-ordered dict: a "
         "connection moves to the end when it goes idle, O(1); the sweep stops at the "
         "first one not yet due), as `UpstreamPool.expire` does for pooled connections, "
         "holds nothing per connection; head deadlines may keep a lazily created "
         "Deadline. Smaller steps: `call_at(..., context=one_shared_context)` saves the "
         "Context (64 B) per armed timer, a Deadline calling its owner instead of holding "
         "a bound method saves 72 B."),
        ("Release an idle pooled connection's response timer",
         0, _with_c(up, _timer, "loop timer"),
         "The lazy Deadline leaves the response-header timer armed after the response: "
         "it fires after `response_header_timeout` (30 s by default) and only then lets "
         "go of the TimerHandle, UVTimer, `uv_timer_t` and Context. `UpstreamPool.expire` "
         "already runs every second: let it cancel the timers of connections idle for "
         "over a second, so busy connections keep the cheap lazy re-arming."),
        ("Do not ask uvloop for the socket",
         _held(cl, _type("PseudoSocket")), _held(up, _type("PseudoSocket")),
         "`transport.get_extra_info('socket')` in `connection_made` creates a "
         "PseudoSocket that the transport caches for its whole life, only to set "
         "TCP_NODELAY, which uvloop already sets on every TCP transport "
         "(`TCPTransport.new` → `_set_nodelay`). The peer name, read anyway, tells TCP "
         "from Unix sockets. Saves the object on each client and each upstream connection "
         "(and a system call)."),
        ("Build X-Forwarded-For when forwarding", _held(cl, _via(".forwarded")), 0,
         "`forwarded` (the X-Forwarded-For/-Proto lines) is precomputed per connection; "
         "it is one concatenation of `peer_ip` and the Site's proto line per forwarded "
         "request, or could be shared by the connections of one client address."),
        ("Create MessageBounds only on the httptools path", _held(cl, _via("._bounds")), 0,
         "With the one-call head parser only httptools' path needs message bounds (the "
         "fast path keeps just `http11` there): a slot on the connection for `http11`, "
         "and the bounds made in `_read_slow`."),
        ("Move per-request state out of the connection", 8 * len(empty), 0,
         f"Of the connection's attributes, {len(empty)} hold nothing while it is idle "
         f"({', '.join(f'`{n}`' for n in empty)}); each costs 8 B in every connection. "
         "Those that only live while a request is parsed or served could sit in the "
         "Exchange (or one small per-request object), an upper bound of this estimate."),
        ("Keep no response-header list while idle", 0, _held(up, _via("._fields")),
         "`UpstreamConnection._fields` is an empty list between responses, and the fast "
         "path builds its own: None until httptools' `on_header` needs one."),
        ("Share the client address bytes", _held(cl, _via(".peer_ip")), 0,
         "`peer_ip` is one bytes object per connection; connections from one address "
         "(NAT, a front proxy, this benchmark's 200 sources) could share it through a "
         "small per-Site dict. Saves it for all but the first connection of an address."),
    ]
    out = [{"title": t, "client_bytes": int(c), "upstream_bytes": int(u), "how": how}
           for t, c, u, how in items]
    # Idle clients outnumber pooled upstream connections: their savings first.
    out.sort(key=lambda a: (-a["client_bytes"], -a["upstream_bytes"]))
    return out


def render(advice: list[dict], inproc: dict) -> list[str]:
    cl, up = inproc["clients"], inproc["upstreams"]
    lines = ["## What an idle connection holds that it need not hold", "",
             "Estimated savings per idle connection, from the breakdown above (largest "
             "first; 0 B: not held any more).", ""]
    for i, a in enumerate(advice, 1):
        saved = [f"~{a[k]:,} B per idle {side} connection"
                 for k, side in (("client_bytes", "client"), ("upstream_bytes", "upstream"))
                 if a[k]] or ["0 B (not held any more)"]
        lines.append(f"{i}. **{a['title']}**: {', '.join(saved)}. {a['how']}")
    c_sum = sum(a["client_bytes"] for a in advice)
    u_sum = sum(a["upstream_bytes"] for a in advice)
    lines += ["",
              f"Together about {c_sum:,} B per idle client connection of the "
              f"{cl['bytes_per_conn']:,.0f} B tracemalloc sees (leaving "
              f"~{cl['bytes_per_conn'] - c_sum:,.0f} B), and {u_sum:,} B per idle upstream "
              f"connection of {up['bytes_per_conn']:,.0f} B (leaving "
              f"~{up['bytes_per_conn'] - u_sum:,.0f} B). RSS carries allocator overhead "
              f"on top, so expect it to fall by about as much, not to reach these "
              f"figures.", "",
              f"What stays is mostly uvloop's: ~{_uvloop_floor(cl):,} B per client and "
              f"~{_uvloop_floor(up):,} B per upstream connection (TCPTransport, libuv's "
              f"`uv_tcp_t`, the bound `data_received` and write-buffer list it caches, the "
              f"Context it copies for a connection it opens, its transports-by-fd weak "
              f"dictionary) — the floor of any uvloop Protocol, below which only a "
              f"different I/O layer goes. Then the connection object itself and its entry "
              f"in `Site.connections`.", ""]
    return lines
