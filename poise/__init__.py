"""poise — a load balancer on uvloop + httptools."""

import os
import sys
from importlib.machinery import SOURCE_SUFFIXES, FileFinder, SourceFileLoader

__version__ = "0.1.0"


class _SourcesFirst:
    """Finds poise's modules as .py files even where a compiled module (mypyc, see
    setup.py) sits next to them."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if not name.startswith("poise.") or not path:
            return None
        for entry in path:
            spec = FileFinder(entry, (SourceFileLoader, SOURCE_SUFFIXES)).find_spec(name)
            if spec is not None:
                return spec
        return None


# POISE_INTERPRETED=1 runs the interpreted hot path although a compiled one is
# installed: for debugging and profiling with Python tools, and to test the fallback.
if os.environ.get("POISE_INTERPRETED") == "1" and _SourcesFirst not in sys.meta_path:
    sys.meta_path.insert(0, _SourcesFirst)


def hot_path() -> str:
    """"compiled" when the HTTP hot path runs as mypyc-built C extensions, else
    "interpreted"."""
    from poise.proxy.http import protocol

    return "interpreted" if protocol.__file__.endswith(".py") else "compiled"
