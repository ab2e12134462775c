"""The control plane and a discovery source, without workers: what a source yields
is the membership, and a reload that keeps the source keeps its set — an empty one
included (regression: an empty set fell back to the seed backends on reload)."""

from __future__ import annotations

import asyncio

from poise.config.load import load_config
from poise.control.plane import ControlPlane

CONFIG = """
drain_timeout: {drain}
listeners: [{{name: web, bind: "127.0.0.1:1", routes: [{{cluster: app}}]}}]
clusters:
  - name: app
    backends: [{{address: "127.0.0.1:9009"}}]
    discovery: {{type: file, path: "{path}", poll_interval: 20ms}}
"""


async def until(predicate, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_a_reload_keeps_the_discovered_set_even_when_it_is_empty(tmp_path):
    backends = tmp_path / "backends.yaml"
    backends.write_text("- {address: '127.0.0.1:9001'}\n")
    config_path = tmp_path / "poise.yaml"
    config_path.write_text(CONFIG.format(drain="30s", path=backends))
    plane = ControlPlane(load_config(config_path), str(config_path),
                         asyncio.get_running_loop())

    def addresses() -> list[str]:
        return [m.address for m in plane.states["app"].view.members]
    plane.start()
    try:
        await until(lambda: addresses() == ["127.0.0.1:9001"])
        config_path.write_text(CONFIG.format(drain="20s", path=backends))
        assert plane.reload().applied
        assert addresses() == ["127.0.0.1:9001"]        # not the seed 9009
        backends.write_text("[]\n")
        await until(lambda: addresses() == [])
        config_path.write_text(CONFIG.format(drain="10s", path=backends))
        assert plane.reload().applied
        assert addresses() == []
    finally:
        plane.stop()
