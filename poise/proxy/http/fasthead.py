"""The one-call HTTP/1.x head parser (``_h1head``, built from h1head.c), or None.

None where it was not built (no C compiler, or ``POISE_PURE=1`` at install) and under
``POISE_INTERPRETED=1``, which runs the reference path: httptools for every message.
Either way poise behaves the same; the fast path only saves CPU (docs/performance.md).
"""

from __future__ import annotations

import importlib
import os
import time
from collections.abc import Callable, Iterable
from typing import Any


def _load() -> Any:
    if os.environ.get("POISE_INTERPRETED") == "1":
        return None
    try:
        return importlib.import_module("poise.proxy.http._h1head")
    except ImportError:     # not built: httptools parses everything
        return None


_module = _load()
parse_request: Any = None if _module is None else _module.parse_request
parse_response: Any = None if _module is None else _module.parse_response


def _join_parts(*parts: bytes | list[bytes]) -> bytes:
    """What _h1head.join_parts does, without the C extension."""
    pieces: list[bytes] = []
    for part in parts:
        if isinstance(part, bytes):
            pieces.append(part)
        else:
            pieces += part
    return b"".join(pieces)


# join_parts(*parts): bytes parts and lists of bytes joined in order, in one go.
join_parts: Any = _join_parts if _module is None else _module.join_parts
# clock(): time.monotonic()'s clock (CLOCK_MONOTONIC, seconds), read for less.
clock: Callable[[], float] = time.monotonic if _module is None else _module.clock


def shared(values: Iterable[bytes]) -> frozenset[bytes]:
    """``values`` as a set whose members are, where they can be, the very objects
    parse_request returns as a method: a lookup of a parsed method then matches by
    identity, without comparing bytes (the same set either way)."""
    own = {} if _module is None else {m: m for m in _module.METHODS}
    return frozenset(own.get(v, v) for v in values)
