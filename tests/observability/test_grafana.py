"""The Grafana dashboard (docs/grafana/poise.json) against a real poise.

Two halves:

- the file is an importable dashboard: unique panel ids, every panel placed on the
  24-column grid without overlaps, every query on the ``${DS_PROMETHEUS}`` input, every
  template variable it uses defined, and error ratios over upstream tries counting the
  tries with no response (code ``"error"``) along with 5xx;
- every metric name its PromQL uses is exposed by a live poise: one poise with an admin
  listener, four clusters and h11 backends takes traffic that makes each labelled series
  exist (200s, a 404 no route matched, 503s, a connect failure and a retry, an outlier
  ejection, a backend down by its health check, an overflow of ``max_requests``, a
  response timeout), then ``GET /metrics`` is parsed with prometheus_client's parser.
  Each label the dashboard selects on (``{label=...}``, ``by (...)``, ``label_values``)
  must be on the samples of that metric.
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.client import DEFAULT_HOST, H11Client
from tests.support.control import TOKEN
from tests.support.procs import refused_address, served
from tests.support.waiting import wait_for

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana" / "poise.json"
DATASOURCE = "${DS_PROMETHEUS}"
GRID = 24
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# Labels Prometheus attaches to every scraped series itself (not in /metrics).
TARGET_LABELS = {"instance", "job"}

METRIC = re.compile(r"poise_[a-z0-9_]+")
SELECTOR = re.compile(r"(poise_[a-z0-9_]+)\s*\{([^}]*)\}")
MATCHER = re.compile(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)")
STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
GROUPING = re.compile(r"\b(?:by|on)\s*\(([^)]*)\)")
LABEL_VALUES = re.compile(r"label_values\(\s*(poise_[a-z0-9_]+)\s*(?:\{[^}]*\})?\s*,\s*(\w+)\s*\)")
# label_replace(v, "dst", "replacement", "src", "regex"): "dst" is made by the query.
MADE_LABEL = re.compile(r',\s*"(\w+)"\s*,\s*"[^"]*"\s*,\s*"\w+"\s*,\s*"[^"]*"\s*\)')
VARIABLE = re.compile(r"\$(\w+)|\$\{(\w+)(?:[:.][^}]*)?\}|\[\[(\w+)(?::\w+)?\]\]")


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(dashboard: dict) -> list[dict]:
    """Every panel, rows and panels inside collapsed rows included."""
    out = []
    for p in dashboard["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def expressions(dashboard: dict) -> list[str]:
    """Every PromQL expression: panel targets, template variable queries, annotations."""
    exprs = [t["expr"] for p in panels(dashboard) for t in p.get("targets", [])]
    for v in dashboard["templating"]["list"]:
        if v["type"] == "query":
            query = v["query"]
            exprs.append(query["query"] if isinstance(query, dict) else query)
    exprs += [a["expr"] for a in dashboard["annotations"]["list"] if "expr" in a]
    return exprs


def strings(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for v in node.values() for s in strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in strings(v)]
    return []


# -- the file ----------------------------------------------------------------------------

def test_the_file_is_an_importable_dashboard(dashboard):
    assert dashboard["schemaVersion"] >= 36
    assert dashboard["uid"] and dashboard["title"]
    assert dashboard["time"] == {"from": "now-1h", "to": "now"} and dashboard["refresh"]
    inputs = {i["name"]: i for i in dashboard["__inputs"]}
    assert inputs["DS_PROMETHEUS"]["type"] == "datasource"
    assert inputs["DS_PROMETHEUS"]["pluginId"] == "prometheus"
    assert dashboard.get("id") is None, "an exported dashboard carries no database id"

    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(ids)}"
    rows = [p for p in dashboard["panels"] if p["type"] == "row"]
    assert [r["title"] for r in rows] == [
        "Overview", "Responses by code", "Backends", "Resilience", "Operations"]

    taken: set[tuple[int, int]] = set()
    for p in dashboard["panels"]:
        g = p["gridPos"]
        assert g["w"] > 0 and g["h"] > 0 and g["x"] >= 0 and g["y"] >= 0, p["title"]
        assert g["x"] + g["w"] <= GRID, f"{p['title']} runs off the grid"
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"])
                 for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & taken, f"{p['title']} overlaps another panel"
        taken |= cells

    for p in panels(dashboard):
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": DATASOURCE}, p["title"]
        assert p["targets"], f"{p['title']} has no query"
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == DATASOURCE, p["title"]
            assert METRIC.search(t["expr"]), (p["title"], t["expr"])
    for v in dashboard["templating"]["list"]:
        assert v["datasource"]["uid"] == DATASOURCE, v["name"]
    for a in dashboard["annotations"]["list"]:
        if "expr" in a:
            assert a["datasource"]["uid"] == DATASOURCE, a["name"]


def test_every_variable_used_is_defined(dashboard):
    defined = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"listener", "cluster", "backend"} <= defined
    for v in dashboard["templating"]["list"]:
        assert LABEL_VALUES.fullmatch(v["definition"]), v["definition"]
    used = set()
    for text in strings({k: v for k, v in dashboard.items() if k != "__inputs"}):
        for match in VARIABLE.finditer(text):
            used.add(next(g for g in match.groups() if g))
    # Grafana's own ($__rate_interval, $__range …), the import input, and label_replace's
    # capture groups (${1}) are not dashboard variables.
    used = {u for u in used if not u.startswith("__") and not u.isdigit()}
    used.discard("DS_PROMETHEUS")
    assert used <= defined, f"undefined variables: {used - defined}"
    assert {"listener", "cluster", "backend"} <= used


def test_upstream_error_ratios_count_tries_without_a_response(dashboard):
    """A try with no response at all (code "error") is an error as much as a 5xx."""
    seen = 0
    for expr in expressions(dashboard):
        for name, body in SELECTOR.findall(expr):
            codes = re.search(r'\bcode\s*=~\s*"([^"]*)"', body)
            if name != "poise_upstream_requests_total" or not codes:
                continue
            pattern = re.compile(codes.group(1))
            if pattern.fullmatch("503"):
                seen += 1
                assert pattern.fullmatch("error") and pattern.fullmatch("500"), expr
    assert seen >= 2, "expected an upstream error ratio per backend and overall"


# -- against a live poise ----------------------------------------------------------------

def _traffic(px, b1, sick) -> None:
    """Requests that make every labelled series of the contract exist."""
    with H11Client(px.addr) as c:
        for _ in range(4):
            assert c.get("/").status == 200
        assert c.get("/status/503").status == 503
        assert c.get("/", [("Host", "nowhere.test")]).status == 404     # cluster ""
        # A refused backend: connect errors, failover, an ejection; then a retried 503.
        flaky = [("Host", "flaky.test")]
        for _ in range(4):
            assert c.get("/", flaky).status == 200
        assert c.get("/status/503", flaky).status == 503
    # No healthy backend left in "sick" once its check fails: 503 at once.
    wait_for(lambda: any(b["state"] == "down" for b in _cluster(px, "sick")["backends"]),
             10, lambda: f"sick's backend down: {_cluster(px, 'sick')}")
    with H11Client(px.addr) as c:
        assert c.get("/", [("Host", "sick.test")]).status == 503
    # "tight" holds one request at a time: a second one overflows max_requests while
    # the first waits for a response that never comes (a response timeout).
    answers: list[int] = []
    first = threading.Thread(target=lambda: answers.append(
        _get(px, "/never", "tight.test")))
    first.start()
    wait_for(lambda: any(r["target"] == "/never" for r in served(b1)), 5,
             "the first request reached b1")
    assert _get(px, "/", "tight.test") == 503
    first.join(10)
    assert answers == [504]


def _get(px, target: str, host: str) -> int:
    with H11Client(px.addr) as c:
        return c.get(target, [("Host", host)]).status


def _cluster(px, name: str) -> dict:
    return px.admin.get(f"/clusters/{name}").json()


def _parse(text: str) -> dict[str, list]:
    """Sample name → its samples; also family names (histograms, counters) → []."""
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        names = {"histogram": [family.name + s for s in HISTOGRAM_SUFFIXES],
                 "counter": [family.name + "_total"]}.get(family.type, [family.name])
        for name in names:
            out.setdefault(name, [])
        if family.type == "histogram":
            out.setdefault(family.name, [])
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def _used(dashboard: dict) -> dict[str, set[str]]:
    """Metric name used → the labels the dashboard selects or groups on with it."""
    used: dict[str, set[str]] = {}
    for expr in expressions(dashboard):
        names = set(METRIC.findall(expr))
        made = set(MADE_LABEL.findall(expr))
        grouped = {label.strip() for group in GROUPING.findall(expr)
                   for label in group.split(",") if label.strip()}
        for name in names:
            used.setdefault(name, set()).update(grouped - made)
        for name, body in SELECTOR.findall(expr):
            used[name].update(MATCHER.findall(STRING.sub('""', body)))
        for name, label in LABEL_VALUES.findall(expr):
            used[name].add(label)
    return {name: labels - TARGET_LABELS for name, labels in used.items()}


@pytest.fixture(scope="module")
def scrape(module_stack, dashboard) -> dict[str, list]:
    b1, b2 = module_stack.backend("b1"), module_stack.backend("b2")
    sick = module_stack.backend("sick", health_status=503)
    routes = [{"match": {"host": "flaky.test"}, "cluster": "flaky"},
              {"match": {"host": "tight.test"}, "cluster": "tight"},
              {"match": {"host": "sick.test"}, "cluster": "sick"},
              {"match": {"host": DEFAULT_HOST}, "cluster": "app"}]
    clusters = [
        {"name": "flaky", "backends": [{"address": refused_address()},
                                       {"address": b2.address}],
         "retries": {"attempts": 2, "retry_on": ["connect_failure", 503]},
         "outlier_detection": {"consecutive_gateway_errors": 1}},
        {"name": "tight", "backends": [{"address": b1.address}], "max_requests": 1,
         "response_header_timeout": "1s"},
        {"name": "sick", "backends": [{"address": sick.address}],
         "health_check": {"path": "/health", "interval": "100ms", "timeout": "100ms",
                          "jitter": 0, "rise": 1, "fall": 1}}]
    px = module_stack.poise([b1, b2], admin={"token": TOKEN},
                            listener={"routes": routes}, extra_clusters=clusters)
    _traffic(px, b1, sick)

    # Workers ship their counts about every second: wait until every metric the
    # dashboard uses has samples (or give up and let the tests say which has none).
    wanted = set(_used(dashboard))
    last: dict[str, list] = {}

    def complete() -> bool:
        nonlocal last
        r = px.admin.get("/metrics")
        if r.status != 200:
            pytest.fail(f"GET /metrics: {r.status} {r.body[:200]!r}", pytrace=False)
        last = _parse(r.body.decode())
        return all(last.get(name) for name in wanted)
    # Gauges at zero are left out of the exposition: hold a client connection open with
    # a request in flight (it never gets an answer) while scraping.
    held = H11Client(px.addr)
    try:
        held.send("GET", "/never")
        wait_for(complete, 10, step=0.25)
    except AssertionError:
        pass        # the tests below name what is missing
    finally:
        held.close()
    return last


def test_every_metric_the_dashboard_queries_is_exposed(dashboard, scrape):
    missing = []
    for name in sorted(_used(dashboard)):
        if name not in scrape:
            missing.append(name)
        elif name.endswith(HISTOGRAM_SUFFIXES):
            base = name.rsplit("_", 1)[0]
            # A histogram series must come from a histogram family.
            assert base in scrape and base + "_bucket" in scrape, name
    assert not missing, f"not in /metrics: {missing}"


def test_every_label_the_dashboard_uses_is_on_its_metric(dashboard, scrape):
    problems = []
    for name, labels in sorted(_used(dashboard).items()):
        samples = scrape.get(name)
        if not labels:
            continue
        if not samples:
            problems.append(f"{name}: no samples to check {sorted(labels)} on")
            continue
        exposed = set().union(*(s.labels for s in samples))
        if labels - exposed:
            problems.append(f"{name}: {sorted(labels - exposed)} not among {sorted(exposed)}")
    assert not problems, "\n".join(problems)


def test_the_traffic_shows_in_the_labelled_series(scrape):
    """The series the dashboard splits by are the ones the traffic made."""
    def values(name: str, **labels) -> list[float]:
        return [s.value for s in scrape.get(name, [])
                if all(s.labels.get(k) == v for k, v in labels.items())]
    assert sum(values("poise_requests_total", cluster="", code="404")) == 1
    assert sum(values("poise_requests_total", cluster="app", code="503")) == 1
    assert sum(values("poise_requests_total", cluster="app", code="200")) == 4
    assert sum(values("poise_upstream_requests_total", cluster="flaky", code="error")) >= 1
    assert sum(values("poise_upstream_connect_errors_total", cluster="flaky")) >= 1
    assert sum(values("poise_retries_total", cluster="flaky")) >= 1
    assert sum(values("poise_overflow_total", cluster="tight", limit="max_requests")) == 1
    assert sum(values("poise_upstream_timeouts_total", cluster="tight")) == 1
    assert sum(values("poise_health_transitions_total", cluster="sick", to="down")) >= 1
    assert values("poise_backend_state", cluster="sick", state="down") == [1.0]
