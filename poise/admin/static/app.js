// poise dashboard: polls /dashboard/data every second and keeps the tables in step.
// Plain DOM, no framework.  Rows are created once per key and updated in place, so
// that a button keeps its focus (and a click lands) while the numbers change.
"use strict";

const POLL_MS = 1000;
const TOKEN_KEY = "poise.admin.token";
const SVG = "http://www.w3.org/2000/svg";
const CHART_W = 100;
const CHART_H = 28;

const $ = (id) => document.getElementById(id);
let timer = null;
let busy = false;       // a poll is under way
let again = false;      // ... and another was asked for meanwhile
let waitingForToken = false;
let span = 300;

// -- the token ---------------------------------------------------------------------

function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

function headers() {
  const t = token();
  return t ? { Authorization: "Bearer " + t } : {};
}

function askForToken(message) {
  waitingForToken = true;
  $("board").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message;
  setStatus("needs the admin token", "warn");
  $("token").focus();
}

$("login").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
  $("token").value = "";
  $("login").hidden = true;
  waitingForToken = false;
  poll();
});

$("forget").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  $("forget").hidden = true;
  poll();
});

// -- polling -----------------------------------------------------------------------

async function poll() {
  if (busy) {
    again = true;
    return;
  }
  clearTimeout(timer);
  busy = true;
  try {
    const response = await fetch("/dashboard/data", { headers: headers(), cache: "no-store" });
    if (response.status === 401) {
      askForToken(token() ? "That token was refused." : "");
      return;
    }
    if (!response.ok) throw new Error("HTTP " + response.status);
    render(await response.json());
    setStatus("live", "ok");
  } catch (error) {
    setStatus("cannot reach poise (" + error.message + "); retrying", "error");
  } finally {
    busy = false;
    if (again) {
      again = false;
      poll();
    } else if (!waitingForToken && !document.hidden) {
      timer = setTimeout(poll, POLL_MS);
    }
  }
}

document.addEventListener("visibilitychange", () => {
  if (!document.hidden && !waitingForToken) poll();
});

function setStatus(text, kind) {
  const status = $("status");
  status.textContent = text;
  status.className = "status " + (kind || "");
}

// -- operator actions --------------------------------------------------------------

async function act(button, cluster, address, action) {
  button.disabled = true;
  const path = "/clusters/" + encodeURIComponent(cluster) + "/backends/" +
    encodeURIComponent(address) + "/" + action;
  try {
    const response = await fetch(path, { method: "POST", headers: headers() });
    if (response.status === 401) {
      askForToken("The token was refused: enter it again, then repeat the action.");
      return;
    }
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      setStatus(action + " " + address + " failed: " + (body.error || response.status), "error");
    }
  } catch (error) {
    setStatus(action + " " + address + " failed: " + error.message, "error");
  } finally {
    button.disabled = false;
    poll();
  }
}

// -- rendering ---------------------------------------------------------------------

function render(data) {
  span = data.span;
  $("board").hidden = false;
  $("forget").hidden = !token();
  $("span").textContent = Math.round(span / 60) + " minutes";
  $("window").textContent = data.quantile_window + " s";
  const at = new Date(data.now * 1000).toLocaleTimeString();
  $("meta").textContent = "config version " + data.version + " · updated " + at;
  renderListeners(data.listeners);
  renderClusters(data.clusters);
}

function renderListeners(listeners) {
  const body = $("listeners").tBodies[0];
  sync(body, listeners, (l) => l.name, newListenerRow, (row, l) => {
    row.cells[0].textContent = l.name;
    row.cells[1].textContent = l.bind + " (" + l.protocol + ")";
    row.cells[2].textContent = l.connections == null ? "–" : count(l.connections);
    charts(row, 3, l.series);
  });
}

function newListenerRow() {
  const row = element("tr");
  row.append(element("th", { scope: "row" }), element("td", { class: "mono" }),
    element("td", { class: "num" }));
  addChartCells(row);
  return row;
}

function renderClusters(clusters) {
  sync($("clusters"), clusters, (c) => c.name, newCluster, updateCluster);
}

