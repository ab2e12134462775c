"""Registration in ZooKeeper: an ephemeral child of ``path`` that lives as long as a
session kept alive by kazoo's own thread (it pings the server about every ``ttl / 3``).

``start()`` connects, creates ``path`` (and its parents) when missing and the ephemeral
node ``path/node`` (``node`` defaults to the address, e.g. ``127.0.0.1:9001``) with the
JSON ``{"address", "weight"}`` that the zookeeper source reads.  ``stop()`` deletes the
node, then closes the session, before returning.  Killed hard, the process leaves its
node to the server, which deletes it when the session expires: within ``ttl`` (the
session timeout, which the server clamps to its ``minSessionTimeout..maxSessionTimeout``,
2 to 20 ticks: 4 s to 40 s with the default ``tickTime``).

A node of the same name left by a previous session (a crashed incarnation of the same
service, whose session has not expired yet) is replaced; a persistent one is an error.
If the session expires while the process lives (a long network cut), kazoo opens a new
session once the server is reachable again and the node is created again in it.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

from poise.discovery.zookeeper import close_client, new_client

log = logging.getLogger("poise")


class ZookeeperRegistrar:
    """``hosts``: the ZooKeeper servers (``"h1:2181,h2:2181"``); ``path``: the znode whose
    children balancers watch; ``ttl``: the session timeout in seconds (default 10)."""

    def __init__(self, *, address: str, weight: int = 1, ttl: float = 10.0,
                 hosts: str = "127.0.0.1:2181", path: str, node: str | None = None) -> None:
        name = node if node is not None else address
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"invalid znode name {name!r}")
        self.address = address
        self.hosts = hosts
        self.ttl = ttl
        self.node_path = "/" + "/".join(p for p in [*path.split("/"), name] if p)
        self.data = json.dumps({"address": address, "weight": weight}).encode()
        self._client: Any = None
        self._lock = threading.Lock()       # creating vs deleting the node
        self._stopping = False
        self._lost = False

    def start(self) -> None:
        """Connect and create the node; raises (and leaves nothing behind) on failure."""
        client = new_client(self.hosts, self.ttl)
        self._client = client
        client.add_listener(self._on_state)
        try:
            client.start(timeout=max(self.ttl, 5.0))
            self._create()
        except BaseException:
            self._stopping = True
            close_client(client)
            raise
        log.info("zookeeper: registered %s as %s (session 0x%x, timeout %gs)", self.address,
                 self.node_path, client.client_id[0], self.ttl)

    def stop(self) -> None:
        """Delete the node (if it is still this session's), then close the session."""
        client = self._client
        if client is None:
            return
        from kazoo.exceptions import KazooException, NoNodeError

        with self._lock:
            self._stopping = True
            try:
                # Bounded: while disconnected, kazoo would hold the request until it
                # reconnects.  Closing the session removes the node anyway.
                data, stat = client.get_async(self.node_path).get(timeout=self.ttl)
                if stat.ephemeralOwner == client.client_id[0]:
                    client.delete_async(self.node_path, stat.version).get(timeout=self.ttl)
            except NoNodeError:
                pass
            except (KazooException, OSError) as e:
                log.warning("zookeeper: could not delete %s (%s); it goes when the session "
                            "closes or expires", self.node_path, e or type(e).__name__)
        close_client(client)
        self._client = None

    def _create(self) -> None:
        from kazoo.exceptions import NodeExistsError

        client = self._client
        with self._lock:
            if self._stopping:
                return
            try:
                client.create(self.node_path, self.data, ephemeral=True, makepath=True)
                return
            except NodeExistsError:
                pass
            data, stat = client.get(self.node_path)
            if stat.ephemeralOwner == 0:
                raise RuntimeError(f"{self.node_path} exists and is not ephemeral: "
                                   "refusing to replace it")
            if stat.ephemeralOwner == client.client_id[0]:
                if data != self.data:
                    client.set(self.node_path, self.data)
                return
            log.info("zookeeper: replacing %s left by session 0x%x", self.node_path,
                     stat.ephemeralOwner)
            client.delete(self.node_path, stat.version)
            client.create(self.node_path, self.data, ephemeral=True)

    def _on_state(self, state: Any) -> None:
        # kazoo's thread: must not block, so the node is re-created in another thread.
        from kazoo.protocol.states import KazooState

        if state == KazooState.LOST:
            if not self._stopping:
                log.warning("zookeeper: session lost; %s is gone until reconnected",
                            self.node_path)
            self._lost = True
        elif state == KazooState.CONNECTED and self._lost and not self._stopping:
            self._lost = False
            threading.Thread(target=self._recreate, name="poise-zk-register",
                             daemon=True).start()

    def _recreate(self) -> None:
        try:
            self._create()
            log.info("zookeeper: registered %s again as %s", self.address, self.node_path)
        except Exception as e:
            # Nothing else will retry: say it loudly (the process keeps running).
            log.error("zookeeper: could not register %s again: %s", self.node_path, e)
