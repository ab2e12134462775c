"""The access log writer: one thread per process doing every write, open and close of
the log files, in the order asked, so that a slow or stuck disk never stalls the loop.

The loop hands it whole buffers (:meth:`Writer.write`); it may fall at most
``max_queued_bytes`` behind, past which a buffer is dropped whole and its lines counted
in :attr:`Writer.dropped` (as are the lines of a ``write`` that fails, e.g. a full disk —
logged once per failure spell).  The thread starts with the first command, so a process
without access logs has none.  It does not survive ``fork``: make one per process.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import queue
import select
import stat
import threading
from typing import Any

log = logging.getLogger("poise.access_log")

STDOUT = "stdout"
# Writes of at most this many bytes to a pipe or FIFO are atomic (POSIX PIPE_BUF): whole
# lines from several workers sharing one (stdout) never interleave mid-line.
PIPE_BUF = select.PIPE_BUF
_OPEN_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC

# Commands.
_WRITE, _REOPEN, _CLOSE, _STOP = range(4)


class Sink:
    """One destination: a buffer filled on the loop, a descriptor used by the writer only."""

    __slots__ = ("path", "fd", "regular", "buf", "size", "closed", "failing")

    def __init__(self, path: str, fd: int) -> None:
        self.path = path            # STDOUT or an absolute path
        self.fd = fd
        # A regular file takes a whole buffer per write (O_APPEND makes it atomic); a pipe,
        # FIFO, socket or terminal takes pieces of whole lines of at most PIPE_BUF bytes.
        self.regular = fd < 0 or _is_regular(fd)
        self.buf: list[bytes] = []
        self.size = 0
        self.closed = False         # lines appended from now on are discarded
        self.failing = False        # the last write failed (logged once per failure spell)

    def __repr__(self) -> str:
        return f"<AccessLogSink {self.path} fd={self.fd} buffered={self.size}>"


def open_log_file(path: str) -> int:
    """Open ``path`` for appending (created 0644 if missing); raise OSError.

    ``O_NONBLOCK`` while opening makes a FIFO with no reader an error (ENXIO) instead of
    a hang; it is cleared after, so the writer thread's writes block as usual."""
    fd = os.open(path, _OPEN_FLAGS | os.O_NONBLOCK, 0o644)
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
    return fd


def open_error(path: str, e: OSError) -> str:
    """What went wrong opening ``path``, for a config error or a log line."""
    if e.errno == errno.ENOENT:
        return f"cannot open {path}: directory {os.path.dirname(path)} does not exist"
    if e.errno == errno.ENXIO:
        return f"cannot open {path}: a FIFO with no reader"
    return f"cannot open {path}: {e.strerror or e}"


class Writer:
    """A queue and the thread that empties it; every method is called from the loop."""

    def __init__(self, max_queued_bytes: int) -> None:
        self._max_queued = max_queued_bytes
        self._queue: queue.SimpleQueue[tuple[int, Any, Any]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()   # guards _queued and _dropped (loop and thread)
        self._queued = 0
        self._dropped = 0

    @property
    def dropped(self) -> int:
        """Lines lost: handed over while too far behind, or in a failed write."""
        return self._dropped

    @property
    def queued_bytes(self) -> int:
        """Bytes handed over and not yet written."""
        return self._queued

    @property
    def running(self) -> bool:
        return self._thread is not None

    def write(self, sink: Sink, chunk: list[bytes], size: int, force: bool = False) -> None:
        """Append ``chunk`` (``size`` bytes of whole lines) to ``sink``'s file — or drop it
        and count its lines when the writer is too far behind, unless ``force``."""
        with self._lock:
            if not force and self._queued + size > self._max_queued:
                self._dropped += len(chunk)
                return
            self._queued += size
        self._put(_WRITE, sink, chunk)

    def reopen(self, sink: Sink) -> None:
        """Reopen ``sink``'s file by path once what was handed over before is written."""
        self._put(_REOPEN, sink, None)

    def close(self, sink: Sink) -> None:
        """Close ``sink``'s file once what was handed over before is written."""
        self._put(_CLOSE, sink, None)

    async def stop(self) -> None:
        """Write everything handed over, then end the thread."""
        if self._thread is None:
            return
        done = asyncio.get_running_loop().create_future()
        self._put(_STOP, None, done)
        await done
        self._thread.join()
        self._thread = None

    def _put(self, op: int, sink: Sink | None, arg: Any) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="poise-access-log",
                                            daemon=True)
            self._thread.start()
        self._queue.put((op, sink, arg))

    # -- in the thread -------------------------------------------------------------------

    def _run(self) -> None:
        get, get_nowait = self._queue.get, self._queue.get_nowait
        item = None
        while True:
            op, sink, arg = item if item is not None else get()
            item = None
            if op == _WRITE:
                # Take every write already queued for this sink: one syscall for all, so
                # the writer keeps up even when it gets the GIL only now and then.
                while True:
                    try:
                        item = get_nowait()
                    except queue.Empty:
                        break
                    if item[0] != _WRITE or item[1] is not sink:
                        break
                    arg.extend(item[2])
                    item = None
                self._write(sink, arg)
            elif op == _REOPEN:
                _reopen(sink)
            elif op == _CLOSE:
                if sink.path != STDOUT:
                    _close(sink.fd)
            else:
                try:
                    arg.get_loop().call_soon_threadsafe(_resolve, arg)
                except RuntimeError:    # the loop is closed: nobody waits any more
                    pass
                return

    def _write(self, sink: Sink, chunk: list[bytes]) -> None:
        data = b"".join(chunk)
        try:
            if sink.regular or len(data) <= PIPE_BUF:
                _write_all(sink.fd, data)
            else:
                for piece in _pieces(chunk, PIPE_BUF):
                    _write_all(sink.fd, piece)
        except OSError as e:
            with self._lock:
                self._dropped += len(chunk)
            if not sink.failing:
                sink.failing = True
                log.error("access log %s: write failed, dropping lines until it works "
                          "again: %s", sink.path, e)
        else:
            if sink.failing:
                sink.failing = False
                log.warning("access log %s: writing again", sink.path)
        finally:
            with self._lock:
                self._queued -= len(data)


def _is_regular(fd: int) -> bool:
    try:
        return stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        return False


def _pieces(lines: list[bytes], limit: int) -> list[bytes]:
    """``lines`` joined into pieces of at most ``limit`` bytes (a longer line alone)."""
    pieces: list[bytes] = []
    piece: list[bytes] = []
    size = 0
    for line in lines:
        if piece and size + len(line) > limit:
            pieces.append(b"".join(piece))
            piece, size = [], 0
        piece.append(line)
        size += len(line)
    if piece:
        pieces.append(b"".join(piece))
    return pieces


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            # A descriptor someone else made non-blocking (stdout shared with a parent).
            select.select([], [fd], [], 1.0)
            continue
        view = view[n:]


def _reopen(sink: Sink) -> None:
    try:
        fd = open_log_file(sink.path)
    except OSError as e:
        log.error("access log: %s; still writing to the old file",
                  open_error(sink.path, e))
        return
    _close(sink.fd)
    sink.fd = fd
    sink.regular = _is_regular(fd)


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError as e:
        log.warning("access log: closing fd %d: %s", fd, e)


def _resolve(done: asyncio.Future[None]) -> None:
    if not done.done():    # stop() may have been cancelled (wait_for timed out)
        done.set_result(None)
