"""Parsing and validating whole configuration files (poise.config.load / model)."""

import textwrap

import pydantic
import pytest

from poise.config import Config, load_config, parse_config
from poise.errors import ConfigError

# Exactly as written in the issue: it must work unchanged.
MINIMAL_YAML = """\
workers: 1
listeners:
  - name: web
    bind: 127.0.0.1:8080
    protocol: http
    routes:
      - cluster: app          # a route without `match` catches everything
clusters:
  - name: app
    policy: round_robin
    backends:
      - address: 127.0.0.1:9001
      - address: 127.0.0.1:9002
        weight: 2
"""

MINIMAL_TOML = """\
workers = 1

[[listeners]]
name = "web"
bind = "127.0.0.1:8080"
protocol = "http"
routes = [{ cluster = "app" }]

[[clusters]]
name = "app"
policy = "round_robin"

[[clusters.backends]]
address = "127.0.0.1:9001"

[[clusters.backends]]
address = "127.0.0.1:9002"
weight = 2
"""


def errors_of(text: str, fmt: str = "yaml") -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, fmt)
    return info.value.errors


def paths_of(text: str, fmt: str = "yaml") -> list[str]:
    return [path for path, _ in errors_of(text, fmt)]


def config(listener_extra: str = "", cluster_extra: str = "", top_extra: str = "",
           routes: str = "      - cluster: app\n") -> str:
    """A valid config with lines spliced into the listener, the cluster or the top."""
    return (top_extra
            + "listeners:\n  - name: web\n    bind: 127.0.0.1:8080\n"
            + listener_extra
            + "    routes:\n" + routes
            + "clusters:\n  - name: app\n"
            + cluster_extra
            + "    backends:\n      - address: 127.0.0.1:9001\n")


# -- the minimal config ---------------------------------------------------------------------


def test_minimal_yaml_parses_as_written():
    cfg = parse_config(MINIMAL_YAML, "yaml")
    assert cfg.workers == 1
    [listener] = cfg.listeners
    assert (listener.name, listener.bind, listener.protocol) == ("web", "127.0.0.1:8080", "http")
    [route] = listener.routes
    assert route.cluster == "app"
    assert route.match is None
    [cluster] = cfg.clusters
    assert cluster.name == "app"
    assert cluster.policy == "round_robin"
    assert [(b.address, b.weight) for b in cluster.backends] == [
        ("127.0.0.1:9001", 1), ("127.0.0.1:9002", 2)]


def test_minimal_toml_is_the_same_config():
    assert parse_config(MINIMAL_TOML, "toml") == parse_config(MINIMAL_YAML, "yaml")


def test_defaults():
    cfg = parse_config(MINIMAL_YAML)
    assert cfg.drain_timeout == 30.0
    listener = cfg.listeners[0]
    assert listener.client_header_timeout == 10.0
    assert listener.client_idle_timeout == 60.0
    assert listener.max_request_line == 8 * 1024
    assert listener.max_header_size == 64 * 1024
    assert listener.max_headers == 100
    assert listener.max_request_body == 1024**3
    assert listener.forwarded_headers is True
    cluster = cfg.clusters[0]
    assert cluster.connect_timeout == 2.0
    assert cluster.response_header_timeout == 30.0
    assert cluster.keepalive_max_idle == 1024
    assert cluster.keepalive_idle_timeout == 60.0


def test_only_required_fields():
    cfg = parse_config("listeners: [{name: w, bind: 'a:1', routes: [{cluster: c}]}]\n"
                       "clusters: [{name: c, backends: [{address: 'b:2'}]}]\n")
    assert cfg.workers == 1
    assert cfg.listeners[0].protocol == "http"
    assert cfg.clusters[0].policy == "round_robin"


