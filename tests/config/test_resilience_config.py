"""Health checks, outlier detection, panic threshold, connection limits, retries and
request deadlines in the configuration (poise.config.model / load)."""

import textwrap

import pytest
from click.testing import CliRunner

from poise.cli import cli
from poise.config import parse_config
from poise.config.model import Backoff, HealthCheck, OutlierDetection, Retries
from poise.errors import ConfigError


def errors_of(text: str, fmt: str = "yaml") -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, fmt)
    return info.value.errors


def config(cluster_extra: str = "", backend_extra: str = "") -> str:
    """A valid config with lines spliced into its cluster and its first backend."""
    return ("listeners:\n  - name: web\n    bind: 127.0.0.1:8080\n"
            "    routes:\n      - cluster: app\n"
            "clusters:\n  - name: app\n"
            + textwrap.indent(textwrap.dedent(cluster_extra), "    ")
            + "    backends:\n      - address: 127.0.0.1:9001\n"
            + textwrap.indent(textwrap.dedent(backend_extra), "        ")
            + "      - address: 127.0.0.1:9002\n")


def cluster_of(cluster_extra: str = "", backend_extra: str = ""):
    return parse_config(config(cluster_extra, backend_extra)).clusters[0]


# -- defaults -------------------------------------------------------------------------------


def test_minimal_config_has_every_feature_off_or_at_its_default():
    cluster = cluster_of()
    assert cluster.health_check is None
    assert cluster.outlier_detection is None
    assert cluster.panic_threshold == 0.5
    assert cluster.max_connections is None
    assert cluster.max_pending is None
    assert cluster.queue_timeout == 1.0
    assert cluster.max_requests is None
    assert cluster.max_retries is None
    assert cluster.retries is None
    assert cluster.request_timeout is None
    assert [b.max_connections for b in cluster.backends] == [None, None]


def test_health_check_defaults():
    cluster = cluster_of("health_check: {}\n")
    assert cluster.health_check == HealthCheck()
    hc = cluster.health_check
    assert (hc.type, hc.path, hc.method, hc.host) == ("http", "/health", "GET", None)
    assert hc.expect_status == ((200, 399),)
    assert hc.expect_body is None
    assert (hc.interval, hc.timeout, hc.jitter) == (2.0, 1.0, 0.10)
    assert (hc.rise, hc.fall) == (2, 3)


def test_outlier_detection_defaults():
    od = cluster_of("outlier_detection: {}\n").outlier_detection
    assert od == OutlierDetection()
    assert (od.consecutive_failures, od.consecutive_gateway_errors) == (5, 5)
    assert od.failure_statuses == ((500, 599),)
    assert (od.base_ejection_time, od.max_ejection_time) == (30.0, 300.0)
    assert od.max_ejection_percent == 0.5


def test_retries_defaults():
    retries = cluster_of("retries: {}\n").retries
    assert retries == Retries()
    assert retries.attempts == 2
    assert retries.retry_on == ["connect_failure", "reset", "timeout", 502, 503, 504]
    assert retries.per_try_timeout is None
    assert retries.backoff == Backoff(base=0.025, max=0.25)
    assert retries.budget == 0.2
    assert retries.min_per_second == 10.0
    assert retries.retry_non_idempotent is False
    assert retries.max_buffered_body == 64 * 1024


def test_default_retry_on_is_not_shared():
    assert Retries().retry_on is not Retries().retry_on


# -- a full example, in YAML and in TOML ----------------------------------------------------

FULL_YAML = """\
listeners:
  - name: web
    bind: 127.0.0.1:8080
    routes:
      - cluster: app
clusters:
  - name: app
    health_check:
      type: http
      path: /ready
      method: head
      host: app.internal
      expect_status: [200, "204-206", 3xx]
      expect_body: ok
      interval: 5s
      timeout: 500ms
      jitter: 20%
      rise: 3
      fall: 2
    outlier_detection:
      consecutive_failures: 7
      consecutive_gateway_errors: 3
      failure_statuses: [5xx, 429]
      base_ejection_time: 10s
      max_ejection_time: 2m
      max_ejection_percent: 30%
    panic_threshold: 25%
    max_connections: 100
    max_pending: 50
    queue_timeout: 250ms
    max_requests: 1000
    max_retries: 3
    retries:
      attempts: 3
      retry_on: [connect_failure, timeout, "503", 502]
      per_try_timeout: 2s
      backoff: 10ms..1s
      budget: 12.5%
      min_per_second: 2.5
      retry_non_idempotent: true
      max_buffered_body: 1MiB
    request_timeout: 10s
    backends:
      - address: 127.0.0.1:9001
        max_connections: 20
      - address: 127.0.0.1:9002
"""

