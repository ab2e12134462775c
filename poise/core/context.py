"""What a balancing policy may know about a request.

The proxy fills a :class:`RequestContext` only for policies that read one (round robin
and friends get ``None``); the client library builds one from an httpx request.  Fields
are parsed lazily: a policy that hashes the client address never pays for cookies.
"""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import parse_qsl


class RequestContext:
    """The request as policies see it. Header names are matched case-insensitively."""

    __slots__ = ("client_ip", "method", "target", "_headers", "_cookies", "_query")

    def __init__(self, client_ip: str = "", target: bytes = b"/", method: bytes = b"GET",
                 headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
        self.client_ip = client_ip
        self.method = method
        self.target = target            # path and query, as sent
        self._headers = headers
        self._cookies: dict[bytes, bytes] | None = None
        self._query: dict[bytes, bytes] | None = None

    @property
    def path(self) -> bytes:
        """The target without its query string."""
        return self.target.split(b"?", 1)[0]

    def header(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (any case), or None."""
        name = name.lower()
        for n, v in self._headers:
            if n.lower() == name:
                return v
        return None

    def cookie(self, name: bytes) -> bytes | None:
        """The value of cookie ``name`` from the Cookie header(s), or None."""
        if self._cookies is None:
            jar: dict[bytes, bytes] = {}
            for n, v in self._headers:
                if n.lower() == b"cookie":
                    for pair in v.split(b";"):
                        key, sep, value = pair.strip().partition(b"=")
                        if sep and key not in jar:
                            jar[key] = value
            self._cookies = jar
        return self._cookies.get(name)

    def query(self, name: bytes) -> bytes | None:
        """The first value of query parameter ``name`` (percent-decoded), or None."""
        if self._query is None:
            _, _, qs = self.target.partition(b"?")
            self._query = {}
            # latin-1 round-trips every byte, so no percent-encoding can fail to decode.
            for key, value in parse_qsl(qs.decode("latin-1"), keep_blank_values=True,
                                        encoding="latin-1"):
                self._query.setdefault(key.encode("latin-1"), value.encode("latin-1"))
        return self._query.get(name)

    def __repr__(self) -> str:
        return f"<RequestContext {self.client_ip} {self.method.decode()} {self.target[:60]!r}>"
