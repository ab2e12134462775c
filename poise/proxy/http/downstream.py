"""What an exchange answers: the client side of one request.

:class:`Downstream` is the part of a client connection that
:class:`~poise.proxy.http.exchange.Exchange` and the modules around it (resilience,
accounting, upstream pools) use.  An HTTP/1.x connection
(:class:`~poise.proxy.http.protocol.ClientConnection`) is one; so is an HTTP/2 stream,
whose connection multiplexes many.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mypy_extensions import mypyc_attr

if TYPE_CHECKING:
    import asyncio

    from poise.proxy.http.exchange import Exchange
    from poise.proxy.http.site import Site


@mypyc_attr(allow_interpreted_subclasses=True)
class Downstream:
    """The client side of exchanges.

    ``site`` is the listener's runtime; ``transport`` what responses are written to
    (for an HTTP/2 stream, the exchange writes through its own methods instead);
    ``peer_ip`` the client's address as bytes (from a PROXY header when there was
    one: ``proxied``); ``sni`` the TLS server name asked for; ``forwarded`` the
    X-Forwarded-For/-Proto lines for requests that bring none; ``queue`` requests
    waiting behind the current one (pipelining); ``draining`` asks to close after what
    is in flight; ``write_paused`` says the client cannot take more response bytes."""

    __slots__ = ("site", "loop", "transport", "peer_ip", "proxied", "sni", "forwarded",
                 "queue", "draining", "closed", "write_paused", "h2")

    def __init__(self, site: Site) -> None:
        self.site = site
        self.loop: asyncio.AbstractEventLoop = site.loop
        self.transport: Any = None
        self.peer_ip = b""
        self.proxied: Any = None
        self.sni: str | None = None
        self.forwarded = b""
        # (A list, not a deque: an empty deque costs 760 bytes per idle connection, an
        # empty list 56; pipelined requests waiting here are few.)
        self.queue: list[Exchange] = []
        self.draining = False
        self.closed = False
        self.write_paused = False
        self.h2 = False             # an HTTP/2 stream (logs and traces say so)

    def exchange_done(self, ex: Exchange) -> None:
        """``ex`` has sent its whole response (or failed, or was abandoned)."""
        raise NotImplementedError

    def block_reading(self, reason: int) -> None:
        """Stop taking request bytes for ``reason`` (a bit flag) until unblocked."""
        raise NotImplementedError

    def unblock_reading(self, reason: int) -> None:
        raise NotImplementedError

    def reject_body(self, reason: str) -> None:
        """Called from a request-body callback: the body is over its limit (413)."""
        raise NotImplementedError

    def abort(self) -> None:
        """Cut the client off: a response already begun must be seen as truncated."""
        raise NotImplementedError

    def owner(self) -> Any:
        """The client connection, to which an upstream connection that began with a
        PROXY header naming its client is private (it has ``closed`` and
        ``addresses()``): this object, or an HTTP/2 stream's session."""
        return self

    def addresses(self) -> tuple[Any, Any]:
        """``(client, local)`` addresses, each ``(ip, port)``, or None where unknown."""
        raise NotImplementedError