FULL_TOML = """\
[[listeners]]
name = "web"
bind = "127.0.0.1:8080"
routes = [{ cluster = "app" }]

[[clusters]]
name = "app"
panic_threshold = "25%"
max_connections = 100
max_pending = 50
queue_timeout = "250ms"
max_requests = 1000
max_retries = 3
request_timeout = "10s"
backends = [
  { address = "127.0.0.1:9001", max_connections = 20 },
  { address = "127.0.0.1:9002" },
]

[clusters.health_check]
type = "http"
path = "/ready"
method = "head"
host = "app.internal"
expect_status = [200, "204-206", "3xx"]
expect_body = "ok"
interval = "5s"
timeout = "500ms"
jitter = "20%"
rise = 3
fall = 2

[clusters.outlier_detection]
consecutive_failures = 7
consecutive_gateway_errors = 3
failure_statuses = ["5xx", 429]
base_ejection_time = "10s"
max_ejection_time = "2m"
max_ejection_percent = "30%"

[clusters.retries]
attempts = 3
retry_on = ["connect_failure", "timeout", "503", 502]
per_try_timeout = "2s"
backoff = { base = "10ms", max = "1s" }
budget = "12.5%"
min_per_second = 2.5
retry_non_idempotent = true
max_buffered_body = "1MiB"
"""


def test_full_yaml_example():
    cluster = parse_config(FULL_YAML).clusters[0]
    assert cluster.health_check == HealthCheck(
        type="http", path="/ready", method="HEAD", host="app.internal",
        expect_status=((200, 200), (204, 206), (300, 399)), expect_body="ok",
        interval=5.0, timeout=0.5, jitter="20%", rise=3, fall=2)
    assert cluster.health_check.jitter == 0.2
    assert cluster.outlier_detection == OutlierDetection(
        consecutive_failures=7, consecutive_gateway_errors=3,
        failure_statuses=((500, 599), (429, 429)), base_ejection_time=10.0,
        max_ejection_time=120.0, max_ejection_percent="30%")
    assert cluster.outlier_detection.max_ejection_percent == pytest.approx(0.3)
    assert cluster.panic_threshold == 0.25
    assert (cluster.max_connections, cluster.max_pending, cluster.queue_timeout) == (100, 50, 0.25)
    assert (cluster.max_requests, cluster.max_retries) == (1000, 3)
    assert cluster.request_timeout == 10.0
    retries = cluster.retries
    assert retries.attempts == 3
    assert retries.retry_on == ["connect_failure", "timeout", 503, 502]
    assert retries.per_try_timeout == 2.0
    assert retries.backoff == Backoff(base=0.01, max=1.0)
    assert retries.budget == 0.125
    assert retries.min_per_second == 2.5
    assert retries.retry_non_idempotent is True
    assert retries.max_buffered_body == 1024**2
    assert [b.max_connections for b in cluster.backends] == [20, None]


def test_full_toml_example_is_the_same_config():
    assert parse_config(FULL_TOML, "toml") == parse_config(FULL_YAML)


def test_parsed_config_round_trips_through_a_dump():
    cluster = parse_config(FULL_YAML).clusters[0]
    # Percentages dump as "N%": a bare number would read back as percent.
    assert type(cluster).model_validate(cluster.model_dump()) == cluster
    assert type(cluster).model_validate(cluster.model_dump(mode="json")) == cluster


def test_tcp_health_check():
    assert cluster_of("health_check: {type: tcp, interval: 1s}\n").health_check.type == "tcp"


def test_panic_threshold_zero_disables_panic_mode():
    assert cluster_of("panic_threshold: 0\n").panic_threshold == 0.0


