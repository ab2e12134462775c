"""The response side of an HTTP/2 session: HEADERS and DATA as the client's
flow-control windows allow, what waits for window, END_STREAM, resets either way,
and streams stalled on a zero window.  A mixin of
:class:`~poise.proxy.http2.session.H2Session` (the attributes are its own)."""

from __future__ import annotations

from typing import Any

from poise.proxy.http.h2stream import H2Stream
from poise.proxy.http2.codec import CANCEL, NO_ERROR, ProtocolError, StreamClosedError

# Response bytes waiting for window in one stream before its backend stops being read.
PENDING_HIGH = 256 * 1024
# Prematurely reset streams (reset by the client before their response ended) that
# close the connection once they are also over half the streams it opened.
RAPID_RESETS = 100


class ResponseFrames:
    """Sending responses (mixed into H2Session)."""

    h2: Any
    loop: Any
    site: Any
    streams: dict[int, H2Stream]
    pending: dict[int, list[Any]]
    closed: bool
    draining: bool
    write_paused: bool
    _stalled: dict[int, float]
    _empty: dict[int, int]
    _opened: int
    _premature: int

    def _write(self) -> None:
        raise NotImplementedError

    def _arm(self, delay: float) -> None:
        raise NotImplementedError

    def _goaway(self, code: int) -> None:
        raise NotImplementedError

    def _calm(self, why: str) -> None:
        raise NotImplementedError

    def send_head(self, stream: H2Stream, status: int, fields: list[bytes],
                  end: bool) -> None:
        if stream.reset:
            return
        headers = [(b":status", b"%d" % status)]
        for i in range(0, len(fields), 4):
            headers.append((fields[i].lower(), fields[i + 2]))
        try:
            self.h2.send_headers(stream.stream_id, headers, end_stream=end)
        except (StreamClosedError, ProtocolError, KeyError):
            stream.reset = stream.closed = True

    def stream_ended(self, stream: H2Stream) -> None:
        """The response went out whole with its HEADERS (END_STREAM set)."""
        self._retire_stream(stream)
        self._write()

    def send_trailers(self, stream: H2Stream, fields: list[bytes]) -> None:
        """End the stream with trailer fields (flat, as ``fields``), after its data."""
        if stream.reset:
            return
        waiting = self.pending.get(stream.stream_id)
        if waiting is not None:
            waiting[2] = fields         # (sent once the data before them is)
            return
        self._end_stream(stream, fields)
        self._write()

    def send_body(self, stream: H2Stream, data: bytes, end: bool) -> None:
        """Send ``data`` (and END_STREAM with ``end``) as the window allows; keep the
        rest, and stop reading the backend beyond PENDING_HIGH."""
        sid = stream.stream_id
        if stream.reset:
            return
        waiting = self.pending.get(sid)
        if waiting is None:
            data = self._send_window(stream, data)
            if not data:
                if end:
                    self._end_stream(stream)
                self._write()
                return
            waiting = self.pending[sid] = [[], 0, False]
            self._stalled.setdefault(sid, self.loop.time())
            self._watch_stalls()
        if data:
            waiting[0].append(data)
            waiting[1] += len(data)
        if end:
            waiting[2] = True
        ex = stream.exchange
        if waiting[1] > PENDING_HIGH and ex is not None and ex.conn is not None:
            ex.conn.pause_reading()
        self._write()

    def _send_window(self, stream: H2Stream, data: bytes) -> bytes:
        """Send what the window lets through of ``data``; return the rest."""
        h2 = self.h2
        sid = stream.stream_id
        frame = h2.max_outbound_frame_size
        while data:
            try:
                window = h2.local_flow_control_window(sid)
            except (StreamClosedError, ProtocolError, KeyError):
                stream.reset = stream.closed = True
                return b""
            if window <= 0:
                return data
            n = min(window, frame, len(data))
            h2.send_data(sid, data[:n])
            data = data[n:]
        return data

    def _end_stream(self, stream: H2Stream, trailers: list[bytes] | None = None) -> None:
        """END_STREAM, on trailers (HEADERS) when there are some."""
        try:
            if trailers is None:
                self.h2.end_stream(stream.stream_id)
            else:
                self.h2.send_headers(stream.stream_id, [
                    (trailers[i].lower(), trailers[i + 2]) for i in range(0, len(trailers), 4)
                ], end_stream=True)
        except (StreamClosedError, ProtocolError, KeyError):
            stream.reset = True
        self._retire_stream(stream)

    def _window_opened(self, event: Any) -> None:
        sids = list(self.pending) if event.stream_id == 0 else [event.stream_id]
        for sid in sids:
            waiting = self.pending.get(sid)
            stream = self.streams.get(sid)
            if waiting is None or stream is None:
                continue
            data = b"".join(waiting[0])
            rest = self._send_window(stream, data)
            waiting[0] = [rest] if rest else []
            waiting[1] = len(rest)
            if rest:
                continue
            del self.pending[sid]
            self._stalled.pop(sid, None)
            if waiting[2] is True:
                self._end_stream(stream)
            elif waiting[2]:            # trailers
                self._end_stream(stream, waiting[2])
            else:
                ex = stream.exchange
                if ex is not None and ex.conn is not None and not self.write_paused:
                    ex.conn.resume_reading()

    def stream_done(self, stream: H2Stream) -> None:
        """The stream's exchange is over (its response handed to us, or failed)."""
        if stream.stream_id not in self.pending:
            self._retire_stream(stream)

    def _retire_stream(self, stream: H2Stream) -> None:
        sid = stream.stream_id
        ex = stream.exchange
        if ex is not None and not ex.request_complete and not stream.reset:
            # Answered before the client finished sending: tell it to stop.
            self.reset_stream(stream, NO_ERROR)
        if ex is not None and not ex.finished:
            return                      # (the exchange ends later: stream_done)
        self.streams.pop(sid, None)
        self._empty.pop(sid, None)
        self._stalled.pop(sid, None)
        if not self.streams:
            if self.draining:
                self._goaway(NO_ERROR)
            else:
                self._arm(self.site.idle_timeout)

    def reset_stream(self, stream: H2Stream, code: int) -> None:
        sid = stream.stream_id
        self.pending.pop(sid, None)
        if not stream.reset:
            stream.reset = True
            try:
                self.h2.reset_stream(sid, code)
            except (StreamClosedError, ProtocolError, KeyError):
                pass
            self._write()

    def _reset_by_client(self, event: Any) -> None:
        stream = self.streams.pop(event.stream_id, None)
        self.pending.pop(event.stream_id, None)
        if stream is None:
            return
        stream.reset = stream.closed = True
        ex = stream.exchange
        if ex is not None and not ex.finished:
            ex.abandon()
            self._premature += 1
            if self._premature > RAPID_RESETS and self._premature * 2 > self._opened:
                self._calm("rapid reset")
                return
        if not self.streams and not self.draining:
            self._arm(self.site.idle_timeout)

    def _watch_stalls(self) -> None:
        if len(self._stalled) == 1:
            self.loop.call_later(1.0, self._check_stalls)

    def _check_stalls(self) -> None:
        if self.closed or not self._stalled:
            return
        limit = self.loop.time() - self.site.idle_timeout
        for sid, since in list(self._stalled.items()):
            stream = self.streams.get(sid)
            if stream is not None and since < limit and sid in self.pending:
                del self._stalled[sid]
                ex = stream.exchange
                if ex is not None and not ex.finished:
                    ex.abandon()
                self.reset_stream(stream, CANCEL)
                self.streams.pop(sid, None)
        if self._stalled:
            self.loop.call_later(1.0, self._check_stalls)
