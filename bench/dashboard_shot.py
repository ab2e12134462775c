"""Take the README's screenshot of the live dashboard (docs/img/dashboard.png).

Starts demo backends of different latencies (poise.demo.backend), a poise with two
listeners and two clusters (one backend of which nobody listens on, so that it shows
down), two workers and an admin token; sends traffic for ``--seconds`` (a load step
at 40%, a backend drained at 70%, a trickle of 500s on the api cluster) with the
dashboard open in the system's Chromium (through Playwright), then saves a screenshot
of it.

    .venv/bin/python bench/dashboard_shot.py [--seconds 240] [--out docs/img/dashboard.png]
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from playwright.sync_api import sync_playwright  # noqa: E402

from poise.demo.backend import start_backend  # noqa: E402
from tests.support.admin import AdminClient  # noqa: E402
from tests.support.waiting import wait_for  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
TOKEN = "screenshot-token"
# (cluster, name, base latency in seconds)
BACKENDS = [("app", "alpha", 0.002), ("app", "beta", 0.004), ("app", "gamma", 0.012),
            ("api", "delta", 0.003), ("api", "epsilon", 0.025)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_backends() -> dict[str, str]:
    """The demo backends on a loop of their own thread; name → address."""
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    addresses = {}
    for i, (_, name, latency) in enumerate(BACKENDS):
        server = asyncio.run_coroutine_threadsafe(
            start_backend(name, "127.0.0.1", 0, latency, seed=i), loop).result(5)
        addresses[name] = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    return addresses


class Traffic:
    """``connections`` keep-alive clients, each sending ``GET target`` to ``port`` with
    ``pause`` seconds between requests, until :meth:`stop`."""

    def __init__(self, port: int, connections: int, pause: float, target: str = "/") -> None:
        self.running = True
        self.threads = [threading.Thread(target=self._client, args=(port, pause, target),
                                         daemon=True) for _ in range(connections)]
        for thread in self.threads:
            thread.start()

    def _client(self, port: int, pause: float, target: str) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        while self.running:
            try:
                conn.request("GET", target)
                conn.getresponse().read()
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            time.sleep(pause)
        conn.close()

    def stop(self) -> None:
        self.running = False
        for thread in self.threads:
            thread.join(10)


def config(addresses: dict[str, str], web: int, api: int, admin: int) -> str:
    def members(cluster: str) -> str:
        return "\n".join(f"      - address: {addresses[name]}"
                         for c, name, _ in BACKENDS if c == cluster)
    return f"""workers: 2
admin: {{bind: "127.0.0.1:{admin}", token: {TOKEN}}}
listeners:
  - {{name: web, bind: "127.0.0.1:{web}", routes: [{{cluster: app}}]}}
  - {{name: api, bind: "127.0.0.1:{api}", routes: [{{cluster: api}}]}}
clusters:
  - name: app
    policy: round_robin
    health_check: {{path: /, interval: 1s, timeout: 500ms}}
    backends:
{members("app")}
      - address: 127.0.0.1:{free_port()}
  - name: api
    policy: least_conn
    backends:
{members("api")}
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=240.0)
    parser.add_argument("--out", default=str(ROOT / "docs/img/dashboard.png"))
    args = parser.parse_args()
    addresses = start_backends()
    web, api, admin = free_port(), free_port(), free_port()
    workdir = Path(tempfile.mkdtemp(prefix="poise-shot-"))
    path = workdir / "poise.yaml"
    path.write_text(config(addresses, web, api, admin))
    log = open(workdir / "poise.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "poise", "run", str(path)], cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT)
    client = AdminClient(("127.0.0.1", admin), TOKEN)
    loads: list[Traffic] = []
    try:
        def ready() -> bool:
            try:
                return all(w["state"] == "running" for w in client.get("/workers").json()
                           ["workers"]) and len(client.get("/workers").json()["workers"]) == 2
            except (OSError, ValueError, KeyError):
                return False
        wait_for(ready, 30, "poise to start")
        started = time.monotonic()
        loads.append(Traffic(web, connections=3, pause=0.01))
        loads.append(Traffic(api, connections=2, pause=0.02))
        loads.append(Traffic(api, connections=1, pause=0.3, target="/status/500"))
        gamma = "/clusters/app/backends/" + addresses["gamma"]
        with sync_playwright() as playwright:
            # The browser starts early: its start-up costs CPU, which shows in latency.
            browser = playwright.chromium.launch(executable_path=CHROMIUM)
            page = open_dashboard(browser, f"http://127.0.0.1:{admin}/")
            steps = [(0.4, lambda: loads.append(Traffic(web, connections=3, pause=0.01))),
                     (0.7, lambda: client.post(gamma + "/drain")),
                     (1.0, lambda: None)]
            for at, step in steps:
                time.sleep(max(0.0, started + at * args.seconds - time.monotonic()))
                step()
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=args.out, full_page=True)
            browser.close()
        print(f"saved {args.out}")
        return 0
    finally:
        for load in loads:
            load.stop()
        proc.terminate()
        proc.wait(30)
        log.close()


def open_dashboard(browser, url: str):
    """A tab on the dashboard, past the token form, showing data."""
    # (the height fits the content: the screenshot is of the whole page)
    page = browser.new_page(viewport={"width": 1440, "height": 600}, device_scale_factor=1)
    page.goto(url)
    page.get_by_label("Token").fill(TOKEN)
    page.get_by_role("button", name="Show the dashboard").click()
    page.locator("#clusters tr[data-key]").first.wait_for()
    return page

if __name__ == "__main__":
    sys.exit(main())
