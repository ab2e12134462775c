"""The ``consul`` source: a service's instances from Consul's health endpoint, followed
with blocking queries.

A ``watch()`` call asks the agent at ``address`` (``http://host:port`` or
``https://host:port``; default port 8500) for
``/v1/health/service/{service}?passing=true&index=N&wait=30s`` in a loop:

* the first query has no ``index`` and answers at once; each answer carries the
  ``X-Consul-Index`` of the result, sent back as ``index`` by the next query, which Consul
  then holds until the result changes or ``wait`` passes (plus up to ``wait/16`` of
  jitter, Consul's own);
* the full set is yielded after the first answer and after every answer whose index
  differs from the previous one (an answer at the same index is a timeout or an
  idempotent write: nothing to tell);
* an index lower than the previous one (a snapshot restore, a new cluster) resets it to 0,
  as Consul's blocking-query documentation asks, so the next query re-reads the result
  without blocking; an index below 1 is sent as 1 (0 would never block);
* queries start at least ``MIN_INTERVAL`` apart, so that a server answering at once every
  time does not spin the control plane.

``passing`` (default true) asks Consul for instances whose checks all pass.  Each entry
becomes an instance at ``Service.Address`` (``Node.Address`` when empty) and
``Service.Port``, weighted by ``Service.Weights.Passing`` (default 1), in zone
``Service.Meta.zone`` when set, with metadata ``{"id", "node", "tags", "meta"}``.  An
invalid entry is skipped with a warning naming ``service/ID``.  With ``token``, requests
carry it as ``X-Consul-Token``.

It raises (and the runner calls ``watch()`` again, which starts from index 0) when the
agent cannot be reached, times out, answers with an error status (403 for a bad token),
or answers something that is not Consul's JSON.

No client library: a few HTTP/1.1 GETs over asyncio streams, one connection per query
(``Connection: close``), so nothing blocks the control plane's event loop.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import quote, urlsplit

from poise.config.discovery import ConsulDiscovery
from poise.discovery.base import Instance, log, parse_entry

CONNECT_TIMEOUT = 5.0   # seconds to connect and to get an answer beyond the query's wait
MIN_INTERVAL = 0.05     # seconds between the starts of two queries
MAX_BODY = 64 * 1024 * 1024


class ConsulError(Exception):
    """Consul answered with an error status (``status``), or something that is not its
    protocol (``status`` None)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def parse_agent(address: str) -> tuple[str, int, bool]:
    """``(host, port, tls)`` of a Consul agent URL (``http://`` assumed when no scheme)."""
    parts = urlsplit(address if "://" in address else f"http://{address}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not a Consul agent URL: {address!r}")
    return parts.hostname, parts.port or 8500, parts.scheme == "https"


def go_duration(seconds: float) -> str:
    """A duration as Consul reads it (Go's syntax): ``30s``, or ``1500ms``."""
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{max(1, round(seconds * 1000))}ms"


