"""Build poise, compiling its HTTP hot path to C with mypyc when it can.

The modules in HOT_PATH are plain, strictly typed Python.  mypyc turns each into a C
extension (same behaviour, about 40% less CPU per request: bench/micro_proxy.py); the
interpreted modules stay the reference and the fallback:

- POISE_PURE=1 at install time skips compiling;
- a machine without a C compiler gets a warning and the interpreted modules;
- POISE_INTERPRETED=1 at run time ignores compiled modules (see poise/__init__.py).

Everything else (metadata, dependencies) is in pyproject.toml.
"""

import os

from setuptools import Extension, setup

HOT_PATH = [
    "poise/core/backend_stats.py",
    "poise/core/policies/rotation.py",
    "poise/core/ratelimit.py",
    "poise/observability/access_format.py",
    "poise/proxy/deadline.py",
    "poise/proxy/http/accounting.py",
    "poise/proxy/http/bounds.py",
    "poise/proxy/http/cluster.py",
    "poise/proxy/http/downstream.py",
    "poise/proxy/http/errors.py",
    "poise/proxy/http/h2stream.py",
    "poise/proxy/http/exchange.py",
    "poise/proxy/http/heads.py",
    "poise/proxy/http/headers.py",
    "poise/proxy/http/limiting.py",
    "poise/proxy/http/pool.py",
    "poise/proxy/http/protocol.py",
    "poise/proxy/http/reading.py",
    "poise/proxy/http/request.py",
    "poise/proxy/http/resilience.py",
    "poise/proxy/http/router.py",
    "poise/proxy/http/site.py",
    "poise/proxy/http/upgrade.py",
    "poise/proxy/http/upstream.py",
    "poise/proxy/http/writer.py",
]


def hot_path_extensions() -> list:
    if os.environ.get("POISE_PURE") == "1":
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        print("poise: mypyc is not available, the hot path stays interpreted")
        return []
    extensions = mypycify(["--ignore-missing-imports", "--follow-imports=silent", *HOT_PATH],
                          opt_level="3", group_name="poise_hotpath")
    for extension in extensions:
        extension.optional = True   # no C compiler: install the interpreted modules
    return extensions


def head_parser_extension() -> list:
    """The one-call HTTP/1.x head parser (poise/proxy/http/h1head.c): optional, like
    the compiled hot path (without it httptools parses every message)."""
    if os.environ.get("POISE_PURE") == "1":
        return []
    return [Extension("poise.proxy.http._h1head", ["poise/proxy/http/h1head.c"],
                      extra_compile_args=["-O2"], optional=True)]


setup(ext_modules=hot_path_extensions() + head_parser_extension())
