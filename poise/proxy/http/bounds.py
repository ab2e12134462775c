"""Where each request starts in the bytes a client sent.

llhttp tolerates repeated spaces in a request line and does not report offsets, so
the proxy finds each message's start itself: the first request of a read starts at
its beginning (after optional empty lines); a pipelined one starts where the previous
message ended — right after its head, its Content-Length body, or its last chunk and
trailers.  The canonical request line must stand exactly there.
"""

from __future__ import annotations

from typing import Final


class MessageBounds:
    """Tracks message boundaries across reads for one client connection."""

    __slots__ = ("buf", "pos", "head_buf", "body_start", "body_len", "scanner", "http11")

    def __init__(self) -> None:
        self.buf: bytes | bytearray = b""
        self.pos = 0            # where the next message starts in buf
        self.head_buf: bytearray | None = None   # a head spanning reads, from its read
        self.body_start = 0     # where the current message's body bytes start in buf
        self.body_len = 0       # de-chunked body bytes seen in buf (on_body)
        self.scanner: ChunkScanner | None = None
        self.http11 = True      # the version of the last head checked

    def read(self, data: bytes) -> None:
        """A new read is about to be parsed."""
        if self.head_buf is not None:
            self.head_buf += data
            self.buf = self.head_buf
        else:
            self.buf = data
            self.pos = self.body_start = self.body_len = 0

    def check_head(self, method: bytes, url: bytes, chunked: bool) -> int:
        """Check that the head just parsed begins, canonically, where the message
        starts and is HTTP/1.0 or 1.1 (sets ``http11``).  Returns the size of its header
        block (after the request line), or -1 when the request line is not canonical
        or the version is another one (the caller tells which)."""
        buf = self.buf
        pos = self.pos
        if buf[pos:pos + 1] == b"\r":          # empty lines before a request are allowed
            while buf.startswith(b"\r\n", pos):
                pos += 2
        # llhttp accepted "METHOD SP target SP HTTP/d.d CRLF" with no CR/LF inside but
        # tolerates runs of spaces; the line is canonical exactly when its CRLF is where
        # the canonical line's would be (the line cannot be longer and still hold one).
        end = pos + len(method) + len(url) + 12
        if len(buf) < end or buf[end - 2] != 13 or buf[end - 5] != 0x31:     # CR, major 1
            return -1
        minor = buf[end - 3]
        if minor == 0x31:
            self.http11 = True
        elif minor == 0x30:
            self.http11 = False
        else:
            return -1
        # llhttp accepted the head, so it ends at the first empty line.
        body_start = self.body_start = buf.find(b"\r\n\r\n", end - 2) + 4
        self.body_len = 0
        if chunked:
            self.scanner = ChunkScanner()
        return body_start - end - 2     # (the empty line ending the head not counted)

    def read_done(self, in_head: bool) -> None:
        """The read was parsed; keep it if a head continues into the next one."""
        if not in_head:
            self.head_buf = None
        elif self.head_buf is None:
            self.head_buf = bytearray(self.buf)
        if self.scanner is not None and self.body_start <= len(self.buf):
            self.scanner.feed(self.buf, self.body_start)    # chunked body continues

    def message_done(self) -> None:
        """The current message ended in this read: the next one starts after it."""
        if self.scanner is not None:
            end = self.scanner.feed(self.buf, self.body_start)
            self.scanner = None
            self.pos = end if end >= 0 else len(self.buf)
        else:
            self.pos = self.body_start + self.body_len

    @property
    def head_size(self) -> int:
        return len(self.buf) - self.pos


# ChunkScanner states.
_SIZE: Final = 0
_DATA: Final = 1
_TRAILER: Final = 2


class ChunkScanner:
    """Finds the end of a chunked body (last chunk and trailers) across reads.

    Runs only over bytes llhttp has already validated, so it need not re-check them;
    its cost is per chunk, not per byte."""

    __slots__ = ("_line", "_left", "_state")


    def __init__(self) -> None:
        self._line = b""
        self._left = 0
        self._state = _SIZE

    def feed(self, buf: bytes | bytearray, i: int) -> int:
        """Consume ``buf[i:]``; the offset just past the message's end, or -1."""
        n = len(buf)
        while i < n:
            if self._state == _DATA:
                take = min(self._left, n - i)
                i += take
                self._left -= take
                if not self._left:
                    self._state = _SIZE
                continue
            j = buf.find(b"\n", i)
            if j < 0:
                self._line += bytes(buf[i:])
                return -1
            line = (self._line + bytes(buf[i:j])).rstrip(b"\r")
            self._line = b""
            i = j + 1
            if self._state == _SIZE:
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size:
                    self._left = size + 2       # data and its CRLF
                    self._state = _DATA
                else:
                    self._state = _TRAILER
            elif not line:                      # the empty line after the trailers
                return i
        return -1