def test_units_in_fields():
    cfg = parse_config(config(
        top_extra="drain_timeout: 1m\n",
        listener_extra=("    client_header_timeout: 250ms\n"
                        "    client_idle_timeout: 2\n"
                        "    max_request_line: 16KiB\n"
                        "    max_header_size: 1MiB\n"
                        "    max_request_body: 10MB\n"),
        cluster_extra=("    connect_timeout: 500ms\n"
                       "    response_header_timeout: 1.5\n"
                       "    keepalive_idle_timeout: 2s\n")))
    assert cfg.drain_timeout == 60.0
    listener = cfg.listeners[0]
    assert listener.client_header_timeout == 0.25
    assert listener.client_idle_timeout == 2.0
    assert listener.max_request_line == 16 * 1024
    assert listener.max_header_size == 1024**2
    assert listener.max_request_body == 10_000_000
    cluster = cfg.clusters[0]
    assert cluster.connect_timeout == 0.5
    assert cluster.response_header_timeout == 1.5
    assert cluster.keepalive_idle_timeout == 2.0


def test_config_is_immutable():
    cfg = parse_config(MINIMAL_YAML)
    with pytest.raises(pydantic.ValidationError):
        cfg.workers = 4


# -- files ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "text"), [
    ("poise.yaml", MINIMAL_YAML), ("poise.yml", MINIMAL_YAML), ("POISE.YAML", MINIMAL_YAML),
    ("poise.toml", MINIMAL_TOML),
])
def test_load_config_by_extension(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    assert load_config(path) == parse_config(MINIMAL_YAML)
    assert load_config(str(path)) == parse_config(MINIMAL_YAML)


def test_unknown_extension(tmp_path):
    path = tmp_path / "poise.json"
    path.write_text("{}")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    [(field, message)] = info.value.errors
    assert field == ""
    assert "unknown config format" in message


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yaml")
    [(field, message)] = info.value.errors
    assert field == ""
    assert message.startswith("cannot read")


def test_toml_content_in_a_yaml_file_is_not_silently_accepted(tmp_path):
    path = tmp_path / "poise.yaml"
    path.write_text(MINIMAL_TOML)
    with pytest.raises(ConfigError):
        load_config(path)


@pytest.mark.parametrize(("text", "fmt", "needle"), [
    ("listeners: [", "yaml", "not valid YAML"),
    ("workers = ", "toml", "not valid TOML"),
    ("", "yaml", "mapping at the top level"),
    ("- a\n- b\n", "yaml", "mapping at the top level"),
    ("just a string", "yaml", "mapping at the top level"),
])
def test_unparseable(text, fmt, needle):
    [(field, message)] = errors_of(text, fmt)
    assert field == ""
    assert needle in message


# -- schema errors carry their field path -------------------------------------------------------


def test_bad_backend_address_path_and_message():
    text = MINIMAL_YAML.replace("127.0.0.1:9002", "localhost")
    assert errors_of(text) == [("clusters[0].backends[1].address", "expected host:port")]


@pytest.mark.parametrize(("text", "path"), [
    (MINIMAL_YAML + "colour: blue\n", "colour"),
    (MINIMAL_YAML.replace("    protocol: http\n", "    protocol: http\n    ssl: true\n"),
     "listeners[0].ssl"),
    (MINIMAL_YAML.replace("      - cluster: app ", "      - cluster: app\n        weight: 3 "),
     "listeners[0].routes[0].weight"),
    (MINIMAL_YAML.replace("    policy: round_robin\n",
                          "    policy: round_robin\n    retry_count: 3\n"),
     "clusters[0].retry_count"),
    (MINIMAL_YAML.replace("        weight: 2\n", "        weight: 2\n        zone: a\n"),
     "clusters[0].backends[1].zone"),
])
def test_unknown_keys_are_errors_with_their_path(text, path):
    assert errors_of(text) == [(path, "unknown key")]


@pytest.mark.parametrize(("text", "path"), [
    # Dashes instead of underscores are the most likely typo: the key must still be named.
    (MINIMAL_YAML.replace("    protocol: http\n",
                          "    protocol: http\n    client-header-timeout: 5s\n"),
     "listeners[0].client-header-timeout"),
    ("max-workers: 2\n" + MINIMAL_YAML, "max-workers"),
])
def test_unknown_keys_with_dashes_keep_their_path(text, path):
    assert errors_of(text) == [(path, "unknown key")]


def test_unknown_key_in_match():
    text = config(routes="      - cluster: app\n        match: {host: a.com, hots: b.com}\n")
    assert errors_of(text) == [("listeners[0].routes[0].match.hots", "unknown key")]


def test_every_schema_error_is_listed():
    text = textwrap.dedent("""\
        workers: 0
        drain_timeout: soon
        listeners:
          - name: web
            bind: 8080
            client_header_timeout: 5x
            max_header_size: lots
            routes: []
        clusters:
          - name: app
            backends:
              - address: 127.0.0.1:9001
                weight: 0
              - address: "::1:80"
              - address: 127.0.0.1:9003
                extra: 1
        """)
    errors = dict(errors_of(text))
    assert set(errors) == {
        "workers",
        "drain_timeout",
        "listeners[0].bind",
        "listeners[0].client_header_timeout",
        "listeners[0].max_header_size",
        "listeners[0].routes",
        "clusters[0].backends[0].weight",
        "clusters[0].backends[1].address",
        "clusters[0].backends[2].extra",
    }
    assert errors["listeners[0].bind"] == "expected host:port"
    assert errors["drain_timeout"] == "expected a duration such as 250ms, 2s or 1m"
    assert errors["listeners[0].client_header_timeout"] == \
        "expected a duration such as 250ms, 2s or 1m"
    assert errors["listeners[0].max_header_size"] == "expected a size such as 64KiB or 1MiB"
    assert errors["clusters[0].backends[2].extra"] == "unknown key"
    for message in errors.values():
        assert not message.startswith("Value error")


def test_missing_required_fields():
    errors = errors_of("listeners:\n  - bind: 127.0.0.1:80\n")
    assert set(errors) == {
        ("listeners[0].name", "required"),
        ("listeners[0].routes", "required"),
        ("clusters", "required"),
    }


@pytest.mark.parametrize(("yaml_value", "ok"), [
    ("1", True), ("256", True), ("0", False), ("257", False), ("two", False)])
def test_workers_range(yaml_value, ok):
    text = MINIMAL_YAML.replace("workers: 1", f"workers: {yaml_value}")
    if ok:
        assert parse_config(text).workers == int(yaml_value)
    else:
        assert paths_of(text) == ["workers"]


@pytest.mark.parametrize(("weight", "ok"), [
    ("1", True), ("10000", True), ("0", False), ("-1", False), ("10001", False),
    ("1.5", False)])
def test_weight_range(weight, ok):
    text = MINIMAL_YAML.replace("weight: 2", f"weight: {weight}")
    if ok:
        assert parse_config(text).clusters[0].backends[1].weight == int(weight)
    else:
        assert paths_of(text) == ["clusters[0].backends[1].weight"]


def test_protocol_must_be_http_or_tcp():
    text = MINIMAL_YAML.replace("protocol: http", "protocol: udp")
    assert paths_of(text) == ["listeners[0].protocol"]


def test_empty_lists_are_errors():
    assert paths_of(config().replace(
        "    backends:\n      - address: 127.0.0.1:9001\n", "    backends: []\n")) == [
        "clusters[0].backends"]
    assert paths_of("listeners: []\nclusters: []\n") == ["listeners", "clusters"]


# -- cross-field (semantic) errors -------------------------------------------------------------


def test_unknown_cluster_in_a_route():
    text = config(routes="      - cluster: app\n      - cluster: api\n")
    assert errors_of(text) == [("listeners[0].routes[1].cluster", "unknown cluster 'api'")]


def test_duplicate_cluster_names():
    text = MINIMAL_YAML + "  - name: app\n    backends: [{address: '10.0.0.1:80'}]\n"
    assert errors_of(text) == [("clusters[1].name", "duplicate cluster name 'app'")]


def test_duplicate_listener_names():
    text = config().replace(
        "clusters:\n",
        "  - name: web\n    bind: 127.0.0.1:8081\n    routes: [{cluster: app}]\nclusters:\n")
    assert errors_of(text) == [("listeners[1].name", "duplicate listener name 'web'")]


def test_duplicate_binds():
    text = config().replace(
        "clusters:\n",
        "  - name: other\n    bind: 127.0.0.1:8080\n    routes: [{cluster: app}]\nclusters:\n")
    assert paths_of(text) == ["listeners[1].bind"]


def test_duplicate_backends():
    text = MINIMAL_YAML.replace("127.0.0.1:9002", "127.0.0.1:9001")
    assert errors_of(text) == [("clusters[0].backends[1].address",
                                "duplicate backend 127.0.0.1:9001")]


def test_every_semantic_error_is_listed():
    text = textwrap.dedent("""\
        listeners:
          - name: web
            bind: 127.0.0.1:8080
            routes: [{cluster: nope}, {cluster: app}]
          - name: web
            bind: 127.0.0.1:8080
            routes: [{cluster: gone}]
        clusters:
          - name: app
            policy: fastest
            backends: [{address: "a:1"}, {address: "a:1"}]
          - name: app
            backends: [{address: "b:1"}]
        """)
    assert set(paths_of(text)) == {
        "listeners[0].routes[0].cluster",
        "listeners[1].name",
        "listeners[1].bind",
        "listeners[1].routes[0].cluster",
        "clusters[0].policy",
        "clusters[0].backends[1].address",
        "clusters[1].name",
    }


def test_schema_and_semantic_errors_are_listed_together():
    # `poise check` promises every error in one run, not one class of error per run.
    text = config(routes="      - cluster: api\n").replace(
        "127.0.0.1:9001", "localhost")
    assert set(paths_of(text)) == {
        "clusters[0].backends[0].address",
        "listeners[0].routes[0].cluster",
    }


# -- policy ---------------------------------------------------------------------------------


def test_policy_defaults_to_round_robin():
    assert parse_config(config()).clusters[0].policy == "round_robin"


def test_policy_as_mapping():
    cfg = parse_config(config(cluster_extra="    policy: {type: round_robin}\n"))
    assert cfg.clusters[0].policy == {"type": "round_robin"}


def test_policy_as_toml_table():
    text = MINIMAL_TOML.replace('policy = "round_robin"', 'policy = { type = "round_robin" }')
    assert parse_config(text, "toml").clusters[0].policy == {"type": "round_robin"}


def test_unknown_policy():
    [(path, message)] = errors_of(config(cluster_extra="    policy: fastest\n"))
    assert path == "clusters[0].policy"
    assert "unknown policy 'fastest'" in message
    assert "round_robin" in message     # the known names are listed


def test_unknown_policy_in_mapping():
    [(path, message)] = errors_of(config(cluster_extra="    policy: {type: fastest}\n"))
    assert path == "clusters[0].policy.type"
    assert "unknown policy 'fastest'" in message


def test_policy_mapping_needs_a_type():
    [(path, message)] = errors_of(config(cluster_extra="    policy: {name: round_robin}\n"))
    assert path == "clusters[0].policy.type"
    assert message.startswith("required")


def test_policy_options_are_checked():
    # round_robin takes no options yet.
    [(path, message)] = errors_of(
        config(cluster_extra="    policy: {type: round_robin, spread: 2}\n"))
    assert path.startswith("clusters[0].policy")
    assert "round_robin" in message


@pytest.mark.parametrize("value", ["5", "[round_robin]", "true"])
def test_policy_of_the_wrong_type_is_reported_at_the_policy_path(value):
    # Not at "clusters[0].policy.str" or similar: pydantic's union branch names are
    # not field names.
    paths = paths_of(config(cluster_extra=f"    policy: {value}\n"))
    assert paths
    assert set(paths) == {"clusters[0].policy"}


# -- route matches ------------------------------------------------------------------------------


def match_of(match_yaml: str):
    cfg = parse_config(config(routes=f"      - cluster: app\n        match: {match_yaml}\n"))
    return cfg.listeners[0].routes[0].match


def match_errors(match_yaml: str) -> list[tuple[str, str]]:
    return errors_of(config(routes=f"      - cluster: app\n        match: {match_yaml}\n"))


def test_route_without_match():
    assert parse_config(config()).listeners[0].routes[0].match is None


def test_all_match_fields():
    m = match_of("{host: api.example.com, path_prefix: /v1/, path: /v1/users, "
                 "methods: [GET, post], headers: {X-Tenant: blue}}")
    assert m.host == "api.example.com"
    assert m.path_prefix == "/v1/"
    assert m.path == "/v1/users"
    assert m.methods == ["GET", "POST"]
    assert m.headers == {"X-Tenant": "blue"}


def test_match_fields_in_toml():
    text = MINIMAL_TOML.replace(
        'routes = [{ cluster = "app" }]',
        'routes = [{ cluster = "app", match = { host = "*.example.com", path_prefix = "/api",'
        ' methods = ["get"], headers = { "x-env" = "prod" } } }]')
    m = parse_config(text, "toml").listeners[0].routes[0].match
    assert (m.host, m.path_prefix, m.methods, m.headers) == (
        "*.example.com", "/api", ["GET"], {"x-env": "prod"})


def test_host_is_lower_cased():
    assert match_of("{host: API.Example.COM}").host == "api.example.com"


def test_wildcard_host():
    assert match_of("{host: '*.Example.com'}").host == "*.example.com"


@pytest.mark.parametrize("host", ["'*'", "'a.*.com'", "'*.*.com'", "'api.*'", "'*example.com'",
                                  "'**.example.com'"])
def test_bad_wildcards(host):
    [(path, message)] = match_errors(f"{{host: {host}}}")
    assert path == "listeners[0].routes[0].match.host"
    assert "wildcard" in message


@pytest.mark.parametrize("field", ["path", "path_prefix"])
def test_paths_must_be_absolute(field):
    assert match_errors(f"{{{field}: api}}") == [
        (f"listeners[0].routes[0].match.{field}", "must start with /")]


def test_methods_must_be_a_list():
    assert [p for p, _ in match_errors("{methods: GET}")] == ["listeners[0].routes[0].match.methods"]


def test_header_values_must_be_strings():
    assert [p for p, _ in match_errors("{headers: {X-Count: [1, 2]}}")] == [
        "listeners[0].routes[0].match.headers.X-Count"]


def test_match_must_be_a_mapping():
    assert [p for p, _ in match_errors("[host]")] == ["listeners[0].routes[0].match"]


def test_first_route_order_is_kept():
    cfg = parse_config(config(routes=(
        "      - cluster: app\n        match: {path_prefix: /a}\n"
        "      - cluster: app\n        match: {path_prefix: /b}\n"
        "      - cluster: app\n")))
    routes = cfg.listeners[0].routes
    assert [r.match.path_prefix if r.match else None for r in routes] == ["/a", "/b", None]


def test_parse_result_type():
    assert isinstance(parse_config(MINIMAL_YAML), Config)


def test_an_access_log_poise_cannot_open_is_a_config_error(tmp_path):
    base = ("listeners: [{name: web, bind: '127.0.0.1:8080', routes: [{cluster: app}]}]\n"
            "clusters: [{name: app, backends: [{address: '127.0.0.1:9001'}]}]\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text(base + f"access_log: {{path: {tmp_path}/missing/access.log}}\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    assert [path for path, _ in e.value.errors] == ["access_log.path"]
    assert "does not exist" in e.value.errors[0][1]
    good = tmp_path / "good.yaml"
    good.write_text(base + f"access_log: {{path: {tmp_path}/access.log}}\n")
    assert load_config(good).access_log.path == f"{tmp_path}/access.log"
    assert (tmp_path / "access.log").exists()       # opened (created) by the check