def test_max_pending_with_a_backend_connection_limit_is_fine():
    cluster = cluster_of("max_pending: 10\n", "max_connections: 5\n")
    assert cluster.max_pending == 10


def test_per_try_timeout_equal_to_request_timeout_is_fine():
    cluster = cluster_of("request_timeout: 2s\nretries: {per_try_timeout: 2000ms}\n")
    assert cluster.retries.per_try_timeout == cluster.request_timeout == 2.0


# -- status ranges --------------------------------------------------------------------------


@pytest.mark.parametrize(("written", "ranges"), [
    ("[200]", ((200, 200),)),
    ("['200']", ((200, 200),)),
    ("[500-599]", ((500, 599),)),
    ("['500 - 503']", ((500, 503),)),
    ("[5xx]", ((500, 599),)),
    ("[2XX, 404]", ((200, 299), (404, 404))),
    ("[100, 599]", ((100, 100), (599, 599))),
    ("204", ((204, 204),)),           # a lone item is a list of one
    ("2xx", ((200, 299),)),
])
def test_status_ranges(written, ranges):
    hc = cluster_of(f"health_check: {{expect_status: {written}}}\n").health_check
    assert hc.expect_status == ranges


@pytest.mark.parametrize(("written", "index", "needle"), [
    ("[200, 99]", 1, "expected a status"),
    ("[600]", 0, "expected a status"),
    ("['abc']", 0, "expected a status"),
    ("[6xx]", 0, "expected a status"),
    ("[true]", 0, "expected a status"),
    ("[200.0]", 0, "expected a status"),
    ("['500-']", 0, "expected a status"),
    ("['500-700']", 0, "expected a status"),
    ("[200, '599-500']", 1, "empty status range 599-500"),
])
def test_bad_status_ranges_name_the_item(written, index, needle):
    [(path, message)] = errors_of(config(f"outlier_detection: {{failure_statuses: {written}}}\n"))
    assert path == f"clusters[0].outlier_detection.failure_statuses[{index}]"
    assert needle in message


def test_empty_status_list():
    [(path, _)] = errors_of(config("health_check: {expect_status: []}\n"))
    assert path == "clusters[0].health_check.expect_status"


# -- backoff --------------------------------------------------------------------------------


@pytest.mark.parametrize(("written", "base", "cap"), [
    ("25ms..250ms", 0.025, 0.25),
    ("'0.5s .. 2s'", 0.5, 2.0),
    ("1..1", 1.0, 1.0),
    ("'0..0'", 0.0, 0.0),
    ("{base: 10ms, max: 1s}", 0.01, 1.0),
    ("{max: 1s}", 0.025, 1.0),
])
def test_backoff_forms(written, base, cap):
    backoff = cluster_of(f"retries: {{backoff: {written}}}\n").retries.backoff
    assert (backoff.base, backoff.max) == (pytest.approx(base), pytest.approx(cap))


@pytest.mark.parametrize(("written", "path", "needle"), [
    ("250ms", "backoff", "like 25ms..250ms"),
    ("1s..2s..3s", "backoff", "like 25ms..250ms"),
    ("10ms..soon", "backoff.max", "expected a duration"),
    ("..1s", "backoff.base", "expected a duration"),
    ("1s..10ms", "backoff.max", "must be at least base (1s)"),
    ("{base: 1s, max: 10ms}", "backoff.max", "must be at least base"),
    ("{base: 1s, cap: 2s}", "backoff.cap", "unknown key"),
])
def test_bad_backoff(written, path, needle):
    [(field, message)] = errors_of(config(f"retries: {{backoff: '{written}'}}\n")
                                   if not written.startswith("{")
                                   else config(f"retries: {{backoff: {written}}}\n"))
    assert field == f"clusters[0].retries.{path}"
    assert needle in message


# -- percentages in fields ------------------------------------------------------------------


@pytest.mark.parametrize(("written", "fraction"), [
    ("10%", 0.10), ("12.5%", 0.125), ("10", 0.10), ("0", 0.0), ("100%", 1.0), ("2.5", 0.025),
])
def test_percent_fields_store_fractions(written, fraction):
    assert cluster_of(f"panic_threshold: {written}\n").panic_threshold == pytest.approx(fraction)