async def get(host: str, port: int, tls: bool, target: str,
              headers: Mapping[str, str]) -> tuple[int, dict[str, str], bytes]:
    """One ``GET target`` over a fresh connection: ``(status, headers, body)`` (header
    names in lower case).  The caller bounds the time."""
    reader, writer = await asyncio.open_connection(
        host, port, ssl=ssl.create_default_context() if tls else None)
    try:
        hostname = f"[{host}]" if ":" in host else host
        head = [f"GET {target} HTTP/1.1", f"Host: {hostname}:{port}",
                "Accept: application/json", "Connection: close"]
        head += [f"{name}: {value}" for name, value in headers.items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        status_line = await reader.readline()
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            if not status_line:
                raise ConnectionError("the agent closed the connection without answering")
            raise ConsulError(f"not an HTTP response: {status_line[:80]!r}")
        answer: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            answer[name.strip().lower()] = value.strip()
        return int(parts[1]), answer, await _body(reader, answer)
    finally:
        writer.close()


async def _body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    try:
        if "chunked" in headers.get("transfer-encoding", "").lower():
            pieces, size_total = [], 0
            while size := int((await reader.readline()).split(b";", 1)[0].strip() or b"x",
                              16):
                size_total += size
                if size_total > MAX_BODY:
                    raise ConsulError("the answer is too large")
                pieces.append(await reader.readexactly(size))
                await reader.readexactly(2)     # the chunk's CRLF
            return b"".join(pieces)
        if "content-length" in headers:
            length = int(headers["content-length"])
            if length > MAX_BODY:
                raise ConsulError("the answer is too large")
            return await reader.readexactly(length)
        return await reader.read(MAX_BODY)
    except asyncio.IncompleteReadError:
        raise ConnectionError("the agent closed the connection mid-answer") from None
    except ValueError:      # (a chunk size that is not hexadecimal)
        raise ConsulError("a malformed chunked answer") from None


class ConsulSource:
    """Follows ``spec.service``'s instances (see the module's docstring)."""

    def __init__(self, spec: ConsulDiscovery) -> None:
        self.host, self.port, self.tls = parse_agent(spec.address)
        self.address = spec.address
        self.service = spec.service
        self.passing = spec.passing
        self.wait = spec.wait
        self.headers = {"X-Consul-Token": spec.token} if spec.token else {}

    async def query(self, index: int) -> tuple[int, list[Any]]:
        """One health query (blocking when ``index`` > 0): ``(X-Consul-Index, entries)``."""
        target = f"/v1/health/service/{quote(self.service, safe='')}"
        params = ["passing=true"] if self.passing else []
        if index > 0:
            params += [f"index={index}", f"wait={go_duration(self.wait)}"]
        if params:
            target += "?" + "&".join(params)
        # Consul may hold a query for wait + wait/16.
        limit = CONNECT_TIMEOUT + (self.wait * 17 / 16 if index > 0 else 0)
        try:
            async with asyncio.timeout(limit):
                status, headers, body = await get(self.host, self.port, self.tls, target,
                                                  self.headers)
        except TimeoutError:
            raise ConnectionError(f"{self.address}: no answer within {limit:.0f}s") from None
        except OSError as e:
            raise ConnectionError(f"{self.address}: {e}") from None
        if status != 200:
            text = body[:200].decode("utf-8", "replace").strip()
            raise ConsulError(f"{self.address}{target.split('?')[0]} answered {status}"
                              + (f": {text}" if text else ""), status)
        try:
            new_index = int(headers["x-consul-index"])
        except (KeyError, ValueError):
            raise ConsulError(f"{self.address}: no X-Consul-Index in the answer") from None
        try:
            entries = json.loads(body)
        except ValueError:
            raise ConsulError(f"{self.address}: not JSON: {body[:200]!r}") from None
        if not isinstance(entries, list):
            raise ConsulError(f"{self.address}: expected a list, got {body[:200]!r}")
        return new_index, entries

    async def watch(self) -> AsyncIterator[list[Instance]]:
        index = 0
        last: int | None = None     # the index of the last set yielded
        loop = asyncio.get_running_loop()
        started = 0.0
        while True:
            pause = started + MIN_INTERVAL - loop.time()
            if pause > 0:
                await asyncio.sleep(pause)
            started = loop.time()
            new_index, entries = await self.query(index)
            if new_index != last:
                last = new_index
                yield self.instances(entries)
            if new_index < index:
                index = 0       # gone backwards: re-read without blocking
            else:
                index = max(1, new_index)

    def instances(self, entries: list[Any]) -> list[Instance]:
        """The valid instances of a health answer, sorted (an unchanged set compares
        equal whatever order Consul lists it in)."""
        found: list[tuple[str, Instance]] = []
        for entry in entries:
            item = self._entry(entry)
            if item is not None:
                found.append(item)
        found.sort(key=lambda item: (item[1].address, item[0]))
        return [instance for _, instance in found]

    def _entry(self, entry: Any) -> tuple[str, Instance] | None:
        service = entry.get("Service") if isinstance(entry, Mapping) else None
        node = entry.get("Node") if isinstance(entry, Mapping) else None
        if not isinstance(service, Mapping):
            parse_entry(None, f"{self.service}/?")     # (warns: not a mapping)
            return None
        node = node if isinstance(node, Mapping) else {}
        service_id = str(service.get("ID") or "?")
        name = f"{self.service}/{service_id}"
        host = service.get("Address") or node.get("Address")
        port = service.get("Port")
        if not isinstance(host, str) or not host or isinstance(port, bool) \
                or not isinstance(port, int) or not 0 < port < 65536:
            # (Consul lists a service registered without a port with port 0)
            log.warning("discovery: skipping invalid entry %s: no address or port", name)
            return None
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        weights = service.get("Weights") if isinstance(service.get("Weights"), Mapping) \
            else {}
        meta = service.get("Meta") if isinstance(service.get("Meta"), Mapping) else {}
        data = {"address": f"{host}:{port}", "weight": weights.get("Passing", 1),
                "zone": meta.get("zone"),
                "metadata": {"id": service_id, "node": node.get("Node"),
                             "tags": list(service.get("Tags") or []), "meta": dict(meta)}}
        instance = parse_entry(data, name)
        return None if instance is None else (service_id, instance)