function newCluster(cluster) {
  const section = element("section", { class: "cluster" });
  const id = "cluster-" + Math.random().toString(36).slice(2);
  const title = element("h2", { id: id });
  section.setAttribute("aria-labelledby", id);
  const head = element("div", { class: "cluster-head" });
  head.append(title, element("p", { class: "meta" }));
  const table = element("table", { class: "grid" });
  const headRow = element("tr");
  for (const [label, cls] of [["Backend", "c-name"], ["State", "c-state"],
    ["Reason", "c-reason"], ["Weight", "c-num num"], ["In flight", "c-num num"],
    ["Requests", "c-num num"], ["Errors", "c-num num"], ["Requests/s", "c-chart"],
    ["Error rate", "c-chart"], ["Latency p50 / p99", "c-latency"], ["Action", "c-action"]]) {
    headRow.append(element("th", { scope: "col", class: cls }, label));
  }
  table.append(element("thead", {}, headRow), element("tbody"), element("tfoot"));
  const scroll = element("div", { class: "scroll" });
  scroll.append(table);
  section.append(head, scroll);
  return section;
}

function updateCluster(section, cluster) {
  const title = section.querySelector("h2");
  title.textContent = cluster.name;
  const up = cluster.backends.filter((b) => b.state === "up").length;
  const meta = section.querySelector(".cluster-head .meta");
  meta.textContent = cluster.policy + " · " + up + " of " + cluster.backends.length +
    " up · snapshot " + cluster.version;
  if (cluster.panic) meta.append(" ", element("span", { class: "badge panic" }, "panic"));
  const table = section.querySelector("table");
  sync(table.tBodies[0], cluster.backends, (b) => b.address, newBackendRow,
    (row, b) => updateBackendRow(row, cluster.name, b));
  renderTotals(table.tFoot, cluster.backends);
}

function newBackendRow() {
  const row = element("tr");
  row.append(element("th", { scope: "row", class: "mono" }), element("td"),
    element("td", { class: "reason" }), element("td", { class: "num" }),
    element("td", { class: "num" }), element("td", { class: "num" }),
    element("td", { class: "num" }));
  addChartCells(row);
  const button = element("button", { type: "button", class: "action" });
  button.addEventListener("click", () => {
    act(button, row.dataset.cluster, row.dataset.address, button.dataset.action);
  });
  row.append(element("td", {}, button));
  return row;
}

function updateBackendRow(row, cluster, b) {
  row.dataset.cluster = cluster;
  row.dataset.address = b.address;
  row.className = "state-" + b.state;
  const name = row.cells[0];
  name.textContent = b.address;
  if (b.backup) name.append(" ", element("span", { class: "tag" }, "backup"));
  const badge = row.cells[1].firstChild || row.cells[1].appendChild(element("span"));
  badge.className = "badge " + b.state;
  badge.textContent = b.state;
  row.cells[2].textContent = b.reason || "";
  row.cells[2].title = b.reason || "";
  row.cells[3].textContent = count(b.weight);
  row.cells[4].textContent = count(b.in_flight);
  row.cells[5].textContent = count(b.requests);
  row.cells[6].textContent = count(b.errors);
  charts(row, 7, b.series);
  const button = row.cells[10].firstChild;
  const action = b.state === "drained" ? "enable" : "drain";
  if (button.dataset.action !== action) {
    button.dataset.action = action;
    button.textContent = action === "drain" ? "Drain" : "Enable";
    button.classList.toggle("enable", action === "enable");
  }
  button.setAttribute("aria-label", button.textContent + " " + b.address + " in " + cluster);
}

function renderTotals(foot, backends) {
  if (!foot.rows.length) {
    const row = element("tr");
    row.append(element("th", { scope: "row" }, "Total"), element("td"), element("td"),
      element("td"), element("td", { class: "num" }), element("td", { class: "num" }),
      element("td", { class: "num" }));
    addChartCells(row);
    row.append(element("td"));
    foot.append(row);
  }
  const row = foot.rows[0];
  const sum = (field) => backends.reduce((acc, b) => acc + b[field], 0);
  row.cells[4].textContent = count(sum("in_flight"));
  row.cells[5].textContent = count(sum("requests"));
  row.cells[6].textContent = count(sum("errors"));
  charts(row, 7, totalSeries(backends));
}

// Backends are sampled together, so their points share their times: sum by time.
function totalSeries(backends) {
  const byTime = new Map();
  for (const b of backends) {
    const s = b.series;
    s.t.forEach((t, i) => {
      const p = byTime.get(t) || { rps: 0, errors: 0 };
      p.rps += s.rps[i];
      p.errors += s.rps[i] * (s.error_rate[i] || 0);
      byTime.set(t, p);
    });
  }
  const t = [...byTime.keys()].sort((a, b) => a - b);
  const rps = t.map((x) => byTime.get(x).rps);
  return {
    t: t, rps: rps,
    error_rate: t.map((x, i) => (rps[i] ? byTime.get(x).errors / rps[i] : null)),
    p50_ms: null, p99_ms: null,   // quantiles do not add up
  };
}

