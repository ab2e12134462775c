"""TCP check of a cluster whose connections start with a PROXY header and/or TLS: the
backend is up if the connection opens as traffic opens it — header sent, handshake
completed and the certificate verified — within the timeout.

Unlike :class:`~poise.checks.tcp_probe.TcpProbe` this costs a Task and a transport per
probe (a handshake needs the event loop's TLS machinery); only such clusters use it.
"""

from __future__ import annotations

import asyncio

from poise.checks.probe import ResultCallback, connect_failure
from poise.checks.settings import CheckSettings
from poise.core.backend import Backend
from poise.proxy.dial import dial


class HandshakeProbe:
    """Connect (+ ``settings.preamble``, + TLS with ``settings.tls``), then close; reports
    ``"ok"``, ``"connect timeout"``, ``"certificate verify failed: ..."``, ..."""

    __slots__ = ("_loop", "_backend", "_settings", "_on_result", "_task")

    def __init__(self, backend: Backend, settings: CheckSettings, on_result: ResultCallback,
                 *, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._backend = backend
        self._settings = settings
        self._on_result = on_result
        self._task: asyncio.Task[None] | None = None

    def run(self) -> None:
        self._task = self._loop.create_task(self._probe())

    def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()

    async def _probe(self) -> None:
        s, b = self._settings, self._backend
        try:
            async with asyncio.timeout(s.timeout):
                transport, _ = await dial(self._loop, asyncio.Protocol, b.host, b.port,
                                          tls=s.tls, server_name=s.server_name,
                                          preamble=s.preamble, handshake_timeout=s.timeout)
        except TimeoutError:
            ok, reason = False, "connect timeout"
        except Exception as e:
            ok, reason = False, connect_failure(e)
        else:
            transport.close()
            ok, reason = True, "ok"
        self._task = None
        self._on_result(ok, reason)

    def __repr__(self) -> str:
        state = "connecting" if self._task is not None else "idle"
        return f"<HandshakeProbe {self._backend.address} {state}>"
