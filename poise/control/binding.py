"""Whether an address can be bound, asked before anything depends on it."""

from __future__ import annotations

import socket

from poise.config.units import parse_address


def bind_error(bind: str) -> str | None:
    """Why ``bind`` cannot be bound exclusively right now (None: it can)."""
    host, port = parse_address(bind)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            return e.strerror or str(e)
    return None
