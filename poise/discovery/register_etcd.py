"""Registration in etcd: a key bound to a lease, kept alive by a heartbeat thread.

:meth:`EtcdRegistrar.start` grants a lease of ``ttl`` seconds (whole seconds, at least 1;
etcd may raise a very short TTL to its minimum), puts ``key`` (default: ``prefix +
address``) with the value ``{"address": ..., "weight": ...}`` bound to it, and starts a
daemon thread that renews the lease every third of its TTL.  :meth:`stop` stops the
thread and revokes the lease, which deletes the key, before returning.  When the process
dies without stopping, nobody renews the lease and etcd deletes the key within the TTL.

The heartbeat thread rides out etcd's absences: a failed renewal is logged (once per
change of state) and tried again at the next beat; a lease that expired meanwhile (etcd
was away longer than the TTL) is granted again and the key put again.  Endpoints are tried
in order on connection failures.  With ``username``/``password``, requests carry a token,
fetched again when etcd says it is invalid (expired, or issued by another member).

The thread uses blocking :mod:`http.client` (one short request per beat): it never runs
on an event loop.
"""

from __future__ import annotations

import http.client
import json
import logging
import ssl
from typing import Any

from poise.discovery.etcd import INVALID_TOKEN, Endpoint, EtcdError, b64, rotation
from poise.discovery.heartbeat import Heartbeats

log = logging.getLogger("poise")


class EtcdRegistrar(Heartbeats):
    def __init__(self, *, address: str, weight: int = 1, ttl: float = 10.0,
                 endpoints: list[str] | tuple[str, ...] = ("http://127.0.0.1:2379",),
                 prefix: str, key: str | None = None, username: str | None = None,
                 password: str | None = None, timeout: float = 5.0) -> None:
        if ttl <= 0:
            raise ValueError("ttl must be positive")
        self.address = address
        self.weight = weight
        self.ttl = max(1, int(ttl))     # (rounded down: the entry never outlives `ttl`)
        self.endpoints = [Endpoint.parse(url) for url in endpoints]
        if not self.endpoints:
            raise ValueError("no etcd endpoint")
        self.key = key if key is not None else prefix + address
        self.value = json.dumps({"address": address, "weight": weight})
        self.username, self.password = username, password
        self.timeout = timeout
        self.lease: int | None = None
        self.interval = self.ttl / 3
        self._token: str | None = None
        self._first = 0
        self.kind, self.label = "etcd", self.key
        super().__init__()

    # -- the contract ----------------------------------------------------------------

    def stop(self) -> None:
        """Stop the heartbeats and revoke the lease (deleting the key) before returning.
        When etcd cannot be reached, a warning says so: the key then goes when the lease
        expires."""
        self.abandon()
        if self.lease is None:
            return
        lease, self.lease = self.lease, None
        try:
            self._call("/v3/lease/revoke", {"ID": str(lease)})
        except EtcdError as e:
            if "lease not found" not in str(e):     # (expired already: the key is gone)
                log.warning("etcd: could not revoke the lease of %s (%s); it expires "
                            "within %ss", self.key, e, self.ttl)
        except OSError as e:
            log.warning("etcd: could not revoke the lease of %s (%s); it expires within "
                        "%ss", self.key, e, self.ttl)

    # -- inside ----------------------------------------------------------------------

    def _register(self) -> None:
        granted = self._call("/v3/lease/grant", {"TTL": str(self.ttl)})
        self.lease = int(granted["ID"])
        # etcd may have raised the TTL to its minimum: beat at a third of the real one.
        self.interval = max(0.2, int(granted.get("TTL") or self.ttl) / 3)
        self._call("/v3/kv/put", {"key": b64(self.key.encode()),
                                  "value": b64(self.value.encode()),
                                  "lease": str(self.lease)})

    def _heartbeat(self) -> None:
        answer = self._call("/v3/lease/keepalive", {"ID": str(self.lease)})
        # No TTL: the lease expired (etcd was away longer than the TTL).
        if int((answer.get("result") or {}).get("TTL") or 0) <= 0:
            log.warning("etcd: the lease of %s had expired; registering again", self.key)
            self._register()

    def _call(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        """One request, endpoints tried in order on connection failures (starting with
        the last one that answered), authenticating first when credentials are set."""
        error: Exception | None = None
        for index in rotation(self._first, len(self.endpoints)):
            endpoint = self.endpoints[index]
            try:
                answer = self._on(endpoint, path, payload, index)
            except OSError as e:
                error = ConnectionError(f"{endpoint.url}: {e}")
                self._token = None      # (a simple token is valid on its member only)
                continue
            self._first = index
            return answer
        assert error is not None
        raise error

    def _on(self, endpoint: Endpoint, path: str, payload: dict[str, Any],
            index: int) -> dict[str, Any]:
        if self.username is not None and (self._token is None or index != self._first):
            self._token = self._post(endpoint, "/v3/auth/authenticate",
                                     {"name": self.username,
                                      "password": self.password or ""})["token"]
        try:
            return self._post(endpoint, path, payload, self._token)
        except EtcdError as e:
            if self.username is None or INVALID_TOKEN not in str(e):
                raise
        # The token expired: fetch another and try once more.
        self._token = self._post(endpoint, "/v3/auth/authenticate",
                                 {"name": self.username, "password": self.password or ""}
                                 )["token"]
        return self._post(endpoint, path, payload, self._token)

    def _post(self, endpoint: Endpoint, path: str, payload: dict[str, Any],
              token: str | None = None) -> dict[str, Any]:
        if endpoint.tls:
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                endpoint.host, endpoint.port, timeout=self.timeout,
                context=ssl.create_default_context())
        else:
            conn = http.client.HTTPConnection(endpoint.host, endpoint.port,
                                              timeout=self.timeout)
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = token
        try:
            conn.request("POST", path, json.dumps(payload), headers)
            response = conn.getresponse()
            raw = response.read()
        finally:
            conn.close()
        # Streaming calls (keepalive) answer one JSON message per line: the first is ours.
        line = raw.split(b"\n", 1)[0]
        try:
            answer = json.loads(line)
        except ValueError:
            raise EtcdError(f"{endpoint.url}{path} answered {response.status} with "
                            f"non-JSON: {raw[:200]!r}") from None
        if not isinstance(answer, dict):
            raise EtcdError(f"{endpoint.url}{path}: unexpected answer {raw[:200]!r}")
        error = answer.get("error")
        if isinstance(error, dict):
            error = error.get("message") or error
        if error is not None or response.status != 200:
            raise EtcdError(f"{endpoint.url}{path}: {error or response.status}")
        return answer
