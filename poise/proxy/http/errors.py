"""Error → HTTP response, in one place for the whole proxy.

Every :class:`~poise.errors.PoiseError` maps to its ``status``; anything else is a bug
and answers 500.  Bodies are short plain text; responses are built once per status.
"""

from __future__ import annotations

from typing import Final

from poise.errors import PoiseError
from poise.proxy.http.headers import status_line

_CACHE: Final[dict[tuple[int, bool], bytes]] = {}


def status_of(error: BaseException) -> int:
    return error.status if isinstance(error, PoiseError) else 500


def error_response(status: int, close: bool, head_only: bool = False,
                   extra: bytes = b"") -> bytes:
    """A complete response for ``status``; ``close`` adds ``Connection: close``."""
    key = (status, close)
    base = _CACHE.get(key) if not extra else None
    if base is None:
        line = status_line(status)
        body = line[9:].rstrip() + b"\n"
        base = (line + b"content-type: text/plain\r\ncontent-length: %d\r\n" % len(body)
                + extra + (b"connection: close\r\n" if close else b"") + b"\r\n" + body)
        if not extra:
            _CACHE[key] = base
    if head_only:
        return base[: base.index(b"\r\n\r\n") + 4]
    return base