def test_retry_budget_may_exceed_100_percent():
    assert cluster_of("retries: {budget: 1000%}\n").retries.budget == 10.0
    [(path, message)] = errors_of(config("retries: {budget: 1001%}\n"))
    assert path == "clusters[0].retries.budget"
    assert "1000%" in message


# -- invalid values carry their field path ------------------------------------------------


@pytest.mark.parametrize(("cluster_extra", "path", "needle"), [
    # health_check
    ("health_check: {type: udp}\n", "health_check.type", "'http', 'tcp' or 'grpc'"),
    ("health_check: {path: health}\n", "health_check.path", "must start with /"),
    ("health_check: {path: '/a b'}\n", "health_check.path", "spaces"),
    ("health_check: {method: 'GE T'}\n", "health_check.method", "HTTP method"),
    ("health_check: {method: ''}\n", "health_check.method", "HTTP method"),
    ("health_check: {host: ''}\n", "health_check.host", "host name"),
    ("health_check: {interval: 0}\n", "health_check.interval", "greater than 0"),
    ("health_check: {timeout: 0s}\n", "health_check.timeout", "greater than 0"),
    ("health_check: {interval: 1s, timeout: 2s}\n", "health_check.timeout",
     "must not exceed interval (1s)"),
    ("health_check: {timeout: 3s}\n", "health_check.timeout", "must not exceed interval (2s)"),
    ("health_check: {jitter: 60%}\n", "health_check.jitter", "at most 50%"),
    ("health_check: {jitter: -1}\n", "health_check.jitter", "negative"),
    ("health_check: {rise: 0}\n", "health_check.rise", "greater than or equal to 1"),
    ("health_check: {fall: 0}\n", "health_check.fall", "greater than or equal to 1"),
    ("health_check: {interval: 2s, colour: red}\n", "health_check.colour", "unknown key"),
    ("health_check: yes\n", "health_check", "valid dictionary"),
    # outlier_detection
    ("outlier_detection: {consecutive_failures: 0}\n",
     "outlier_detection.consecutive_failures", "greater than or equal to 1"),
    ("outlier_detection: {consecutive_gateway_errors: 0}\n",
     "outlier_detection.consecutive_gateway_errors", "greater than or equal to 1"),
    ("outlier_detection: {base_ejection_time: 0}\n",
     "outlier_detection.base_ejection_time", "greater than 0"),
    ("outlier_detection: {base_ejection_time: 1m, max_ejection_time: 30s}\n",
     "outlier_detection.max_ejection_time", "at least base_ejection_time (60s)"),
    ("outlier_detection: {max_ejection_percent: 150%}\n",
     "outlier_detection.max_ejection_percent", "cannot exceed 100%"),
    ("outlier_detection: {max_ejection_percent: half}\n",
     "outlier_detection.max_ejection_percent", "expected a percentage like 10%"),
    # the cluster's own fields
    ("panic_threshold: 101\n", "panic_threshold", "cannot exceed 100%"),
    ("panic_threshold: true\n", "panic_threshold", "expected a percentage"),
    ("max_connections: -1\n", "max_connections", "greater than or equal to 0"),
    ("max_connections: 1\nmax_pending: -1\n", "max_pending", "greater than or equal to 0"),
    ("max_requests: -1\n", "max_requests", "greater than or equal to 0"),
    ("max_retries: -1\n", "max_retries", "greater than or equal to 0"),
    ("queue_timeout: soon\n", "queue_timeout", "expected a duration"),
    ("request_timeout: 0\n", "request_timeout", "greater than 0"),
    ("request_timeout: -1s\n", "request_timeout", "expected a duration"),
    # retries
    ("retries: {attempts: 0}\n", "retries.attempts", "greater than or equal to 1"),
    ("retries: {attempts: 11}\n", "retries.attempts", "less than or equal to 10"),
    ("retries: {retry_on: [timeout, 404]}\n", "retries.retry_on[1]",
     "connect_failure, reset, timeout or a status 500..599"),
    ("retries: {retry_on: [5xx]}\n", "retries.retry_on[0]", "a status 500..599"),
    ("retries: {retry_on: [Timeout]}\n", "retries.retry_on[0]", "a status 500..599"),
    ("retries: {retry_on: [true]}\n", "retries.retry_on[0]", "a status 500..599"),
    ("retries: {per_try_timeout: 0}\n", "retries.per_try_timeout", "greater than 0"),
    ("retries: {budget: -5%}\n", "retries.budget", "expected a percentage"),
    ("retries: {min_per_second: -1}\n", "retries.min_per_second",
     "greater than or equal to 0"),
    ("retries: {min_per_second: .inf}\n", "retries.min_per_second", "finite"),
    ("retries: {max_buffered_body: lots}\n", "retries.max_buffered_body", "expected a size"),
    ("retries: {retry_non_idempotent: maybe}\n", "retries.retry_non_idempotent", "boolean"),
    ("retries: {tries: 3}\n", "retries.tries", "unknown key"),
])
def test_invalid_values_name_their_field(cluster_extra, path, needle):
    [(field, message)] = errors_of(config(cluster_extra))
    assert field == f"clusters[0].{path}"
    assert needle in message


