"""Parked upstream connections: idle keep-alive sockets held as bare file descriptors.

An idle pooled HTTP/1.1 connection costs about 2.3 KB of the worker's memory, most of
it uvloop's transport and libuv's handle (issue 15).  One unused for
``keepalive_park_after`` is *parked* by its pool (:meth:`UpstreamPool.expire
<poise.proxy.http.pool.UpstreamPool.expire>`): its socket stays open, but only its file
descriptor is kept (in the pool's ``parked`` list), and the :class:`ParkingLot` of the
worker watches it.  A request that finds no warm idle connection *revives* one (a new
transport around the same socket: no TCP handshake).  Per parked connection the worker
keeps an int, a float and an entry here; the kernel's epoll item is not process memory.

The lot watches every parked descriptor in one private epoll set, and the event loop
watches only that set's own descriptor: a parked connection costs the loop nothing.
Any event on a parked descriptor means the connection can no longer be used (the
backend closed it, reset it, or sent bytes nobody asked for): it is closed, and its
pool accounts for it as for an idle connection that closed.

Not on the per-request path (parking runs in the once-a-second sweep, reviving once
per connection), so this module stays interpreted (it is not in setup.py's HOT_PATH).
"""

from __future__ import annotations

import asyncio
import os
import select
from typing import Any

# EPOLLIN: bytes nobody asked for, or the backend's FIN (a read would return 0);
# EPOLLRDHUP: the FIN itself.  (EPOLLHUP and EPOLLERR are always reported.)
_WATCH = select.EPOLLIN | select.EPOLLRDHUP


class ParkingLot:
    """The parked descriptors of one event loop (one worker), by descriptor → pool.

    Made on the first park (:func:`lot_for`); ``loop`` watches the lot's epoll set
    from then on.  A pool calls :meth:`park` when it parks a connection, :meth:`unpark`
    when it revives one and :meth:`discard` when it closes one; the lot calls the pool's
    ``parked_closed(fd)`` after it closed a descriptor on its own (an event on it).
    """

    __slots__ = ("loop", "_epoll", "_pools")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._epoll = select.epoll()
        self._pools: dict[int, Any] = {}
        loop.add_reader(self._epoll.fileno(), self._events)

    def park(self, pool: Any, fd: int) -> None:
        """Watch ``fd``, a parked connection of ``pool`` (the lot does not own it until
        an event on it: the pool closes it through :meth:`discard`)."""
        self._epoll.register(fd, _WATCH)
        self._pools[fd] = pool

    def unpark(self, fd: int) -> None:
        """Stop watching ``fd``: it is being revived (a transport takes it over)."""
        del self._pools[fd]
        self._epoll.unregister(fd)

    def discard(self, fd: int) -> None:
        """Stop watching ``fd`` and close it (its pool does the accounting)."""
        self.unpark(fd)
        os.close(fd)

    def _events(self) -> None:
        """Parked connections that something happened to: close them.  (Level
        triggered: events beyond one poll's batch are reported at the next turn.)"""
        for fd, _ in self._epoll.poll(0):
            # (None: an earlier close in this batch let a queued request revive it.)
            pool = self._pools.pop(fd, None)
            if pool is None:
                continue
            self._epoll.unregister(fd)
            os.close(fd)
            pool.parked_closed(fd)

    def close(self) -> None:
        """Close every parked descriptor (their pools account for them) and the epoll
        set; the loop stops watching it.  Worker shutdown: pools normally closed theirs
        already (ClusterRuntime.stop)."""
        while self._pools:
            fd, pool = self._pools.popitem()
            self._epoll.unregister(fd)
            os.close(fd)
            pool.parked_closed(fd)
        self.loop.remove_reader(self._epoll.fileno())
        self._epoll.close()

    def __repr__(self) -> str:
        return f"<ParkingLot parked={len(self._pools)}>"


# One lot per event loop (a worker runs one; tests may run several in turn).
_lots: dict[asyncio.AbstractEventLoop, ParkingLot] = {}


def lot_for(loop: asyncio.AbstractEventLoop) -> ParkingLot:
    """The parking lot of ``loop``, made on first use."""
    lot = _lots.get(loop)
    if lot is None:
        lot = _lots[loop] = ParkingLot(loop)
    return lot


def close_lot(loop: asyncio.AbstractEventLoop) -> None:
    """Close the parking lot of ``loop`` if it has one (worker shutdown)."""
    lot = _lots.pop(loop, None)
    if lot is not None:
        lot.close()
