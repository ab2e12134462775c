"""Active health checks (HTTP and TCP): the prober side of poise's health system.

:class:`HealthChecker` probes backends on timers and feeds each result into a
:class:`poise.core.health.RiseFall`; decisions stay there, this package only probes
and reports flips::

    checker = HealthChecker(CheckSettings(path="/healthz"), backends, on_change,
                            loop=loop)
    checker.start()
"""

from poise.checks.checker import PROBES, HealthChecker
from poise.checks.settings import CheckSettings

__all__ = ["PROBES", "CheckSettings", "HealthChecker"]
