"""The private channel between the control plane and a worker: JSON messages framed
by a 4-byte big-endian length, over one end of a ``socketpair``.

Neither side ever blocks on it: sends are buffered writes on the event loop, received
messages are handed to a callback as they complete.  A frame larger than
``MAX_FRAME`` or one that is not a JSON object is a bug on the other side: the channel
is closed (the peer process is then restarted or stops).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import struct
from collections.abc import Callable
from typing import Any

log = logging.getLogger("poise")

Message = dict[str, Any]
MAX_FRAME = 256 * 1024 * 1024
_HEADER = struct.Struct(">I")


def encode(message: Message) -> bytes:
    """One frame: length, then the message as compact UTF-8 JSON."""
    body = json.dumps(message, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME:
        raise ValueError(f"message of {len(body)} bytes exceeds the channel's frame limit")
    return _HEADER.pack(len(body)) + body


class FrameReader:
    """Splits a byte stream into messages (sans-IO)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Message]:
        """The messages completed by ``data``; ValueError on a malformed frame."""
        buf = self._buf
        buf += data
        out = []
        while len(buf) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(buf)
            if size > MAX_FRAME:
                raise ValueError(f"frame of {size} bytes exceeds the limit")
            end = _HEADER.size + size
            if len(buf) < end:
                break
            message = json.loads(bytes(buf[_HEADER.size:end]))
            del buf[:end]
            if not isinstance(message, dict):
                raise ValueError("a channel message must be a JSON object")
            out.append(message)
        return out


class Channel(asyncio.Protocol):
    """One end of the channel on an event loop.

    ``on_message(msg)`` is called for each message in order; ``on_close()`` once when
    the channel closes (the peer went away, or :meth:`close`)."""

    def __init__(self, on_message: Callable[[Message], None],
                 on_close: Callable[[], None] | None = None) -> None:
        self._on_message = on_message
        self._on_close = on_close
        self._reader = FrameReader()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._lost: asyncio.Future[None] | None = None

    @classmethod
    async def open(cls, sock: socket.socket, on_message: Callable[[Message], None],
                   on_close: Callable[[], None] | None = None) -> Channel:
        """Wrap a connected socket (one end of a socketpair) on the running loop."""
        loop = asyncio.get_running_loop()
        _, channel = await loop.connect_accepted_socket(
            lambda: cls(on_message, on_close), sock)
        return channel

    def send(self, message: Message) -> bool:
        """Queue ``message``; False when the channel is already closed."""
        if self.closed or self.transport is None:
            return False
        self.transport.write(encode(message))
        return True

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    async def aclose(self, timeout: float = 2.0) -> None:
        """Close after what is queued has been written (or ``timeout`` passed)."""
        self.close()
        if self._lost is not None and not self.closed:
            try:
                async with asyncio.timeout(timeout):
                    await asyncio.shield(self._lost)
            except TimeoutError:
                pass

    # -- asyncio callbacks ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._lost = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        try:
            messages = self._reader.feed(data)
        except ValueError as e:
            log.error("control channel: %s; closing it", e)
            self.close()
            return
        for message in messages:
            if self.closed:
                return
            self._on_message(message)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)
        if self._on_close is not None:
            self._on_close()
