"""How bench/memory_inproc.py breaks poise's memory down by object: a census of objects
by type, tracemalloc's growth by site and allocation size, the C allocations behind
uvloop's and httptools' objects (found by calibration probes), and the objects one
connection holds exclusively.  Helpers with no poise in them: they look at whatever
the process holds.
"""

from __future__ import annotations

import asyncio
import gc
import linecache
import socket
import sys
import tracemalloc
import types
from collections import Counter, deque

import httptools

# Never part of one connection (a builtin function bound to an object, such as a
# compiled method's bound form, may be: see _shared).
_SKIP = (type, bool, types.ModuleType, types.FunctionType, types.CodeType,
         types.MethodDescriptorType, types.WrapperDescriptorType)


def _shared(obj: object) -> bool:
    """True for what no connection owns: singletons, types, modules, functions,
    builtins, and objects with over 100 references (interned strings, small ints)."""
    if obj is None or isinstance(obj, _SKIP):
        return True
    if isinstance(obj, types.BuiltinFunctionType):
        owner = obj.__self__
        return owner is None or isinstance(owner, types.ModuleType)
    return sys.getrefcount(obj) > 100


def type_name(obj: object) -> str:
    t = type(obj)
    mod = t.__module__
    return t.__qualname__ if mod == "builtins" else f"{mod}.{t.__qualname__}"


def census() -> Counter:
    """``{(type, "count"|"bytes"): n}`` over gc objects and the objects they refer to
    directly that gc does not track (bytes, str, int, float), by ``sys.getsizeof``."""
    gc.collect()
    objs = gc.get_objects()
    seen = {id(o) for o in objs}
    out: Counter = Counter()
    extra = []
    for o in objs:
        for r in gc.get_referents(o):
            if id(r) not in seen and not gc.is_tracked(r):
                seen.add(id(r))
                extra.append(r)
    for o in objs + extra:
        name = type_name(o)
        out[name, "count"] += 1
        out[name, "bytes"] += sys.getsizeof(o)
    return out


def census_growth(before: Counter, after: Counter, n: int) -> tuple[list[dict], dict]:
    """Types that grew by at least one object per 4 connections (or 4 bytes per
    connection), per connection, largest first; and ``{instance size: [(type, objects
    per connection)]}`` for naming allocation sizes."""
    rows = []
    size_of: dict[int, list] = {}
    for name in {k[0] for k in after}:
        count = after[name, "count"] - before[name, "count"]
        size = after[name, "bytes"] - before[name, "bytes"]
        if count * 4 >= n or size >= 4 * n:
            rows.append({"type": name, "per_conn": round(count / n, 2),
                         "bytes_per_conn": round(size / n, 1)})
            if count > 0:      # (the usual instance size: a type of varying size misses)
                size_of.setdefault(round(size / count), []).append((name, count / n))
    return sorted(rows, key=lambda r: -r["bytes_per_conn"]), size_of


def name_sizes(sizes: list[dict], size_of: dict, c_names: dict) -> None:
    """Name each allocation size by the types whose instances have it; what is left
    (``unnamed_per_conn``) was allocated by C code behind some object: ``c_sources``
    says which of the calibrated objects (see calibrate) allocate that size."""
    for row in sizes:
        named = size_of.get(row["size"], [])
        row["types"] = [name for name, _ in named]
        row["unnamed_per_conn"] = round(max(0.0, row["per_conn"] - sum(c for _, c in named)), 2)
        row["c_sources"] = c_names.get(row["size"], []) if row["unnamed_per_conn"] else []


def _site(frame: tracemalloc.Frame) -> str:
    """``frame`` as "path:line", the path from poise/, bench/ or the stdlib on."""
    path = frame.filename
    for marker in ("/poise/", "/bench/", "/site-packages/", "/lib/python3"):
        if marker in path:
            path = path[path.index(marker) + 1:]
            break
    return f"{path}:{frame.lineno}"


def _code(frame: tracemalloc.Frame) -> str:
    """The source line of ``frame``.  Allocations made with no Python frame of their
    own (uvloop's, other C code's) show at the event loop's call in this file."""
    if frame.filename.endswith("memory_inproc.py"):
        return "(the event loop: uvloop's and other C code's own allocations)"
    return linecache.getline(frame.filename, frame.lineno).strip()


def _aggregate(snap: tracemalloc.Snapshot) -> tuple[Counter, Counter]:
    """Bytes by (innermost frame, innermost poise frame), and allocations by size."""
    by_site: Counter = Counter()
    by_size: Counter = Counter()
    for trace in snap.traces:
        tb = trace.traceback     # (oldest call first: the allocation is at tb[-1])
        ours = next((_site(f) for f in reversed(tb) if "/poise/" in f.filename), "-")
        by_site[tb[-1], ours] += trace.size
        by_size[trace.size] += 1
    return by_site, by_size


def traced_growth(snap0, snap1, n: int) -> dict:
    """tracemalloc's growth per connection: total, top sites and allocation sizes."""
    site0, size0 = _aggregate(snap0)
    site1, size1 = _aggregate(snap1)
    total = sum(t.size for t in snap1.traces) - sum(t.size for t in snap0.traces)
    sites = sorted(((k, site1[k] - site0[k]) for k in set(site1) | set(site0)),
                   key=lambda kv: -kv[1])
    sizes = sorted(((s, size1[s] - size0[s]) for s in set(size1) | set(size0)),
                   key=lambda kv: -kv[0] * kv[1])
    return {
        "bytes_per_conn": round(total / n, 1),
        "sites": [{"site": _site(k[0]), "via": k[1], "code": _code(k[0]),
                   "bytes_per_conn": round(v / n, 1)}
                  for k, v in sites[:15] if v > 0],
        "sizes": [{"size": s, "per_conn": round(c / n, 2),
                   "bytes_per_conn": round(s * c / n, 1)}
                  for s, c in sizes[:20] if c * 4 >= n],
    }


