"""One error hierarchy for the whole of poise.

Every error knows where it came from (``source``: downstream client, upstream backend,
or local decision) and whether retrying the request elsewhere could help
(``retryable``).  The HTTP layer maps an error to a status in one place
(:mod:`poise.proxy.http.errors`); foreign exceptions are translated into these at the
boundary where they arise.
"""

from __future__ import annotations


class PoiseError(Exception):
    """Base of every poise error. ``status`` is the HTTP answer when one is still
    possible; ``headers`` are header lines that answer carries (``name: value\r\n``)."""

    status = 500
    source = "local"
    retryable = False
    headers = b""

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail or self.__class__.__doc__ or self.__class__.__name__)
        self.detail = detail


class InternalError(PoiseError):
    """A bug in poise surfaced while handling a request (logged with its traceback)."""


class ConfigError(PoiseError):
    """The configuration is invalid; ``errors`` lists ``(field_path, message)`` pairs."""

    def __init__(self, errors: list[tuple[str, str]]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"{p}: {m}" if p else m for p, m in errors))


# -- downstream: the client sent something we will not forward -------------------------

class DownstreamError(PoiseError):
    """The client's request is unacceptable."""

    source = "downstream"
    status = 400


class BadRequest(DownstreamError):
    """Malformed or ambiguous request."""


class RequestTimeout(DownstreamError):
    """The request head did not arrive in time."""

    status = 408


class PayloadTooLarge(DownstreamError):
    """The request body exceeds max_request_body."""

    status = 413


class UriTooLong(DownstreamError):
    """The request line exceeds max_request_line."""

    status = 414


class HeadersTooLarge(DownstreamError):
    """The header block exceeds max_header_size or max_headers."""

    status = 431


class VersionNotSupported(DownstreamError):
    """The request uses an HTTP version other than 1.0 or 1.1."""

    status = 505


# -- local decisions ---------------------------------------------------------------------

class NoRoute(PoiseError):
    """No route matches the request."""

    status = 404


class NoBackendAvailable(PoiseError):
    """The cluster has no backend that can take the request."""

    status = 503


class RateLimited(DownstreamError):
    """A rate limit of the route denied the request; ``headers`` are the response's
    ``Retry-After`` and ``RateLimit-Policy``/``RateLimit`` lines."""

    status = 429

    def __init__(self, headers: bytes, detail: str = "") -> None:
        super().__init__(detail or "rate limited")
        self.headers = headers


class Overloaded(NoBackendAvailable):
    """A circuit-breaker limit of the cluster is reached (``limit`` names it; the
    response carries it in ``x-poise-limit``)."""

    def __init__(self, limit: str, detail: str = "") -> None:
        super().__init__(detail or f"cluster limit reached: {limit}")
        self.limit = limit
        self.headers = b"x-poise-limit: %s\r\n" % limit.encode()


class RequestDeadlineExceeded(PoiseError):
    """The cluster's request_timeout passed before a response head arrived."""

    status = 504


# -- the control plane: operators' requests (admin API) ---------------------------------

class ControlError(PoiseError):
    """An operator's request to the control plane cannot be carried out."""

    status = 400


class UnknownCluster(ControlError):
    """No cluster has that name."""

    status = 404


class UnknownBackend(ControlError):
    """The cluster has no backend at that address."""

    status = 404


# -- upstream: the backend failed us -----------------------------------------------------

class UpstreamError(PoiseError):
    """The backend failed before a complete response."""

    source = "upstream"
    status = 502


class UpstreamConnectError(UpstreamError):
    """Connecting to the backend failed (refused, unreachable)."""

    retryable = True


class UpstreamConnectTimeout(UpstreamConnectError):
    """Connecting to the backend took longer than connect_timeout."""

    status = 504


class UpstreamReset(UpstreamError):
    """The backend closed or reset the connection before the response was complete."""


class UpstreamProtocolError(UpstreamError):
    """The backend sent a malformed response."""


class UpstreamTimeout(UpstreamError):
    """The backend did not send a response head within response_header_timeout."""

    status = 504