def test_backend_max_connections_must_be_positive():
    [(field, message)] = errors_of(config("", "max_connections: 0\n"))
    assert field == "clusters[0].backends[0].max_connections"
    assert "greater than or equal to 1" in message


# -- cross-field checks (load.semantic_errors) --------------------------------------------


def test_per_try_timeout_longer_than_request_timeout():
    assert errors_of(config("request_timeout: 1s\nretries: {per_try_timeout: 1500ms}\n")) == [
        ("clusters[0].retries.per_try_timeout", "must not exceed request_timeout (1s)")]


@pytest.mark.parametrize("extra", ["max_pending: 10\n", "max_pending: 0\n"])
def test_max_pending_needs_a_connection_limit(extra):
    [(field, message)] = errors_of(config(extra))
    assert field == "clusters[0].max_pending"
    assert "only queue when a connection limit" in message


def test_semantic_errors_are_listed_with_schema_errors():
    text = config("max_pending: 10\nrequest_timeout: 1s\n"
                  "retries: {per_try_timeout: 2s, attempts: 0}\n"
                  "health_check: {rise: 0}\n")
    assert sorted(field for field, _ in errors_of(text)) == [
        "clusters[0].health_check.rise",
        "clusters[0].max_pending",
        "clusters[0].retries.attempts",
        "clusters[0].retries.per_try_timeout",
    ]


def test_malformed_timeouts_are_left_to_the_schema():
    [(field, message)] = errors_of(config("request_timeout: soon\n"
                                          "retries: {per_try_timeout: 2s}\n"))
    assert field == "clusters[0].request_timeout"
    assert "expected a duration" in message


def test_errors_are_reported_for_the_right_cluster():
    text = config() + ("  - name: second\n    max_pending: 1\n"
                       "    backends:\n      - address: 127.0.0.1:9003\n")
    assert [field for field, _ in errors_of(text)] == ["clusters[1].max_pending"]


# -- poise check ----------------------------------------------------------------------------


def test_poise_check_prints_resilience_errors(tmp_path):
    path = tmp_path / "poise.yaml"
    path.write_text(config("max_pending: 10\nhealth_check: {interval: 1s, timeout: 2s}\n"))
    result = CliRunner().invoke(cli, ["check", str(path)])
    assert result.exit_code == 2
    assert "clusters[0].health_check.timeout: must not exceed interval (1s)" in result.output
    assert "clusters[0].max_pending: has no effect without max_connections" in result.output


def test_health_check_timeout_defaults_to_the_interval_when_that_is_shorter():
    # Regression: the default timeout (1 s) above a 200 ms interval passed `poise check`
    # (a field validator does not see defaults) but failed when the control plane
    # re-read the config it had written back out, with the default now explicit.
    hc = cluster_of("health_check: {type: tcp, interval: 200ms}\n").health_check
    assert hc.timeout == 0.2
    assert HealthCheck(**hc.model_dump()).timeout == 0.2
    assert cluster_of("health_check: {interval: 5s}\n").health_check.timeout == 1.0
