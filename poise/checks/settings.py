"""What an active health check does and how often: :class:`CheckSettings`, plus the
scheduling arithmetic (:func:`first_wait`, :func:`next_wait`, :func:`align`) kept pure
so it can be tested with a seeded ``random.Random`` and no sockets."""

from __future__ import annotations

import random
import re
import ssl
from dataclasses import dataclass, field

# The most of a response body read while looking for ``expect_body``.
BODY_CAP = 64 * 1024

# Probe start times are aligned to a grid this fine (at most; see ``grid``).
MAX_TICK = 0.005

CHECK_TYPES = ("http", "tcp", "grpc")

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# Printable ASCII without spaces: anything else could split the request line.
_TARGET = re.compile(r"/[\x21-\x7e]*")
_HOST = re.compile(r"[\x21-\x7e]+")


@dataclass(frozen=True, slots=True)
class CheckSettings:
    """One cluster's active check, validated on construction (``ValueError``).

    - ``type``: ``"http"`` (default), ``"tcp"`` (the connect alone is the check) or
      ``"grpc"`` (the gRPC health protocol, for ``service``: ``""`` is the server).
    - ``path``, ``method`` (``/health``, ``GET``): the request line, always HTTP/1.1.
    - ``host``: the ``Host`` header; ``None`` (default) sends the backend's
      ``host:port``.
    - ``expect_status``: inclusive ``(low, high)`` ranges; default 200-399.
    - ``expect_body``: a substring (UTF-8) the body must contain within its first 64 KiB;
      ``None`` (default) does not look at the body.
    - ``interval`` (2 s): the wait from the end of one probe to the start of the next,
      each wait drawn uniformly from ``interval * (1 ± jitter)`` (``jitter`` 0.10) so
      probes of many backends do not synchronise.
    - ``timeout`` (1 s): the whole probe — connect, request and complete response.
    - ``rise`` (2) / ``fall`` (3): passes / failures in a row that flip a backend
      (see :class:`poise.core.health.RiseFall`).

    How a probe reaches the backend, as the cluster's traffic does:

    - ``tls``: an ``ssl.SSLContext`` to probe over TLS (a ``tcp`` check then passes
      when the handshake completes, verification included); None (default): plain.
    - ``server_name``: the TLS name sent and verified; None: the backend's host.
    - ``preamble``: bytes sent first on every probe connection, before TLS: the PROXY
      header of a cluster with ``send_proxy_protocol`` (``PROXY UNKNOWN`` or a v2
      ``LOCAL``, as HAProxy's ``check-send-proxy`` does); empty (default): none.
    """

    type: str = "http"
    path: str = "/health"
    method: str = "GET"
    host: str | None = None
    expect_status: tuple[tuple[int, int], ...] = ((200, 399),)
    expect_body: str | None = None
    interval: float = 2.0
    timeout: float = 1.0
    jitter: float = 0.10
    rise: int = 2
    fall: int = 3
    tls: ssl.SSLContext | None = field(default=None, compare=False)
    server_name: str | None = None
    preamble: bytes = b""
    service: str = ""

    def __post_init__(self) -> None:
        if self.type not in CHECK_TYPES:
            raise ValueError(f"check type must be one of {CHECK_TYPES}, not {self.type!r}")
        if not _TOKEN.fullmatch(self.method):
            raise ValueError(f"invalid check method {self.method!r}")
        if not _TARGET.fullmatch(self.path):
            raise ValueError(f"check path must start with '/' and hold no spaces or "
                             f"control characters: {self.path!r}")
        if self.host is not None and not _HOST.fullmatch(self.host):
            raise ValueError(f"invalid check host {self.host!r}")
        ranges = tuple(tuple(r) for r in self.expect_status)
        if not ranges or any(len(r) != 2 or not 100 <= r[0] <= r[1] <= 599 for r in ranges):
            raise ValueError("expect_status must be non-empty (low, high) ranges "
                             f"within 100..599: {self.expect_status!r}")
        object.__setattr__(self, "expect_status", ranges)
        if self.expect_body == "":
            raise ValueError("expect_body must not be empty (use None to skip the body)")
        if not self.interval > 0 or not self.timeout > 0:
            raise ValueError("interval and timeout must be positive")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"jitter must be in [0, 1): {self.jitter!r}")
        if self.rise < 1 or self.fall < 1:
            raise ValueError("rise and fall must be at least 1")

    def status_ok(self, status: int) -> bool:
        """Whether ``status`` is within one of the ``expect_status`` ranges."""
        for low, high in self.expect_status:
            if low <= status <= high:
                return True
        return False


def first_wait(settings: CheckSettings, rng: random.Random) -> float:
    """Delay before a backend's first probe: uniform in ``[0, interval)``, so a
    thousand backends added at once are probed spread over one interval."""
    return settings.interval * rng.random()


def next_wait(settings: CheckSettings, rng: random.Random) -> float:
    """Delay from the end of one probe to the start of the next: uniform in
    ``interval * [1 - jitter, 1 + jitter]``."""
    return settings.interval * (1.0 + settings.jitter * (2.0 * rng.random() - 1.0))


def grid(settings: CheckSettings) -> float:
    """The tick probe start times are aligned to: 5 ms, or a tenth of the jitter band
    if that is finer (0 with no jitter: no alignment)."""
    return min(MAX_TICK, settings.interval * settings.jitter / 10)


def align(now: float, wait: float, tick: float, longest: float) -> float:
    """The loop time to start a probe ``wait`` seconds after ``now``, moved onto a
    multiple of ``tick`` without making the wait longer than ``longest``.

    Probes of a thousand backends due within the same few ms then share one wake-up of
    the event loop instead of one each — a third of the checker's CPU at 1,000
    backends.  The shift is less than one tick, so waits keep their distribution."""
    when = now + wait
    if tick <= 0:
        return when
    up = when + (-when % tick)
    return up if up - now <= longest else up - tick
