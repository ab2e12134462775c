"""The worker side of the channel: what a WorkerAgent does with the control plane's
messages, on a real event loop (listeners bound on free loopback ports)."""

from __future__ import annotations

import asyncio
import socket

import pytest

from poise.config import parse_config
from poise.config.model import Config
from poise.control.agent import WorkerAgent, apply_message
from poise.control.state import ClusterState, members_of
from poise.core.health import HealthFlag

BASE = """
listeners:
  - {name: web, bind: "127.0.0.1:PORT1", routes: [{cluster: app}]}
clusters:
  - name: app
    backends: [{address: "127.0.0.1:9001"}, {address: "127.0.0.1:9002"}]
"""

COMPLEX = """
workers: 2
drain_timeout: 7.5s
admin: {bind: "[::1]:9901", token: abc}
listeners:
  - name: web
    bind: 127.0.0.1:8080
    max_request_body: 1MiB
    routes:
      - match: {host: "*.example.com", path_prefix: /api/, methods: [get], headers: {x-a: b}}
        cluster: api
      - cluster: app
clusters:
  - name: app
    policy: {type: hash, key: "header:x-user", algorithm: maglev, bounded_load: 1.25}
    health_check: {path: /h, interval: 300ms, timeout: 100ms, jitter: 12.5%,
                   expect_status: [200, "300-399", 5xx]}
    outlier_detection: {consecutive_gateway_errors: 3, failure_statuses: [500, 503],
                        max_ejection_percent: 33.3%}
    retries: {attempts: 3, retry_on: [reset, 503], backoff: "10ms..100ms", budget: 150%,
              per_try_timeout: 0.1}
    panic_threshold: 20%
    request_timeout: 1s
    max_connections: 10
    max_pending: 5
    backends:
      - {address: 127.0.0.1:9001, weight: 3, max_connections: 2}
      - {address: "[::1]:9002", backup: true}
  - name: api
    policy: {type: sticky, secret: "0123456789abcdef0123", cookie: sid}
    backends: [{address: 127.0.0.1:9101}]
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base(extra_listener: str = "", extra_cluster: str = "") -> Config:
    text = BASE.replace("PORT1", str(free_port()))
    text = text.replace("clusters:", extra_listener + "clusters:" + extra_cluster, 1)
    return parse_config(text)


def test_a_config_survives_the_wire_unchanged():
    # Workers re-validate what the control plane dumps; a difference would make every
    # worker reconfigure clusters that did not change.
    config = parse_config(COMPLEX)
    message = apply_message(1, config, [])
    assert Config.model_validate(message["config"]) == config


@pytest.fixture
def agent():
    loop = asyncio.get_event_loop_policy().new_event_loop()
    agent = WorkerAgent(loop)
    yield agent
    if agent.server is not None:
        loop.run_until_complete(agent.server.shutdown(0))
    loop.close()


def settle(agent: WorkerAgent) -> None:
    agent.loop.run_until_complete(asyncio.sleep(0.05))


def test_the_first_message_builds_the_data_plane_with_the_views(agent):
    config = base()
    state = ClusterState("app", members_of(config.clusters[0]))
    state.set_drained(("127.0.0.1", 9001), True)
    server = agent.build(apply_message(1, config, [state.view]))
    runtime = server.clusters["app"]
    a, b = runtime.health.snapshot.backends
    assert runtime.health.flags(a) == HealthFlag.DRAINED
    assert agent.status() == {"config_version": 1, "snapshot_versions": {"app": 2}}


def test_views_apply_in_order_and_a_known_version_is_skipped(agent):
    config = base()
    state = ClusterState("app", members_of(config.clusters[0]))
    server = agent.build(apply_message(1, config, [state.view]))
    applied = []
    agent._on_applied = applied.append
    state.set_down(("127.0.0.1", 9002), True)
    down = state.view
    state.set_down(("127.0.0.1", 9002), False)
    agent.receive(apply_message(1, None, [down]))
    agent.receive(apply_message(1, None, [state.view]))
    agent.receive(apply_message(1, None, [down]))       # stale: same version as applied
    settle(agent)
    runtime = server.clusters["app"]
    b = runtime.health.snapshot.backends[1]
    assert [s["snapshot_versions"]["app"] for s in applied] == [2, 3, 3]
    assert runtime.health.flags(b) == HealthFlag(0)


def test_a_config_message_adds_a_cluster_and_a_listener(agent):
    config = base()
    server = agent.build(apply_message(1, config, [ClusterState(
        "app", members_of(config.clusters[0])).view]))
    agent.loop.run_until_complete(server.start(reuse_port=False))
    newer = base(f"""  - {{name: api, bind: "127.0.0.1:{free_port()}", routes: [{{cluster: api}}]}}
""", """
  - name: api
    backends: [{address: "127.0.0.1:9201"}]""")
    newer = newer.model_copy(update={"listeners": [config.listeners[0], newer.listeners[1]]})
    views = [ClusterState(c.name, members_of(c)).view for c in newer.clusters]
    agent.receive(apply_message(2, newer, views))
    settle(agent)
    assert set(server.clusters) == {"app", "api"}
    assert len(server.servers) == 2
    assert agent.config_version == 2
