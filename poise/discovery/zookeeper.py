"""The ``zookeeper`` source: the children of a znode are the instances.

Each child of ``path`` is one instance; its data is JSON ``{"address": "host:port",
"weight": 1, ...}`` read with :func:`~poise.discovery.base.parse_entry` (the entry's name
in warnings is the child's full path).  Services usually register as ephemeral children
(``poise register zookeeper``), so a crashed service's child goes with its session.

One ZooKeeper session per ``watch()`` (kazoo, the ``[zookeeper]`` extra): a children
watch on ``path`` and a data watch on each child; any of them firing makes the source
read the children again and yield the full set.  A ``path`` that does not exist yields
``[]`` (an empty cluster, as a registry that lists nobody) and is waited for with an
exists-watch.

kazoo runs its own threads; its callbacks only hand events to the event loop
(``call_soon_threadsafe``), and the blocking reads run in the loop's default executor, so
the control plane's loop never blocks.

Failures (the runner keeps the last set and calls ``watch()`` again after a backoff):
the first connection not made within ``timeout``; the connection suspended (server down,
network cut) for longer than ``timeout``; the session expired or closed; any other error
of ZooKeeper (e.g. no read permission).  A suspension shorter than ``timeout`` is ridden
out: the children are read again (and watches set again) once reconnected.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from poise.config.discovery import ZookeeperDiscovery
from poise.discovery.base import Instance, parse_entry

log = logging.getLogger("poise")
# kazoo's own chatter (every reconnection attempt while a server is down): errors only,
# unless configured otherwise (set "poise.kazoo" to DEBUG to see it all); the runner
# logs the source's state changes once each.
kazoo_log = logging.getLogger("poise.kazoo")
if kazoo_log.level == logging.NOTSET:
    kazoo_log.setLevel(logging.ERROR)

_CHANGED = "changed"        # a watch fired: read again


def new_client(hosts: str, timeout: float) -> Any:
    """A kazoo client whose session timeout is ``timeout`` and which, once disconnected,
    tries to reconnect at least every second (kazoo's default backoff grows to an hour,
    far longer than any session outlives a disconnection)."""
    try:
        from kazoo.client import KazooClient
    except ImportError:
        raise RuntimeError("the zookeeper source and registrar need kazoo: "
                           "pip install 'poise[zookeeper]'") from None
    retry = {"max_tries": -1, "delay": 0.1, "backoff": 2, "max_jitter": 0.2,
             "max_delay": min(1.0, timeout / 4)}
    return KazooClient(hosts=hosts, timeout=timeout, connection_retry=retry, logger=kazoo_log)


def close_client(client: Any) -> None:
    """Stop (closing the session) and release a kazoo client; blocking, never raises."""
    try:
        client.stop()
        client.close()
    except Exception as e:      # shutting down anyway: nothing more to do about it
        log.debug("zookeeper: closing the client failed: %s", e)


class ZookeeperSource:
    def __init__(self, spec: ZookeeperDiscovery) -> None:
        self.hosts = spec.hosts
        self.path = "/" + spec.path.strip("/") if spec.path.strip("/") else "/"
        self.timeout = spec.timeout
        self.client: Any = None         # the kazoo client of the running watch, if any
        # child path → (its data version id, the instance read from it): an entry is
        # parsed, and warned about when invalid, only when its data changed.
        self._parsed: dict[str, tuple[int, Instance | None]] = {}

    async def watch(self) -> AsyncIterator[list[Instance]]:
        from kazoo.exceptions import ConnectionLoss, SessionExpiredError
        from kazoo.handlers.threading import KazooTimeoutError
        from kazoo.protocol.states import EventType, KazooState

        loop = asyncio.get_running_loop()
        events: asyncio.Queue[object] = asyncio.Queue()

        def post(item: object) -> None:
            # Called from kazoo's threads; the loop may be closed already at shutdown.
            try:
                loop.call_soon_threadsafe(events.put_nowait, item)
            except RuntimeError:
                pass

        def on_watch(event: Any) -> None:
            # Events of type NONE are kazoo clearing its watches on a disconnection:
            # the state listener tells about that, and the read after reconnecting
            # sets the watches again.
            if event.type != EventType.NONE:
                post(_CHANGED)

        def on_state(state: Any) -> None:
            post(state)

        client = self.client = new_client(self.hosts, self.timeout)
        client.add_listener(on_state)
        try:
            try:
                await loop.run_in_executor(None, client.start, self.timeout)
            except Exception as e:
                raise ConnectionError(f"zookeeper {self.hosts}: cannot connect within "
                                      f"{self.timeout:g}s ({e or type(e).__name__})") from None
            last: list[Instance] | None = None
            dirty = True
            suspended_since: float | None = None
            while True:
                if dirty and suspended_since is None:
                    dirty = False
                    try:
                        instances = await loop.run_in_executor(None, self._read, client,
                                                               on_watch)
                    except (ConnectionLoss, SessionExpiredError):
                        # The state listener's event follows (or is queued already).
                        dirty = True
                        suspended_since = time.monotonic()
                    except KazooTimeoutError:
                        raise ConnectionError(f"zookeeper {self.hosts}: no answer within "
                                              f"{self.timeout:g}s") from None
                    else:
                        if instances != last:
                            last = instances
                            yield instances
                        continue
                if suspended_since is None:
                    item = await events.get()
                else:
                    left = suspended_since + self.timeout - time.monotonic()
                    try:
                        item = await asyncio.wait_for(events.get(), max(left, 0))
                    except TimeoutError:
                        raise ConnectionError(f"zookeeper {self.hosts}: disconnected for "
                                              f"more than {self.timeout:g}s") from None
                if item == _CHANGED:
                    dirty = True
                elif item == KazooState.SUSPENDED:
                    suspended_since = suspended_since or time.monotonic()
                elif item == KazooState.CONNECTED:
                    # Watches do not survive a disconnection in kazoo: read (and set
                    # them) again, whether or not anything changed meanwhile.
                    suspended_since, dirty = None, True
                elif item == KazooState.LOST:
                    raise ConnectionError(f"zookeeper {self.hosts}: session lost")
        finally:
            client.remove_listener(on_state)
            self.client = None
            # Stopping waits for kazoo's threads: not on the event loop.
            await loop.run_in_executor(None, close_client, client)

    def _read(self, client: Any, on_watch: Callable[[Any], None]) -> list[Instance]:
        """The instances under ``path`` now, watches set on it and on every child
        (blocking: runs in an executor thread; each answer awaited at most ``timeout``:
        kazoo holds requests made while disconnected until it reconnects)."""
        from kazoo.exceptions import NoNodeError

        t = self.timeout
        while True:
            # A data (exists) watch on ``path`` as well as the children watch: it is
            # what fires when a missing ``path`` is created, and what the server's
            # ``wchc``/``wchp`` list (they show data watches only).
            if client.exists_async(self.path, watch=on_watch).get(timeout=t) is None:
                self._parsed.clear()
                return []
            try:
                children = client.get_children_async(self.path, watch=on_watch).get(timeout=t)
                break
            except NoNodeError:     # deleted since: watch for it again
                continue
        base = self.path.rstrip("/")
        paths = sorted(f"{base}/{child}" for child in children)
        # Sent together, answered in one round trip.
        pending = [(path, client.get_async(path, watch=on_watch)) for path in paths]
        instances, parsed = [], {}
        for path, result in pending:
            try:
                data, stat = result.get(timeout=t)
            except NoNodeError:         # deleted since listed: its watch fires anyway
                continue
            known = self._parsed.get(path)
            if known is not None and known[0] == stat.mzxid:
                instance = known[1]
            else:
                instance = _parse(data, path)
            parsed[path] = (stat.mzxid, instance)
            if instance is not None:
                instances.append(instance)
        self._parsed = parsed
        return instances


def _parse(data: bytes | None, name: str) -> Instance | None:
    try:
        entry = json.loads(data or b"")
    except ValueError as e:     # (UnicodeDecodeError too)
        log.warning("discovery: skipping invalid entry %s: not JSON (%s)", name, e)
        return None
    return parse_entry(entry, name)
