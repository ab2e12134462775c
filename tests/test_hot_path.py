"""The compiled hot path (setup.py builds it with mypyc): what runs is what the sources
say, and POISE_INTERPRETED=1 really runs the interpreted modules."""

from __future__ import annotations

import ast
import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import poise

ROOT = Path(__file__).resolve().parent.parent


def hot_path_sources() -> list[str]:
    """setup.py's HOT_PATH list, read without running setup.py."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and node.targets[0].id == "HOT_PATH":
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no HOT_PATH")


def module_of(source: str):
    return importlib.import_module(source.removesuffix(".py").replace("/", "."))


def test_every_hot_path_module_exists_and_is_in_the_package():
    for source in hot_path_sources():
        assert (ROOT / source).is_file(), source
        assert source.startswith("poise/"), source


@pytest.mark.skipif(poise.hot_path() == "interpreted", reason="hot path not compiled here")
def test_compiled_modules_are_built_from_the_current_sources():
    # An editable install compiles in place: a source edited after the build would
    # otherwise be silently ignored (make install rebuilds when one changes).
    for source in hot_path_sources():
        module = module_of(source)
        compiled = Path(module.__file__)
        assert compiled.suffix == ".so", f"{source} is not compiled ({compiled.name})"
        assert compiled.stat().st_mtime >= (ROOT / source).stat().st_mtime, \
            f"{compiled.name} is older than {source}: run `make install`"


@pytest.mark.skipif(os.environ.get("POISE_INTERPRETED") == "1" or
                    os.environ.get("POISE_PURE") == "1" or shutil.which("cc") is None,
                    reason="the interpreted hot path is asked for, or no C compiler")
def test_the_hot_path_is_compiled_where_a_compiler_is():
    assert poise.hot_path() == "compiled"


def test_poise_interpreted_runs_the_sources():
    code = ("import poise, importlib; "
            "mods = [importlib.import_module(m) for m in %r]; "
            "print(poise.hot_path(), all(m.__file__.endswith('.py') for m in mods))"
            % [s.removesuffix(".py").replace("/", ".") for s in hot_path_sources()])
    env = {**os.environ, "POISE_INTERPRETED": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == ["interpreted", "True"]


@pytest.mark.skipif(poise.hot_path() == "interpreted", reason="hot path not compiled here")
def test_the_c_head_parser_is_built_from_the_current_source():
    from poise.proxy.http import fasthead

    assert fasthead.parse_request is not None, "poise/proxy/http/h1head.c was not built"
    built = Path(importlib.import_module("poise.proxy.http._h1head").__file__)
    source = ROOT / "poise/proxy/http/h1head.c"
    assert built.stat().st_mtime >= source.stat().st_mtime, \
        f"{built.name} is older than {source.name}: run `make install`"


def test_poise_interpreted_parses_with_httptools_only():
    code = ("from poise.proxy.http import fasthead; "
            "print(fasthead.parse_request is None and fasthead.parse_response is None)")
    env = {**os.environ, "POISE_INTERPRETED": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == ["True"]
