// session-sweeper status page: fetches api/status every few seconds and draws it. No
// dependencies; every value is written with textContent, never parsed as HTML.
"use strict";

(function () {
  const REFRESH_MS = 5000;
  const SVG = "http://www.w3.org/2000/svg";
  const LABELS = {
    invalidated: "invalidated",
    already_invalidated: "already invalidated",
    failed: "failed (permanent answer)",
    retried: "retried (transient answer)",
    other: "other (auth, cancelled)",
  };
  let last = null;
  let windowName = "hour";

  const $ = (id) => document.getElementById(id);
  const fmt = (n) => (n === null || n === undefined ? "–" : Number(n).toLocaleString("en-US"));

  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }

  function svg(tag, attrs) {
    const e = document.createElementNS(SVG, tag);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    return e;
  }

  // "4 s", "3 min", "2 h", "5 d"
  function span(seconds) {
    if (seconds > 0 && seconds < 1) return Math.round(seconds * 1000) + " ms";
    if (seconds > 0 && seconds < 10) return seconds.toFixed(1) + " s";
    const s = Math.max(0, Math.round(seconds));
    if (s < 90) return s + " s";
    if (s < 5400) return Math.round(s / 60) + " min";
    if (s < 129600) return Math.round(s / 3600) + " h";
    return Math.round(s / 86400) + " d";
  }

  // Ages are measured on the database's clock (`now`), not the browser's.
  function ago(iso, now) {
    if (!iso) return "never";
    const d = (Date.parse(now) - Date.parse(iso)) / 1000;
    return d >= 0 ? span(d) + " ago" : "in " + span(-d);
  }

  function clock(iso) {
    const d = new Date(iso);
    return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  }

  function fill(tbody, rows, empty, columns) {
    tbody.replaceChildren();
    if (rows.length === 0) {
      const tr = el("tr");
      const td = el("td", empty, "empty");
      td.colSpan = columns;
      tr.append(td);
      tbody.append(tr);
      return;
    }
    for (const cells of rows) {
      const tr = el("tr");
      for (const c of cells) tr.append(c);
      tbody.append(tr);
    }
  }

  function cell(text, cls, title) {
    const td = el("td", text, cls);
    if (title) td.title = title;
    return td;
  }

  function renderHeader(d) {
    $("mode").textContent = d.mode === "run" ? "run · v" + d.settings.version : "serve-status (not sweeping) · v" + d.settings.version;
    const h = $("health");
    let text, cls;
    if (d.mode !== "run") {
      const live = d.fleet.live.length;
      text = live > 0 ? live + " live worker" + (live === 1 ? "" : "s") : "no live worker";
      cls = live > 0 ? "pill-ok" : "pill-warn";
    } else if (d.ready) {
      text = "ready";
      cls = "pill-ok";
    } else {
      text = "not ready";
      cls = "pill-bad";
    }
    h.textContent = text;
    h.className = "pill " + cls;
    $("updated").textContent = "updated " + new Date().toLocaleTimeString();
  }

  function renderOutcomes(d) {
    for (const k in d.outcomes) {
      const e = $("count-" + k);
      if (e) e.textContent = fmt(d.outcomes[k]);
    }
    $("backlog").textContent = fmt(d.backlog.eligible) + (d.backlog.measured === "now" ? " now" : " (at the last sweep's start)");
    const ls = d.last_sweep;
    $("last-sweep").textContent = ls
      ? ls.result + ", " + ago(ls.finished_at, d.now) + (ls.duration_seconds > 0 ? " (took " + span(ls.duration_seconds) + ")" : "")
      : d.mode === "run" ? "none yet" : "not known here (see last API call)";
    if (ls) $("last-sweep").className = ls.result === "ok" ? "" : "bad";
    $("last-call").textContent = ago(d.last_call_at, d.now);
    $("leased").textContent = fmt(d.leased);
    $("source-not-marked").textContent = fmt(d.source_not_marked);
    const u = d.unusable;
    $("unusable").textContent = fmt(u.unreadable_last_activity + u.bad_source_row);
    $("unusable").title = u.unreadable_last_activity + " unreadable last activity, " + u.bad_source_row + " bad source row";
  }

  function renderChart(d) {
    const h = d.chart[windowName];
    const names = d.chart.series;
    const n = h.series[names[0]].length;
    const totals = Array.from({ length: n }, (_, i) => names.reduce((a, s) => a + h.series[s][i], 0));
    const perMinute = h.bucket_seconds / 60;
    const max = Math.max(1, ...totals);
    const W = 720, H = 200, L = 44, B = 22, T = 8;
    const plotW = W - L - 6, plotH = H - B - T;
    const root = svg("svg", { viewBox: "0 0 " + W + " " + H, class: "plot", preserveAspectRatio: "none" });
    // Grid: zero, half, max.
    for (const f of [0, 0.5, 1]) {
      const y = T + plotH - f * plotH;
      root.append(svg("line", { x1: L, x2: W - 6, y1: y, y2: y, class: "grid" }));
      const label = svg("text", { x: L - 6, y: y + 4, class: "axis", "text-anchor": "end" });
      const v = (f * max) / perMinute;
      label.textContent = fmt(v >= 10 ? Math.round(v) : Math.round(v * 10) / 10);
      root.append(label);
    }
    const bw = plotW / n;
    for (let i = 0; i < n; i++) {
      if (totals[i] === 0) continue;
      const g = svg("g", {});
      let y = T + plotH;
      const start = Date.parse(h.start) + i * h.bucket_seconds * 1000;
      const parts = [];
      for (const s of names) {
        const v = h.series[s][i];
        if (!v) continue;
        const hh = (v / max) * plotH;
        y -= hh;
        g.append(svg("rect", { x: L + i * bw + bw * 0.1, y: y, width: Math.max(1, bw * 0.8), height: Math.max(0.5, hh), class: "s-" + s }));
        parts.push(LABELS[s] + " " + v);
      }
      const title = svg("title", {});
      title.textContent = clock(new Date(start).toISOString()) + ": " + parts.join(", ");
      g.append(title);
      root.append(g);
    }
    // Time axis: start, middle, end.
    for (const i of [0, Math.floor(n / 2), n - 1]) {
      const t = svg("text", { x: L + i * bw + bw / 2, y: H - 6, class: "axis", "text-anchor": i === 0 ? "start" : i === n - 1 ? "end" : "middle" });
      t.textContent = clock(new Date(Date.parse(h.start) + i * h.bucket_seconds * 1000).toISOString());
      root.append(t);
    }
    $("chart").replaceChildren(root);
    const legend = $("legend");
    legend.replaceChildren();
    for (const s of names) {
      const total = h.series[s].reduce((a, b) => a + b, 0);
      const li = el("li");
      li.append(el("span", "", "swatch s-" + s), el("span", LABELS[s] + " " + fmt(total)));
      legend.append(li);
    }
    let note = windowName === "hour" ? "API calls per minute, by result, from the attempt log." : "API calls per minute (average of each 15 minutes), by result, from the attempt log.";
    note += " Skipped sessions make no call.";
    if (d.chart.cover_from) note += " Only the newest calls are read: the chart starts at " + clock(d.chart.cover_from) + ".";
    $("chart-note").textContent = note;
  }

  function renderFleet(d) {
    const live = d.fleet.live.map((w) => [
      cell(w.host + (w.this_process ? " (this process)" : "")),
      cell(w.pid),
      cell(w.id, "mono"),
      cell(Math.round(w.heartbeat_age_seconds) + " s ago", "num"),
      cell(fmt(w.leased), "num"),
      cell(w.rate_share === null ? "–" : w.rate_share + "/s", "num"),
      cell(w.clock_skew_seconds === null ? "–" : w.clock_skew_seconds.toFixed(3) + " s", "num"),
    ]);
    fill($("workers").tBodies[0], live, "no live worker", 7);
    const stale = d.fleet.stale_recently;
    $("stale").textContent = stale.length === 0
      ? "No worker went stale in the last hour."
      : "Stale recently: " + stale.map((w) => w.host + " pid " + w.pid + " (last beat " + span(w.heartbeat_age_seconds) + " ago, " + w.leased + " leased)").join("; ") + ".";
  }

  function renderFailures(d) {
    const groups = d.failures.by_code.map((g) => [
      cell(g.error_code || "(none)", "mono"),
      cell(fmt(g.count), "num"),
      cell(g.error_message || "", "msg", g.error_message || ""),
      cell(ago(g.last_failed_at, d.now), "num"),
    ]);
    fill($("failure-codes").tBodies[0], groups, "no failed sessions", 4);
    const latest = d.failures.latest.map((f) => [
      cell(f.session, "mono"),
      cell(f.error_code || "(none)", "mono"),
      cell(f.error_message || "", "msg", f.error_message || ""),
      cell(f.attempts, "num"),
      cell(ago(f.failed_at, d.now), "num"),
    ]);
    fill($("failures").tBodies[0], latest, "none", 5);
  }

  function renderPending(d) {
    const ul = $("pending");
    ul.replaceChildren();
    const max = Math.max(1, ...d.pending.by_due.map((b) => b.count));
    for (const b of d.pending.by_due) {
      const li = el("li");
      const bar = el("span", "", "bar");
      bar.style.width = (100 * b.count) / max + "%";
      const track = el("span", "", "track");
      track.append(bar);
      li.append(el("span", b.label, "bar-label"), track, el("span", fmt(b.count), "bar-value"));
      ul.append(li);
    }
    $("pending-note").textContent = fmt(d.pending.count) + " pending; next due " + (d.pending.next_due ? ago(d.pending.next_due, d.now) : "–") + ".";
  }

  function renderSettings(d) {
    const s = d.settings;
    const rows = [
      ["idle threshold", s.idle_after],
      ["schedule", s.schedule],
      ["rate (fleet)", s.rate_per_second + "/s, burst " + s.burst],
      ["concurrency", s.concurrency],
      ["batch size", s.batch_size],
      ["max attempts", s.max_attempts],
      ["heartbeat", s.heartbeat],
      ["database", s.backend + ", table " + s.source_table],
      ["version", s.version + " (" + s.commit + ")"],
    ];
    const dl = $("settings");
    dl.replaceChildren();
    for (const [k, v] of rows) {
      const div = el("div");
      div.append(el("dt", k), el("dd", v));
      dl.append(div);
    }
  }

  function render(d) {
    renderHeader(d);
    renderOutcomes(d);
    renderChart(d);
    renderFleet(d);
    renderFailures(d);
    renderPending(d);
    renderSettings(d);
  }

  async function refresh() {
    try {
      // Never wait on a stalled server for longer than a few refreshes: say so instead.
      const abort = new AbortController();
      const timer = setTimeout(() => abort.abort(), 15000);
      const r = await fetch("api/status", {
        cache: "no-store", headers: { Accept: "application/json" }, signal: abort.signal,
      }).finally(() => clearTimeout(timer));
      const d = await r.json();
      if (!r.ok) throw new Error(d.error || "HTTP " + r.status);
      last = d;
      $("error").hidden = true;
      render(d);
    } catch (e) {
      const why = e.name === "AbortError" ? "no answer within 15 s" : e.message;
      $("error").textContent = "Could not refresh: " + why + (last ? " (showing the last data)" : "");
      $("error").hidden = false;
    } finally {
      setTimeout(refresh, REFRESH_MS);
    }
  }

  function choose(name) {
    windowName = name;
    $("win-hour").setAttribute("aria-pressed", String(name === "hour"));
    $("win-day").setAttribute("aria-pressed", String(name === "day"));
    if (last) renderChart(last);
  }

  $("win-hour").addEventListener("click", () => choose("hour"));
  $("win-day").addEventListener("click", () => choose("day"));
  refresh();
})();
