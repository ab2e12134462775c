"""The HTTP/2 codec poise drives: ``jh2`` (h2's sans-IO API, with HPACK and frame
buffering in Rust: about a third less CPU per request than ``h2``), or ``h2`` itself
where jh2 is not installed.  Everything poise uses of it is imported from here."""

from __future__ import annotations

from collections import deque
from typing import Any

try:
    from jh2 import events
    from jh2.config import H2Configuration
    from jh2.connection import H2Connection
    from jh2.exceptions import ProtocolError, StreamClosedError
    from jh2.hyperframe.frame import GoAwayFrame
    from jh2.settings import SettingCodes, Settings
except ImportError:         # pragma: no cover (jh2 is a dependency; h2 has its API)
    from h2 import events  # type: ignore[no-redef]
    from h2.config import H2Configuration  # type: ignore[no-redef]
    from h2.connection import H2Connection  # type: ignore[no-redef]
    from h2.exceptions import ProtocolError, StreamClosedError  # type: ignore[no-redef]
    from h2.settings import SettingCodes, Settings  # type: ignore[no-redef]
    from hyperframe.frame import GoAwayFrame  # type: ignore[no-redef]

__all__ = ["H2Configuration", "H2Connection", "ProtocolError", "SettingCodes", "Settings",
           "StreamClosedError", "events", "server_connection"]

# Error codes (RFC 9113 §7) poise sends.
NO_ERROR = 0
PROTOCOL_ERROR = 1
INTERNAL_ERROR = 2
REFUSED_STREAM = 7
CANCEL = 8
ENHANCE_YOUR_CALM = 11


def uncap_streams(conn: Any) -> None:
    """After ``initiate_connection`` has sent SETTINGS_MAX_CONCURRENT_STREAMS: stop the
    codec from enforcing it itself (it would close the whole connection), so that
    poise refuses the extra streams one by one (REFUSED_STREAM, RFC 9113 §5.1.2)."""
    conn.local_settings._settings[SettingCodes.MAX_CONCURRENT_STREAMS] = deque([2**31 - 1])


def go_away(conn: Any, last_stream_id: int, code: int) -> bytes:
    """A GOAWAY frame, made by hand: the codec's own ``close_connection`` would also
    stop it sending on the streams still open, which a graceful stop finishes."""
    frame = GoAwayFrame(0)
    frame.last_stream_id = last_stream_id
    frame.error_code = code
    return conn.data_to_send() + frame.serialize()


def server_connection(max_streams: int, stream_window: int,
                      max_header_list: int) -> Any:
    """A server-side codec connection whose SETTINGS (sent by ``initiate_connection``)
    are in force from the start.  Inbound headers are validated (pseudo-headers,
    connection-specific fields, upper-case names); outbound ones are poise's own,
    already lower-cased and free of hop-by-hop fields, so not re-checked.  Inbound
    header lists are not validated by the codec either: poise does it as it reads them
    (:mod:`poise.proxy.http2.request`), for a third of the codec's cost, and answers a
    malformed one with a stream error rather than the codec's connection error."""
    conn = H2Connection(config=H2Configuration(
        client_side=False, header_encoding=None,
        validate_outbound_headers=False, normalize_outbound_headers=False,
        validate_inbound_headers=False, normalize_inbound_headers=False))
    conn.local_settings = Settings(client=False, initial_values={
        SettingCodes.MAX_CONCURRENT_STREAMS: max_streams,
        SettingCodes.INITIAL_WINDOW_SIZE: stream_window,
        SettingCodes.MAX_HEADER_LIST_SIZE: max_header_list,
    })
    return conn
