"""A backend's live counters (:class:`BackendStats`): its own module because the HTTP
hot path compiles it (setup.py HOT_PATH), so that counting a request in flight is a
native attribute write rather than a generic attribute lookup and store."""

from __future__ import annotations


class BackendStats:
    """Live, per-worker counters for one backend; survive snapshot rebuilds.

    Plain attributes, mutated by the data plane on the event loop thread only.
    """

    __slots__ = ("in_flight", "active_connections", "last_error_at", "ewma_rtt", "ewma_at")

    def __init__(self) -> None:
        self.in_flight = 0
        self.active_connections = 0
        self.last_error_at = 0.0
        # Latency estimate kept by latency-aware policies (peak_ewma); 0.0 = no data.
        self.ewma_rtt = 0.0
        self.ewma_at = 0.0

    def __repr__(self) -> str:
        return f"<BackendStats in_flight={self.in_flight} conns={self.active_connections}>"
