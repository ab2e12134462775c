"""Access logs of one process: which listener logs where, buffering and flushing.

Life of a line: :meth:`AccessLogger.log` formats it (:mod:`.access_format`) and appends it
to its sink's in-memory buffer — no I/O, no lock.  A sink's buffer is handed to the
writer thread (:mod:`.access_writer`) when it reaches ``flush_bytes`` (64 KiB) or when
the ``flush_interval`` timer (1 s) fires, whichever comes first; the thread does every
``write``/``open``/``close``, in order, so a slow or stuck disk never stalls a request.

Bounded memory: the writer may fall at most ``max_queued_bytes`` (16 MiB) behind.  A
buffer handed over beyond that is dropped whole and its lines counted in
:attr:`AccessLogs.dropped` (also lines lost to a failing ``write``, e.g. a full disk).
:meth:`AccessLogs.close` never drops: whatever is buffered at a graceful stop is written.

Files are opened ``O_WRONLY | O_APPEND | O_CREAT`` (mode 0644 before the umask), so
several workers may append to the same file, each buffer in one ``write`` of whole lines;
a pipe (``stdout`` is file descriptor 1, often one) gets whole lines in writes of at most
PIPE_BUF bytes, which are atomic.  Either way, lines of different workers never mix.

Everything here runs on the loop's thread; make one :class:`AccessLogs` per process,
after ``fork`` (its writer thread would not survive one).
"""

from __future__ import annotations

import asyncio
import os

from poise.config.model import Config
from poise.config.observability import AccessLog
from poise.errors import ConfigError
from poise.observability.access_format import AccessLogger
from poise.observability.access_writer import STDOUT, Sink, Writer, open_error, open_log_file

__all__ = ["AccessLogger", "AccessLogs", "check"]

FLUSH_BYTES = 64 * 1024
MAX_QUEUED_BYTES = 16 * 1024 * 1024


