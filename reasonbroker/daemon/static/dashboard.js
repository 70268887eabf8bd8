// The dashboard's live refresh: poll the JSON API (docs/dashboard.md) once a
// second and render the same tables the server rendered. No framework, no build.
"use strict";
(function () {
  const EVERY_MS = 1000;

  function esc(value) {
    const s = value === null || value === undefined ? "" : String(value);
    return s.replace(/[&<>"']/g, (c) =>
      ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
  }
  function duration(s) {
    if (s === null || s === undefined) return "";
    if (s < 1) return (s * 1000).toFixed(0) + " ms";
    if (s < 120) return s.toFixed(1) + " s";
    if (s < 7200) return (s / 60).toFixed(0) + " min";
    return (s / 3600).toFixed(1) + " h";
  }
  function ago(at, now) { return at === null || at === undefined ? "" : duration(Math.max(now - at, 0)) + " ago"; }
  function num(v) {
    if (v === null || v === undefined) return "-";
    if (typeof v === "number" && !Number.isInteger(v)) return v < 100 ? v.toFixed(1) : v.toFixed(0);
    return String(v);
  }
  function pipelinesOf(r) {
    if (r.pipelines === null) return "(all)";
    const more = r.pipelines_count - r.pipelines.length;
    return r.pipelines.join(", ") + (more > 0 ? " (+" + more + ")" : "");
  }

  const COLUMNS = {
    workers: [
      ["name", (r) => esc(r.name || "conn " + r.conn)],
      ["address", (r) => esc(r.address)],
      ["pipelines", (r) => esc(pipelinesOf(r))],
      ["capacity", (r) => esc(r.capacity)],
      ["busy", (r) => esc(r.busy)],
      ["done", (r) => esc(r.done)],
      ["failed", (r) => esc(r.failed)],
      ["connected", (r, now) => esc(ago(r.connected_at, now))],
      ["heard", (r) => esc(duration(r.last_heard_s) + " ago")],
      ["state", (r) => (r.draining ? "<span class=draining>draining</span>" : "")],
    ],
    pipelines: [
      ["pipeline", (r) => esc(r.pipeline)],
      ["queued", (r) => esc(r.queued)],
      ["running", (r) => esc(r.running)],
      ["done", (r) => esc(r.done)],
      ["failed", (r) => esc(r.failed)],
      ["workers", (r) => esc(r.workers)],
      ["oldest", (r) => esc(duration(r.oldest_queued_s))],
    ],
    clients: [
      ["name", (r) => esc(r.name || "conn " + r.conn)],
      ["address", (r) => esc(r.address)],
      ["in_flight", (r) => esc(r.in_flight)],
      ["connected", (r, now) => esc(ago(r.connected_at, now))],
      ["heard", (r) => esc(duration(r.last_heard_s) + " ago")],
    ],
    failures: [
      ["ended", (r, now) => esc(ago(r.ended_at, now))],
      ["cookie", (r) => "<a href='/?cookie=" + esc(r.cookie) + "'>" + esc(r.cookie) + "</a>"],
      ["pipeline", (r) => esc(r.pipeline)],
      ["rc", (r) => esc(r.rc)],
      ["attempts", (r) => esc(r.attempts)],
      ["error", (r) => esc((r.error || "").slice(0, 200))],
    ],
  };

  // The page lists this many recent failures; /api/failures has them all (50).
  const FAILURES_SHOWN = 10;

  function renderTable(name, listing) {
    const cols = COLUMNS[name];
    if (name === "failures" && listing.rows.length > FAILURES_SHOWN) {
      listing = Object.assign({}, listing, {
        rows: listing.rows.slice(0, FAILURES_SHOWN), truncated: true });
    }
    const body = document.querySelector("#" + name + " tbody");
    if (!body) return;
    if (!listing.rows.length) {
      body.innerHTML = "<tr><td colspan=" + cols.length + " class=muted>none</td></tr>";
      return;
    }
    let out = "";
    for (const row of listing.rows) {
      out += "<tr>" + cols.map(([key, cell]) =>
        "<td class=c-" + key + ">" + cell(row, listing.now) + "</td>").join("") + "</tr>";
    }
    if (listing.truncated) {
      out += "<tr><td colspan=" + cols.length + " class=muted>" + listing.rows.length +
        " of " + listing.total + " shown</td></tr>";
    }
    body.innerHTML = out;
  }

  function sparkline(svg, values) {
    const w = 300, h = 60;
    const points = values.filter((v) => v !== null);
    let top = points.length ? Math.max(...points) : 0;
    if (!(top > 0)) top = 1;
    const n = Math.max(values.length - 1, 1);
    const coords = [];
    values.forEach((v, i) => {
      if (v !== null) coords.push((i * w / n).toFixed(1) + "," + (h - (v / top) * (h - 4) - 2).toFixed(1));
    });
    svg.querySelector("polyline").setAttribute("points", coords.join(" "));
  }

  function renderOverview(ov) {
    for (const [key, value] of Object.entries(ov.totals)) {
      const el = document.getElementById("total-" + key);
      if (el) el.textContent = num(value);
    }
    for (const [key, values] of Object.entries(ov.series)) {
      const svg = document.getElementById("chart-" + key);
      if (svg) sparkline(svg, values);
      const last = document.getElementById("last-" + key);
      if (last) last.textContent = num(values.length ? values[values.length - 1] : null);
    }
    const nodes = ov.nodes.map((n) => n.name).join(", ");
    document.getElementById("meta").textContent = "version " + ov.version + " (" +
      (ov.compiled ? "compiled" : "pure Python") + ", " +
      (ov.journal.durable ? "journal" : "no journal") + ") · node " + nodes +
      " · up " + duration(ov.uptime_s);
  }

  async function getJSON(path) {
    const response = await fetch(path, { credentials: "same-origin", cache: "no-store" });
    if (response.status === 401) { location.reload(); throw new Error("unauthorized"); }
    const body = await response.json();
    return { status: response.status, body: body };
  }

  let refreshes = 0;
  async function refresh() {
    try {
      const [ov, workers, pipelines, clients, failures] = await Promise.all(
        ["overview", "workers", "pipelines", "clients", "failures"].map((v) => getJSON("/api/" + v)));
      renderOverview(ov.body);
      renderTable("workers", workers.body);
      renderTable("pipelines", pipelines.body);
      renderTable("clients", clients.body);
      renderTable("failures", failures.body);
      refreshes += 1;
      const live = document.getElementById("live");
      live.textContent = "live";
      live.dataset.refreshes = String(refreshes);
    } catch (err) {
      document.getElementById("live").textContent = "not refreshing: " + err;
    }
    setTimeout(refresh, EVERY_MS);
  }

  function renderJob(job) {
    const keys = ["cookie", "state", "pipeline", "attempts", "max_attempts", "rc", "error",
      "accepted_at", "ended_at", "latency_s", "age_s", "worker_conn", "client_conn", "retained"];
    let out = "";
    for (const key of keys) {
      if (job[key] !== undefined && job[key] !== null) {
        let value = job[key];
        if (key.endsWith("_at")) value = new Date(value * 1000).toISOString();
        else if (key.endsWith("_s")) value = duration(value);
        out += "<dt>" + esc(key) + "</dt><dd class=j-" + key + ">" + esc(value) + "</dd>";
      }
    }
    if (job.stacktrace && job.stacktrace.length) {
      out += "<dt>stacktrace</dt><dd><pre>" + esc(job.stacktrace.map((l) => (l.endsWith("\n") ? l : l + "\n")).join("")) + "</pre></dd>";
    }
    for (const key of ["variables", "result"]) {
      const shown = job[key];
      if (shown) {
        out += "<dt>" + key + (shown.truncated ? " (truncated)" : "") + "</dt><dd><pre>" +
          esc(shown.text) + "</pre></dd>";
      }
    }
    return "<dl class=job id=job-found>" + out + "</dl>";
  }

  async function lookup(cookie, payload) {
    const target = document.getElementById("job");
    const path = "/api/jobs/" + encodeURIComponent(cookie.trim()) + (payload ? "?payload=1" : "");
    try {
      const got = await getJSON(path);
      target.innerHTML = got.status === 200 ? renderJob(got.body)
        : "<p class=error id=job-missing>" + esc(got.body.error) + "</p>";
    } catch (err) {
      target.innerHTML = "<p class=error>" + esc(err) + "</p>";
    }
  }

  const form = document.getElementById("lookup");
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    lookup(form.elements.cookie.value, form.elements.payload.checked);
  });
  document.addEventListener("click", (event) => {
    const link = event.target.closest("a[href^='/?cookie=']");
    if (!link) return;
    event.preventDefault();
    const cookie = new URL(link.href).searchParams.get("cookie");
    form.elements.cookie.value = cookie;
    lookup(cookie, form.elements.payload.checked);
  });
  refresh();
})();
