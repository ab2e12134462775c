"""Runtime objects compiled from config for the HTTP data path: a :class:`Site` per
listener (clusters: :mod:`poise.proxy.http.cluster`). Built once; the request path only
reads attributes."""

from __future__ import annotations

import asyncio

from poise.config.model import Listener
from poise.proxy.http.cluster import ClusterRuntime
from poise.proxy.http.router import Router

__all__ = ["ClusterRuntime", "Site"]


class Site:
    """Everything a client connection on one listener needs, precomputed."""

    def __init__(self, spec: Listener, clusters: dict[str, ClusterRuntime],
                 loop: asyncio.AbstractEventLoop) -> None:
        self.name = spec.name
        self.loop = loop
        self.router = Router(spec.routes, clusters)
        self.header_timeout = spec.client_header_timeout
        self.idle_timeout = spec.client_idle_timeout
        self.max_request_line = spec.max_request_line
        self.max_header_size = spec.max_header_size
        self.max_headers = spec.max_headers
        self.max_request_body = spec.max_request_body
        self.forwarded_headers = spec.forwarded_headers
        self.abort_on_client_close = spec.abort_on_client_close
        self.xfp = b"x-forwarded-proto: http\r\n"
        self.connections: set = set()

    def __repr__(self) -> str:
        return f"<Site {self.name} connections={len(self.connections)}>"