def _attrs(obj: object) -> dict[str, object]:
    """``obj``'s instance attributes (slots, mypyc attributes) that are set."""
    out = {}
    for cls in reversed(type(obj).__mro__):
        for name, member in vars(cls).items():
            if isinstance(member, types.GetSetDescriptorType | types.MemberDescriptorType) \
                    and not name.startswith("__"):
                try:
                    out[name] = getattr(obj, name)
                except AttributeError:
                    pass
    return out


def _attr_name(parent: object, child: object) -> str:
    """The attribute of ``parent`` that is ``child``, or ""."""
    return next((name for name, v in _attrs(parent).items() if v is child), "")


def attributes(obj: object) -> list[dict]:
    """Each attribute of ``obj``: its type, and whether it holds nothing (None, 0,
    False, empty) — a slot an idle connection pays 8 bytes for, for nothing."""
    return [{"name": name, "type": type_name(v),
             "empty": v is None or (isinstance(v, int | float | bytes | str | tuple | list)
                                    and not v)}
            for name, v in _attrs(obj).items()]


def _registry(obj: object) -> bool:
    """A set or dict of every connection's objects (the loop's timers, uvloop's
    transports by fd): holding one entry each, it does not make them shared."""
    return isinstance(obj, set | dict) and len(obj) >= 100


def exclusive(root: object, shared: list) -> list[dict]:
    """The objects ``root`` holds exclusively, each with ``sys.getsizeof`` and where
    it hangs (``via``: parent type and attribute): reachable from ``root`` (not
    through the ``shared`` objects, types, modules, functions or objects with over
    100 references) and referred to only by such objects or by registries (see
    _registry) — what would go away with it.  Found as a fixpoint: they refer to each
    other in cycles (a Deadline and its timer's callback)."""
    stop = {id(o) for o in shared}
    cand = {id(root): root}
    parent = {id(root): None}
    frontier = [root]
    while frontier and len(cand) < 5000:
        nxt = []
        for obj in frontier:
            for ref in gc.get_referents(obj):
                if id(ref) in cand or id(ref) in stop or _shared(ref):
                    continue
                cand[id(ref)] = ref
                parent[id(ref)] = obj
                nxt.append(ref)
        frontier = nxt
    del frontier, nxt
    objs = list(cand.values())
    mine = {id(cand), id(objs), id(parent)}
    referrers = {id(o): {id(r) for r in gc.get_referrers(o)
                         if id(r) not in mine and not _registry(r)}
                 for o in objs if o is not root}
    keep = set(cand)
    changed = True
    while changed:
        changed = False
        for key, refs in referrers.items():
            if key in keep and not refs <= keep:
                keep.discard(key)
                changed = True
    out = []
    for o in objs:
        if id(o) in keep:
            p = parent[id(o)]
            via = "" if p is None else (type(p).__name__ + "." + _attr_name(p, o)).rstrip(".")
            out.append({"type": type_name(o), "bytes": sys.getsizeof(o), "via": via})
    return out


# ---------------------------------------------------------------- naming C memory

PROBES = 32


async def _probe_sizes(make) -> set[int]:
    """Allocation sizes made at least once per object by ``await make(PROBES)``."""
    tracemalloc.start()
    snap0 = tracemalloc.take_snapshot()
    kept = await make(PROBES)
    snap1 = tracemalloc.take_snapshot()
    tracemalloc.stop()
    count = Counter(t.size for t in snap1.traces)
    count.subtract(t.size for t in snap0.traces)
    for obj in kept:
        obj = obj[0] if isinstance(obj, tuple) else obj     # (transport, protocol)
        if hasattr(obj, "cancel"):      # (a timer)
            obj.cancel()
        elif hasattr(obj, "close"):     # (a transport)
            obj.close()
    return {size for size, n in count.items() if n >= PROBES}


async def calibrate(loop) -> dict[int, list[str]]:
    """``{size: [what allocates it]}`` for the objects an idle connection has in C as
    well as Python (libuv's handles behind uvloop's objects, a deque's block), found by
    making PROBES of each under tracemalloc: names for the sizes the census cannot
    name."""
    async def deques(n):
        return [deque() for _ in range(n)]

    async def timers(n):
        return [loop.call_later(3600, int) for _ in range(n)]

    srv = socket.create_server(("127.0.0.1", 0))
    pairs = []
    for _ in range(PROBES):
        c = socket.create_connection(srv.getsockname())
        pairs.append((c, srv.accept()[0]))

    async def transports(n):
        return [await loop.connect_accepted_socket(asyncio.Protocol, a) for _, a in pairs[:n]]

    protocol = object()     # (no callbacks: the parser only looks them up)

    async def parsers(n):
        return [httptools.HttpRequestParser(protocol) for _ in range(n)]

    names: dict[int, list[str]] = {}
    for label, make in (("a deque (object + first 64-slot block)", deques),
                        ("an httptools parser (its object, llhttp's state and settings)",
                         parsers),
                        ("a loop timer (TimerHandle, UVTimer, libuv uv_timer_t)", timers),
                        ("a uvloop TCP transport (TCPTransport, libuv uv_tcp_t)",
                         transports)):
        for size in await _probe_sizes(make):
            names.setdefault(size, []).append(label)
    for c, a in pairs:
        c.close()
        a.close()
    srv.close()
    return names