// -- charts ------------------------------------------------------------------------

function addChartCells(row) {
  for (let i = 0; i < 3; i++) {
    const cell = element("td", { class: i === 2 ? "chart latency" : "chart" });
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("viewBox", "0 0 " + CHART_W + " " + CHART_H);
    svg.setAttribute("width", CHART_W);
    svg.setAttribute("height", CHART_H);
    svg.setAttribute("preserveAspectRatio", "none");
    svg.setAttribute("role", "img");
    svg.append(document.createElementNS(SVG, "title"));
    cell.append(svg, element("span", { class: "now" }));
    row.append(cell);
  }
}

function charts(row, first, s) {
  const last = (values) => (values && values.length ? values[values.length - 1] : null);
  const rps = last(s.rps);
  draw(row.cells[first], s.t, [s.rps], ["rps"], 1, "Requests per second",
    rps == null ? "–" : perSecond(rps), perSecond);
  const errors = last(s.error_rate);
  draw(row.cells[first + 1], s.t, [s.error_rate], ["err"], 0.01, "Error rate",
    errors == null ? "–" : percent(errors), percent);
  if (s.p50_ms === null) {      // (a total: no chart)
    row.cells[first + 2].replaceChildren();
    return;
  }
  const p50 = last(s.p50_ms);
  const p99 = last(s.p99_ms);
  draw(row.cells[first + 2], s.t, [s.p99_ms, s.p50_ms], ["p99", "p50"], 1,
    "Latency p50 / p99", p50 == null ? "–" : short(p50) + " / " + ms(p99), ms);
}

// One small chart: `lines` over times `t` (seconds before now, ≤ 0) on [-span, 0],
// from 0 to the largest value (at least `floor`); a null value breaks the line.
// `label` is the value shown beside it; `format` writes the chart's top for its title.
function draw(cell, t, lines, classes, floor, what, label, format) {
  const svg = cell.firstChild;
  let top = floor;
  for (const values of lines) for (const v of values) if (v != null && v > top) top = v;
  const x = (s) => ((s + span) / span * CHART_W).toFixed(1);
  const y = (v) => (CHART_H - 1 - v / top * (CHART_H - 3)).toFixed(1);
  while (svg.childNodes.length > 1) svg.lastChild.remove();
  lines.forEach((values, n) => {
    let d = "";
    let pen = false;
    values.forEach((v, i) => {
      if (v == null) {
        pen = false;
        return;
      }
      d += (pen ? "L" : "M") + x(t[i]) + " " + y(v);
      pen = true;
    });
    if (!d) return;
    const path = document.createElementNS(SVG, "path");
    path.setAttribute("d", d);
    path.setAttribute("class", "line " + classes[n]);
    svg.append(path);
  });
  const summary = what + " over the last " + Math.round(span / 60) + " minutes: now " +
    (label || "–") + ", chart top " + format(top);
  svg.firstChild.textContent = summary;
  svg.setAttribute("aria-label", summary);
  cell.lastChild.textContent = label;
}

// -- helpers -----------------------------------------------------------------------

// Make `parent`'s children match `items` (by `key`), creating, updating, moving and
// removing elements; `make(item)` builds one, `update(element, item)` fills it.
function sync(parent, items, key, make, update) {
  const existing = new Map();
  for (const child of [...parent.children]) existing.set(child.dataset.key, child);
  let previous = null;
  for (const item of items) {
    const k = key(item);
    let node = existing.get(k);
    if (node) existing.delete(k);
    else {
      node = make(item);
      node.dataset.key = k;
    }
    update(node, item);
    const wanted = previous ? previous.nextElementSibling : parent.firstElementChild;
    if (wanted !== node) parent.insertBefore(node, wanted);
    previous = node;
  }
  for (const stale of existing.values()) stale.remove();
}

function element(tag, attributes, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes || {})) {
    if (value) node.setAttribute(name, value);
  }
  node.append(...children);
  return node;
}

const numbers = new Intl.NumberFormat("en-US");

function count(n) {
  return numbers.format(n);
}

function short(v) {
  return v >= 100 ? Math.round(v).toString() : v >= 10 ? v.toFixed(1) : v.toFixed(2);
}

function perSecond(v) {
  return short(v) + "/s";
}

function percent(r) {
  const p = r * 100;
  return (p >= 10 || p === 0 ? p.toFixed(0) : p.toFixed(1)) + " %";
}

function ms(v) {
  return v == null ? "–" : short(v) + " ms";
}

poll();
