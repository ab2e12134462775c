"""What the etcd and Consul registrars share: register, then renew every ``interval``
on a daemon thread until stopped, with failures logged once per change of state."""

from __future__ import annotations

import logging
import threading

log = logging.getLogger("poise")


class Heartbeats:
    """A registration kept alive by a thread.  Subclasses give ``kind`` and ``label``
    (for logs), set ``interval`` and implement :meth:`_register` (write the entry;
    raises when the registry refuses or cannot be reached) and :meth:`_heartbeat` (one
    renewal; registers again itself when the registry has forgotten the entry)."""

    kind = "registry"
    label = ""
    interval = 1.0

    def __init__(self) -> None:
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Register and start the heartbeats; raises what :meth:`_register` raises."""
        if self._thread is not None:
            raise RuntimeError("already started")
        self._register()
        self._stopping.clear()
        self._thread = threading.Thread(target=self._beat, daemon=True,
                                        name=f"{self.kind}-heartbeat:{self.label}")
        self._thread.start()

    def abandon(self) -> None:
        """Stop the heartbeats only: the entry stays until its TTL runs out, as when the
        process is killed (for tests, and for handing an entry over)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _register(self) -> None:
        raise NotImplementedError

    def _heartbeat(self) -> None:
        raise NotImplementedError

    def _beat(self) -> None:
        failing = False
        while not self._stopping.wait(self.interval):
            try:
                self._heartbeat()
                if failing:
                    log.info("%s: heartbeats of %s are going through again", self.kind,
                             self.label)
                failing = False
            except Exception as e:  # noqa: BLE001 (the thread must outlive any failure)
                if not failing:
                    log.warning("%s: heartbeat of %s failed (%s); retrying every %.1fs",
                                self.kind, self.label, e, self.interval)
                failing = True
