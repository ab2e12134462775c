"""Registration in Consul: a service instance with a TTL check, passed by a heartbeat
thread.

:meth:`ConsulRegistrar.start` registers, with the local agent at ``consul``
(``PUT /v1/agent/service/register``), the instance ``service_id`` (default
``SERVICE-HOST-PORT``) of ``service`` at ``address`` (``host:port``), weighted ``weight``
(``Weights.Passing``), with one TTL check of ``ttl`` seconds that starts passing and
``DeregisterCriticalServiceAfter`` = ``deregister_after`` (default 60 s: Consul's minimum).
It then starts a daemon thread that passes the check (``PUT
/v1/agent/check/pass/service:ID``) every third of the TTL.  :meth:`stop` stops the
thread and deregisters the instance (``PUT /v1/agent/service/deregister/ID``) before
returning.

When the process dies without stopping, nobody passes the check: it goes critical within
the TTL — out of the ``passing`` answers balancers follow — and Consul removes the
instance ``deregister_after`` later (it reaps every 30 s or so).

The heartbeat thread rides out the agent's absences: a failed pass is logged (once per
change of state) and tried again at the next beat; a check the agent no longer knows (404:
the agent restarted without its state, or reaped the instance) is registered again.  With
``token``, requests carry it as ``X-Consul-Token``.  The thread uses blocking
:mod:`http.client` (one short request per beat): it never runs on an event loop.
"""

from __future__ import annotations

import http.client
import json
import logging
import ssl
from urllib.parse import quote

from poise.config.units import parse_address
from poise.discovery.consul import ConsulError, go_duration, parse_agent
from poise.discovery.heartbeat import Heartbeats

log = logging.getLogger("poise")


class ConsulRegistrar(Heartbeats):
    def __init__(self, *, address: str, weight: int = 1, ttl: float = 10.0,
                 consul: str = "http://127.0.0.1:8500", service: str,
                 service_id: str | None = None, token: str | None = None,
                 deregister_after: float = 60.0, timeout: float = 5.0) -> None:
        if ttl <= 0:
            raise ValueError("ttl must be positive")
        if not service:
            raise ValueError("no service name")
        host, port = parse_address(address)
        self.address = address
        self.weight = weight
        self.ttl = ttl
        self.agent = parse_agent(consul)
        self.consul = consul
        self.service = service
        self.service_id = service_id or f"{service}-{host}-{port}"
        self.check_id = f"service:{self.service_id}"    # (Consul's name for it)
        self.token = token
        self.timeout = timeout
        self.interval = ttl / 3
        self.definition = {
            "ID": self.service_id, "Name": service, "Address": host, "Port": port,
            "Weights": {"Passing": weight, "Warning": 1},
            "Check": {"Name": f"poise register {address}", "TTL": go_duration(ttl),
                      "Status": "passing",
                      "DeregisterCriticalServiceAfter": go_duration(deregister_after)},
        }
        self.registered = False
        self.kind, self.label = "consul", self.service_id
        super().__init__()

    # -- the contract ----------------------------------------------------------------

    def stop(self) -> None:
        """Stop the heartbeats and deregister before returning.  When the agent cannot be
        reached, a warning says so: the check then goes critical within the TTL."""
        self.abandon()
        if not self.registered:
            return
        self.registered = False
        try:
            self._put(f"/v1/agent/service/deregister/{quote(self.service_id, safe='')}")
        except ConsulError as e:
            if e.status != 404:         # (reaped already: nothing to remove)
                log.warning("consul: could not deregister %s (%s); its check goes "
                            "critical within %ss", self.service_id, e, self.ttl)
        except OSError as e:
            log.warning("consul: could not deregister %s (%s); its check goes critical "
                        "within %ss", self.service_id, e, self.ttl)

    # -- inside ----------------------------------------------------------------------

    def _register(self) -> None:
        self._put("/v1/agent/service/register", self.definition)
        self.registered = True

    def _heartbeat(self) -> None:
        try:
            self._put(f"/v1/agent/check/pass/{quote(self.check_id, safe='')}")
        except ConsulError as e:
            if e.status != 404:
                raise
            log.warning("consul: the agent no longer knows %s; registering again",
                        self.service_id)
            self._register()

    def _put(self, path: str, body: object = None) -> None:
        """One PUT; ConsulError (with the status) unless Consul answers 200."""
        host, port, tls = self.agent
        if tls:
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                host, port, timeout=self.timeout, context=ssl.create_default_context())
        else:
            conn = http.client.HTTPConnection(host, port, timeout=self.timeout)
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["X-Consul-Token"] = self.token
        try:
            conn.request("PUT", path, b"" if body is None else json.dumps(body).encode(),
                         headers)
            response = conn.getresponse()
            raw = response.read()
        except (OSError, http.client.HTTPException) as e:
            raise ConnectionError(f"{self.consul}: {e}") from None
        finally:
            conn.close()
        if response.status != 200:
            text = raw[:200].decode("utf-8", "replace").strip()
            raise ConsulError(f"{self.consul}{path} answered {response.status}"
                              + (f": {text}" if text else ""), response.status)
