"""Human-friendly durations, sizes, percentages and addresses: ``250ms``, ``2s``, ``1m``,
``1h`` / ``64KiB``, ``1MiB`` / ``10%``.

Plain numbers are seconds (durations), bytes (sizes) or percent (percentages).
"""

from __future__ import annotations

import math
import re

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(us|ms|s|m|h)?\s*$")
_DURATION_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}

_PERCENT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|KiB|MB|MiB|GB|GiB|k|K|M|G)?\s*$")
_SIZE_UNITS = {
    None: 1, "B": 1,
    "KB": 1000, "MB": 1000**2, "GB": 1000**3,
    "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3,
    "k": 1024, "K": 1024, "M": 1024**2, "G": 1024**3,
}


def parse_duration(value: object) -> float:
    """Seconds as a float from ``250ms``/``2s``/``1m``/``1h``/``500us`` or a number of seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 250ms, 2s or 1m")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    else:
        raise ValueError("expected a duration such as 250ms, 2s or 1m")
    if not math.isfinite(seconds):
        raise ValueError("expected a finite duration")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


def duration_option(name: str, value: object) -> float:
    """Seconds from an option given as a number or a duration string: TypeError for
    other types, ValueError naming the option for bad values (negative, not finite)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise TypeError(f"{name}: expected seconds or a duration such as 250ms, "
                        f"got {type(value).__name__}")
    try:
        return parse_duration(value)
    except ValueError as e:
        raise ValueError(f"{name}: {e}, got {value!r}") from None


def parse_size(value: object) -> int:
    """Bytes as an int from ``64KiB``/``1MiB``/``1GiB``/``512`` (plain numbers are bytes)."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 64KiB or 1MiB")
    if isinstance(value, int):
        size = value
    elif isinstance(value, float) and value.is_integer():
        size = int(value)
    elif isinstance(value, str) and (m := _SIZE.match(value)):
        size = int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])
    else:
        raise ValueError("expected a size such as 64KiB or 1MiB")
    if size < 0:
        raise ValueError("a size cannot be negative")
    return size


def parse_percent(value: object, maximum: float = 1.0) -> float:
    """A fraction (``10%`` → 0.1) from ``10%``/``12.5%`` or a plain number of percent
    (``10`` → 0.1, not 10.0), between 0 and ``maximum`` (a fraction; 1.0 = 100%)."""
    expected = "expected a percentage like 10%"
    if isinstance(value, bool):
        raise ValueError(expected)
    if isinstance(value, int | float):
        percent = float(value)
    elif isinstance(value, str) and (m := _PERCENT.match(value)):
        percent = float(m.group(1))
    else:
        raise ValueError(expected)
    if not math.isfinite(percent):
        raise ValueError(f"{expected}, got a non-finite number")
    if percent < 0:
        raise ValueError("a percentage cannot be negative")
    if percent > maximum * 100:
        raise ValueError(f"a percentage cannot exceed {maximum * 100:g}%")
    return percent / 100


def parse_address(value: object) -> tuple[str, int]:
    """``(host, port)`` from ``host:port`` or ``[v6]:port``; port 0..65535."""
    if not isinstance(value, str):
        raise ValueError("expected host:port")
    host, sep, port = value.rpartition(":")
    if not sep or not host or not (port.isascii() and port.isdigit()):
        raise ValueError("expected host:port")
    if host.startswith("["):
        if not host.endswith("]"):
            raise ValueError("expected host:port")
        host = host[1:-1]
        if not host:
            raise ValueError("expected host:port")
    elif ":" in host:
        raise ValueError("expected host:port (write IPv6 as [addr]:port)")
    port_no = int(port)
    if port_no > 65535:
        raise ValueError("port must be 0..65535")
    return host, port_no
