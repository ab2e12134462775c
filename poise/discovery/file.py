"""The ``file`` source: a YAML or JSON list of ``{address, weight, zone, metadata}``.

The file is read at start and again whenever it changes: watchfiles tells when it is
installed (the ``[watch]`` extra), otherwise its size, modification time and inode are
polled every ``poll_interval``.  A file that cannot be read or parsed (half-written, a
syntax error, not a list) fails the watch: the runner keeps the last set and tries again.
An entry that is invalid is skipped with a warning naming it (``path[index]``).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import yaml

from poise.config.discovery import FileDiscovery
from poise.discovery.base import Instance, parse_entry


class FileSource:
    def __init__(self, spec: FileDiscovery) -> None:
        self.path = spec.path
        self.poll_interval = spec.poll_interval

    async def watch(self) -> AsyncIterator[list[Instance]]:
        seen = _stamp(self.path)
        yield self.read()
        while True:
            await self._changed(seen)
            seen = _stamp(self.path)
            yield self.read()

    def read(self) -> list[Instance]:
        """The instances the file lists now; raises when it cannot be read or parsed."""
        try:
            with open(self.path, encoding="utf-8") as f:
                data = yaml.safe_load(f)        # (JSON is YAML)
        except OSError as e:
            raise OSError(f"cannot read {self.path}: {e.strerror or e}") from None
        except yaml.YAMLError as e:
            raise ValueError(f"{self.path} is not valid YAML/JSON: {e}") from None
        if data is None:
            data = []
        if not isinstance(data, list):
            raise ValueError(f"{self.path} must hold a list of backends")
        found = (parse_entry(entry, f"{self.path}[{i}]") for i, entry in enumerate(data))
        return [instance for instance in found if instance is not None]

    async def _changed(self, seen: tuple[int, int, int] | None) -> None:
        """Return once the file looks different from ``seen``."""
        try:
            from watchfiles import awatch
        except ImportError:
            awatch = None
        if awatch is not None:
            folder = os.path.dirname(os.path.abspath(self.path))
            async for _ in awatch(folder, debounce=50, step=50):
                if _stamp(self.path) != seen:
                    return
        while _stamp(self.path) == seen:
            await asyncio.sleep(self.poll_interval)


def _stamp(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)
