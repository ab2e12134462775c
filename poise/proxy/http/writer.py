"""Writing to a transport without looking its ``write`` method up on every call.

``transport.write(data)`` from compiled code is a generic method call: a lookup of
``write`` on the transport's type and instance, then the call.  On the request path
that is two lookups per request (the request to the backend, the response to the
client), about 1% of poise's CPU under load (perf).  Every transport of a worker is
usually of one type (uvloop's TCPTransport), so :data:`WRITER` keeps that type's
``write`` and calls it directly; a transport of another type (TLS, a test's stand-in)
is written to the usual way.
"""

from __future__ import annotations

from typing import Any, Final


class Writer:
    """``write(transport, data)`` does ``transport.write(data)``.  (A ``write`` set on
    one transport instance, as a test might, is called only if that instance's type is
    not the one kept: the type is kept from its first transport without such an
    attribute.)"""

    __slots__ = ("_type", "_write")

    def __init__(self) -> None:
        self._type: Any = None      # the transport type whose ``write`` is kept
        self._write: Any = None     # its ``write``, unbound: called with the transport

    def write(self, transport: Any, data: bytes) -> None:
        kind = type(transport)
        if kind is self._type:
            self._write(transport, data)
            return
        if self._type is None and "write" not in getattr(transport, "__dict__", ()):
            self._type = kind
            self._write = kind.write
        transport.write(data)


# One per process: the request path's writes go through it.
WRITER: Final = Writer()
