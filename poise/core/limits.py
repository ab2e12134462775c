"""Circuit-breaker accounting for one cluster, as Envoy's per-cluster thresholds.

Not a breaker that opens on errors (that is outlier detection): hard caps on the
resources a cluster may hold, so that one slow cluster cannot take all of a worker's
connections, memory and retries.  Each cap is ``None`` (unlimited, the default) or a
count >= 0.  Counts are per worker process: with N workers a cluster may hold up to N
times each cap in total.

Usage: every successful ``try_*`` is paired with one ``end_*`` when the thing it
admitted is over; a failed ``try_*`` counts its :class:`Overflow` in ``overflows`` and
needs no ``end_*``.  Connections are asked about with :meth:`ClusterLimits.can_connect`
(which counts nothing, as the caller may pend instead or try another backend) and
counted with ``opened``/``closed``.  Ending more than was started is a bug in the
caller and raises RuntimeError, instead of a count going negative and silently
lifting a cap.
"""

from __future__ import annotations

from enum import Enum


class Overflow(Enum):
    """Which cap was hit (the keys of ``ClusterLimits.overflows``, for metrics)."""

    MAX_CONNECTIONS = "max_connections"
    MAX_PENDING = "max_pending"
    MAX_REQUESTS = "max_requests"
    MAX_RETRIES = "max_retries"
    BACKEND_MAX_CONNECTIONS = "backend_max_connections"
    QUEUE_TIMEOUT = "queue_timeout"        # a pending request waited too long


def _check(name: str, value: int | None) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                              or value < 0):
        raise ValueError(f"{name} must be None (unlimited) or an integer >= 0, not {value!r}")
    return value


def _cap(value: int | None) -> str:
    return "inf" if value is None else str(value)


class ClusterLimits:
    """Current counts (``requests``, ``connections``, ``pending``, ``retries``) against
    the caps given, and ``overflows``: how often each cap was hit (every
    :class:`Overflow` present, from 0)."""

    __slots__ = ("max_connections", "max_pending", "max_requests", "max_retries",
                 "requests", "connections", "pending", "retries", "overflows")

    def __init__(self, *, max_connections: int | None = None, max_pending: int | None = None,
                 max_requests: int | None = None, max_retries: int | None = None) -> None:
        self.max_connections = _check("max_connections", max_connections)
        self.max_pending = _check("max_pending", max_pending)
        self.max_requests = _check("max_requests", max_requests)
        self.max_retries = _check("max_retries", max_retries)
        self.requests = 0
        self.connections = 0
        self.pending = 0
        self.retries = 0
        self.overflows: dict[Overflow, int] = dict.fromkeys(Overflow, 0)

    def configure(self, *, max_connections: int | None = None,
                  max_pending: int | None = None, max_requests: int | None = None,
                  max_retries: int | None = None) -> None:
        """New caps (a config reload); the counts stay, so what is held now is released
        as usual.  A cap lowered below its count admits nothing more until the count
        falls under it."""
        self.max_connections = _check("max_connections", max_connections)
        self.max_pending = _check("max_pending", max_pending)
        self.max_requests = _check("max_requests", max_requests)
        self.max_retries = _check("max_retries", max_retries)

    # -- requests and retries ------------------------------------------------------------

    def try_request(self) -> bool:
        """Admit one request (True) or count a ``MAX_REQUESTS`` overflow (False)."""
        if self.max_requests is not None and self.requests >= self.max_requests:
            self.trip(Overflow.MAX_REQUESTS)
            return False
        self.requests += 1
        return True

    def end_request(self) -> None:
        if self.requests <= 0:
            raise RuntimeError("end_request() without a matching try_request()")
        self.requests -= 1

    def try_retry(self) -> bool:
        """Admit one retry in flight (True) or count a ``MAX_RETRIES`` overflow (False)."""
        if self.max_retries is not None and self.retries >= self.max_retries:
            self.trip(Overflow.MAX_RETRIES)
            return False
        self.retries += 1
        return True

    def end_retry(self) -> None:
        if self.retries <= 0:
            raise RuntimeError("end_retry() without a matching try_retry()")
        self.retries -= 1

    # -- connections -----------------------------------------------------------------------

    def can_connect(self, backend_connections: int, backend_max: int | None) -> Overflow | None:
        """None when one more connection may be opened to a backend that has
        ``backend_connections`` open (cap ``backend_max``, None = unlimited); otherwise
        the cap in the way, the cluster's ``MAX_CONNECTIONS`` first (no other backend
        would help then).  Counts nothing: call :meth:`trip` if the caller gives up."""
        if self.max_connections is not None and self.connections >= self.max_connections:
            return Overflow.MAX_CONNECTIONS
        if backend_max is not None and backend_connections >= backend_max:
            return Overflow.BACKEND_MAX_CONNECTIONS
        return None

    def opened(self) -> None:
        """A connection to one of the cluster's backends was opened."""
        self.connections += 1

    def closed(self) -> None:
        if self.connections <= 0:
            raise RuntimeError("closed() without a matching opened()")
        self.connections -= 1

    # -- pending requests ----------------------------------------------------------------

    def try_pend(self) -> bool:
        """Admit one request to wait for a connection (True) or count a ``MAX_PENDING``
        overflow (False)."""
        if self.max_pending is not None and self.pending >= self.max_pending:
            self.trip(Overflow.MAX_PENDING)
            return False
        self.pending += 1
        return True

    def end_pend(self) -> None:
        """A pending request got its connection, gave up or timed out (for a timeout,
        also ``trip(Overflow.QUEUE_TIMEOUT)``)."""
        if self.pending <= 0:
            raise RuntimeError("end_pend() without a matching try_pend()")
        self.pending -= 1

    def trip(self, which: Overflow) -> None:
        """Count one overflow of ``which``."""
        self.overflows[which] += 1

    def __repr__(self) -> str:
        return (f"<ClusterLimits requests={self.requests}/{_cap(self.max_requests)} "
                f"connections={self.connections}/{_cap(self.max_connections)} "
                f"pending={self.pending}/{_cap(self.max_pending)} "
                f"retries={self.retries}/{_cap(self.max_retries)}>")