class AccessLogs:
    """Every access log of one process: one sink per destination path, shared by the
    listeners that name it.

    ``flush_interval`` (seconds, default 1.0): the longest a line waits in memory;
    ``flush_bytes`` (64 KiB): a sink's buffer is handed to the writer at this size;
    ``max_queued_bytes`` (16 MiB): how far the writer may fall behind before lines are
    dropped (counted in :attr:`dropped`)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, flush_interval: float = 1.0, *,
                 flush_bytes: int = FLUSH_BYTES,
                 max_queued_bytes: int = MAX_QUEUED_BYTES) -> None:
        self._loop = loop
        self._interval = flush_interval
        self._flush_bytes = flush_bytes
        self._writer = Writer(max_queued_bytes)
        self._sinks: dict[str, Sink] = {}
        self._loggers: dict[str, AccessLogger] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        # Where a listener's logger points once its log is turned off: discards lines.
        self._off = Sink("off", -1)
        self._off.closed = True

    @property
    def dropped(self) -> int:
        """Lines lost since start: the writer was too far behind, or a write failed."""
        return self._writer.dropped

    @property
    def queued_bytes(self) -> int:
        """Bytes handed to the writer and not yet written."""
        return self._writer.queued_bytes

    def __repr__(self) -> str:
        return (f"<AccessLogs sinks={sorted(self._sinks)} listeners={sorted(self._loggers)} "
                f"queued={self.queued_bytes} dropped={self.dropped}>")

    def configure(self, config: Config) -> None:
        """(Re)build the logs from ``config``; raise :class:`ConfigError` (and change
        nothing) when a file cannot be opened, e.g. its directory does not exist.

        A listener's log is its ``access_log`` when that is a mapping, none when it is
        ``false``, else the top-level ``access_log`` (none when absent).  Sinks are kept by
        path across calls, so a reload keeps a file open; sinks no longer used are flushed
        and closed; a changed format applies from the next line.  The same
        :class:`AccessLogger` is kept for a listener whose log stays on (updated in place);
        one whose log is turned off or removed discards its lines from now on.  Opening a
        new file happens here, on the calling thread (at start and reload only)."""
        if self._closed:
            raise RuntimeError("AccessLogs is closed")
        wanted, fields = _wanted(config)
        self._sinks.update(self._open_new(fields))
        for name, (chosen, key) in wanted.items():
            logger = self._loggers.get(name)
            if logger is None:
                self._loggers[name] = AccessLogger(name, chosen.format, self._sinks[key],
                                                   self._flush, self._flush_bytes)
            else:
                logger._use(chosen.format, self._sinks[key])
        for name in [n for n in self._loggers if n not in wanted]:
            self._loggers.pop(name)._use("json", self._off)
        used = {key for _, key in wanted.values()}
        for key in [k for k in self._sinks if k not in used]:
            self._retire(self._sinks.pop(key))
        if self._sinks and self._timer is None:
            self._timer = self._loop.call_later(self._interval, self._tick)
        elif not self._sinks and self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _open_new(self, fields: dict[str, str]) -> dict[str, Sink]:
        opened: dict[str, Sink] = {}
        errors: list[tuple[str, str]] = []
        for key, field in fields.items():
            if key in self._sinks:
                continue
            if key == STDOUT:
                opened[key] = Sink(STDOUT, 1)
                continue
            try:
                opened[key] = Sink(key, open_log_file(key))
            except OSError as e:
                errors.append((field, open_error(key, e)))
        if errors:
            for sink in opened.values():
                if sink.path != STDOUT:
                    os.close(sink.fd)
            raise ConfigError(errors)
        return opened

    def for_listener(self, name: str) -> AccessLogger | None:
        """The access log of listener ``name``; None when it has none."""
        return self._loggers.get(name)

    def _tick(self) -> None:
        for sink in self._sinks.values():
            if sink.size:
                self._flush(sink)
        self._timer = self._loop.call_later(self._interval, self._tick)

    def _flush(self, sink: Sink, force: bool = False) -> None:
        """Hand ``sink``'s buffer to the writer (which drops it when too far behind,
        unless ``force``); a closed sink's lines are discarded."""
        chunk, size = sink.buf, sink.size
        sink.buf = []
        sink.size = 0
        if chunk and not sink.closed:
            self._writer.write(sink, chunk, size, force)

    def _retire(self, sink: Sink) -> None:
        self._flush(sink, force=True)
        sink.closed = True
        self._writer.close(sink)

    def reopen(self) -> None:
        """Reopen every log file by path (SIGUSR1, after logrotate renamed them).

        Lines logged before the call go to the old file, lines after it to the new one.
        The open happens in the writer thread; if it fails (logged), the old file is kept.
        A ``stdout`` log is only flushed."""
        for sink in self._sinks.values():
            self._flush(sink, force=True)
            if sink.path != STDOUT:
                self._writer.reopen(sink)

    async def close(self) -> None:
        """Write everything buffered, close every file and stop the writer thread.

        Waits for the writer, which may take long on a stuck disk: bound it with
        ``asyncio.wait_for`` if needed (the thread is a daemon).  Lines logged after
        this are discarded; ``configure`` raises RuntimeError."""
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for sink in self._sinks.values():
            self._retire(sink)
        self._sinks.clear()
        for logger in self._loggers.values():
            logger._use(logger.format, self._off)
        self._loggers.clear()
        await self._writer.stop()


def check(config: Config) -> list[tuple[str, str]]:
    """The problems :meth:`AccessLogs.configure` would raise for ``config``, as
    ``(field, message)`` pairs, found by opening (and so creating) each log file and
    closing it again — for the control plane to reject a reload before any worker sees
    it, and for ``poise check``.  No thread, no loop."""
    errors = []
    for key, field in _wanted(config)[1].items():
        if key == STDOUT:
            continue
        try:
            os.close(open_log_file(key))
        except OSError as e:
            errors.append((field, open_error(key, e)))
    return errors


def _wanted(config: Config) -> tuple[dict[str, tuple[AccessLog, str]], dict[str, str]]:
    """Each listener's log and sink key; each sink key and the first field naming it."""
    wanted: dict[str, tuple[AccessLog, str]] = {}
    fields: dict[str, str] = {}
    for i, listener in enumerate(config.listeners):
        chosen = listener.access_log
        field = f"listeners[{i}].access_log.path"
        if chosen is False:
            continue
        if chosen is None:
            chosen, field = config.access_log, "access_log.path"
            if chosen is None:
                continue
        key = STDOUT if chosen.path == STDOUT else os.path.abspath(chosen.path)
        wanted[listener.name] = (chosen, key)
        fields.setdefault(key, field)
    return wanted, fields
