/* Draws one Grafana dashboard JSON from a Prometheus: resolves the template variables, lays the panels out by
 * gridPos (24 columns, 30 px rows, 8 px gaps, as Grafana), queries each panel's targets and draws timeseries
 * as uPlot charts, stat and bargauge as reduced values, tables as tables. When every panel has finished it
 * sets data-ready on <body>; window.renderReport lists each panel's state, the queries Prometheus refused and
 * (report.unfinished) any panel still loading at that moment, which would be a bug of this page. */
(function () {
  "use strict";
  const G = window.GrafanaLite;
  const CELL = 30, GAP = 8;
  const params = new URLSearchParams(location.search);
  const api = (params.get("api") || "").replace(/\/$/, "");
  const report = (window.renderReport = { panels: [], errors: [], warnings: [] });
  let timezone = "browser";

  class QueryError extends Error {}

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (key === "style") Object.assign(node.style, value); else node.setAttribute(key, value);
    }
    for (const child of children) if (child !== null && child !== undefined) node.append(child);
    return node;
  }

  async function prometheus(path, query) {
    const response = await fetch(`${api}/api/v1/${path}?${new URLSearchParams(query)}`);
    let body;
    try { body = await response.json(); } catch (e) { body = null; }
    if (!response.ok || !body || body.status !== "success") {
      const reason = body && body.error ? `${body.errorType ? body.errorType + ": " : ""}${body.error}` : `HTTP ${response.status}`;
      throw new QueryError(reason);
    }
    return body.data;
  }

  /** from/to as Grafana writes them ("now-30m", "now", epoch ms) -> epoch ms. */
  function timeOf(text, now) {
    if (/^\d+$/.test(text)) return Number(text);
    const m = /^now(?:-(.+))?$/.exec(text);
    if (!m) throw new Error(`time ${JSON.stringify(text)}: write now, now-30m or epoch milliseconds`);
    return now - (m[1] ? G.parseDuration(m[1]) : 0);
  }

  async function resolveVariables(dashboard, fromMs, toMs) {
    const variables = {};
    const shown = [];
    const window_ = { start: String(fromMs / 1000), end: String(toMs / 1000) };
    for (const v of (dashboard.templating && dashboard.templating.list) || []) {
      let options = [];
      if (v.type === "query") {
        const text = G.interpolate(typeof v.query === "string" ? v.query : (v.query && v.query.query) || v.definition, variables);
        const parsed = G.parseLabelValues(text);
        if (!parsed) report.warnings.push(`variable ${v.name}: only label_values(...) queries are resolved; ${text} gives no options`);
        else {
          const query = { ...window_ };
          if (parsed.selector) query["match[]"] = parsed.selector;
          options = G.sortOptions(await prometheus(`label/${encodeURIComponent(parsed.label)}/values`, query), v.sort || 0);
        }
      } else if (v.type === "custom") {
        options = String(v.query || "").split(",").map((s) => s.trim()).filter(Boolean);
      } else if (v.type === "constant" || v.type === "textbox" || v.type === "interval") {
        options = [String(v.query || "").split(",")[0].trim()];
      } else {
        report.warnings.push(`variable ${v.name}: type ${v.type} is not supported by this renderer`);
      }
      const asked = params.getAll(`var-${v.name}`);
      const current = v.current && v.current.value !== undefined && v.current.value !== "" ? [].concat(v.current.value) : [];
      let value = asked.length ? asked : current.length ? current : v.includeAll ? ["$__all"] : options.slice(0, 1);
      if (value.includes("All") || value.includes("$__all")) value = ["$__all"];
      variables[v.name] = { value: value.length ? value : [""], multi: !!v.multi, includeAll: !!v.includeAll, allValue: v.allValue, options };
      if (v.hide !== 2) shown.push([v.label || v.name, value[0] === "$__all" ? "All" : value.join(" + ") || "None"]);
    }
    return { variables, shown };
  }

  function layoutBox(gridPos, width) {
    const col = (width - 23 * GAP) / 24;
    return { left: gridPos.x * (col + GAP), top: gridPos.y * (CELL + GAP), width: gridPos.w * col + (gridPos.w - 1) * GAP, height: gridPos.h * CELL + (gridPos.h - 1) * GAP };
  }

  function px(box) {
    return { left: `${box.left}px`, top: `${box.top}px`, width: `${box.width}px`, height: `${box.height}px` };
  }

  /** Every target of a panel -> [{name, labels, refId, points: [[seconds, value|null]]}]. */
  async function runTargets(panel, ctx, widthPx) {
    const iv = G.intervals(ctx.fromMs, ctx.toMs, widthPx, ctx.scrapeMs);
    const vars = { ...ctx.variables, ...G.builtins(ctx.fromMs, ctx.toMs, iv) };
    const stepS = iv.intervalMs / 1000;
    const start = Math.floor(ctx.fromMs / 1000 / stepS) * stepS, end = Math.floor(ctx.toMs / 1000 / stepS) * stepS;
    const jobs = (panel.targets || []).filter((t) => !t.hide).map(async (target) => {
      if (!target.expr) return [];
      const expr = G.interpolate(target.expr, vars);
      const instant = target.instant === true && target.range !== true;
      let data;
      try {
        data = instant ? await prometheus("query", { query: expr, time: String(ctx.toMs / 1000) })
          : await prometheus("query_range", { query: expr, start: String(start), end: String(end), step: String(stepS) });
      } catch (e) {
        if (e instanceof QueryError) e.message = `query ${target.refId || "?"} (${expr}): ${e.message}`;
        throw e;
      }
      const legend = G.interpolate(target.legendFormat || "", vars);
      const rows = data.resultType === "scalar" || data.resultType === "string" ? [{ metric: {}, value: data.result }] : data.result;
      return rows.map((row) => ({
        name: G.seriesName(legend, row.metric, expr), labels: row.metric, refId: target.refId,
        points: (row.values || [row.value]).map(([t, v]) => [Number(t), G.sampleValue(v)]),
      }));
    });
    return (await Promise.all(jobs)).flat();
  }

  function noData(body) {
    body.append(el("div", { class: "nodata" }, "No data"));
  }

  function unitOf(panel) {
    const defaults = (panel.fieldConfig && panel.fieldConfig.defaults) || {};
    return { unit: defaults.unit, decimals: defaults.decimals, thresholds: defaults.thresholds, min: defaults.min, max: defaults.max };
  }

  function drawTimeseries(panel, body, series) {
    const { unit, decimals } = unitOf(panel);
    const custom = (panel.fieldConfig && panel.fieldConfig.defaults && panel.fieldConfig.defaults.custom) || {};
    const xs = [...new Set(series.flatMap((s) => s.points.map((p) => p[0])))].sort((a, b) => a - b);
    const index = new Map(xs.map((x, i) => [x, i]));
    const columns = series.map((s) => {
      const column = new Array(xs.length).fill(null);
      for (const [t, v] of s.points) column[index.get(t)] = v;
      return column;
    });
    const stacked = custom.stacking && custom.stacking.mode && custom.stacking.mode !== "none";
    if (stacked && custom.stacking.mode !== "normal") report.warnings.push(`${panel.title}: stacking ${custom.stacking.mode} drawn as normal`);
    const drawn = stacked ? columns.map((_, i) => xs.map((__, j) => columns.slice(0, i + 1).reduce((sum, c) => sum + (c[j] || 0), 0))) : columns;
    const colors = series.map((_, i) => G.PALETTE[i % G.PALETTE.length]);
    const legendOptions = (panel.options && panel.options.legend) || { displayMode: "list", calcs: [] };
    if (legendOptions.showLegend !== false && legendOptions.displayMode !== "hidden") body.append(legend(series, columns, colors, legendOptions, unit, decimals));
    const chart = el("div", { class: "chart" });
    body.prepend(chart);
    const fill = (custom.fillOpacity || 0) / 100;
    const axis = { stroke: "rgba(204, 204, 220, 0.65)", grid: { stroke: "rgba(204, 204, 220, 0.07)", width: 1 },
      ticks: { stroke: "rgba(204, 204, 220, 0.07)", width: 1 }, font: FONT };
    const options = {
      width: chart.clientWidth, height: Math.max(60, chart.clientHeight), legend: { show: false }, cursor: { show: false },
      scales: { x: { time: true } },
      series: [{}, ...series.map((s, i) => ({ label: s.name, stroke: colors[i], width: custom.lineWidth || 1, points: { show: custom.showPoints === "always" },
        fill: fill > 0 || stacked ? G.alpha(colors[i], stacked ? Math.max(fill, 0.3) : fill) : undefined, spanGaps: custom.spanNulls === true }))],
      bands: stacked ? series.slice(1).map((_, i) => ({ series: [i + 2, i + 1] })) : undefined,
      axes: [{ ...axis, size: 28, space: 90, values: (u, ticks, _, __, step) => ticks.map((t) => clock(t, step)) },
        { ...axis, size: (u, values) => (values ? Math.ceil(Math.max(...values.map((v) => measure.measureText(v).width))) + 24 : 40),
          values: (u, ticks) => ticks.map((v) => G.formatValue(unit, v, decimals)) }],
    };
    new window.uPlot(options, [xs, ...drawn], chart);
  }

  const FONT = "12px Inter, Arial, 'DejaVu Sans', sans-serif";
  const measure = document.createElement("canvas").getContext("2d");
  measure.font = FONT;

  /** A time tick as Grafana labels it: seconds on short ranges, minutes within a day, else the date. */
  function clock(seconds, step) {
    const date = new Date(seconds * 1000);
    const utc = timezone === "utc";
    const two = (n) => String(n).padStart(2, "0");
    const [h, m, s] = utc ? [date.getUTCHours(), date.getUTCMinutes(), date.getUTCSeconds()] : [date.getHours(), date.getMinutes(), date.getSeconds()];
    const [mo, d] = utc ? [date.getUTCMonth() + 1, date.getUTCDate()] : [date.getMonth() + 1, date.getDate()];
    if (step < 60) return `${two(h)}:${two(m)}:${two(s)}`;
    if (step < 86400) return `${two(h)}:${two(m)}`;
    return `${two(mo)}/${two(d)}`;
  }

  function legend(series, columns, colors, options, unit, decimals) {
    const calcs = options.displayMode === "table" ? options.calcs || [] : [];
    const table = el("table", { class: "legend" });
    if (calcs.length) table.append(el("tr", {}, el("th", {}), ...calcs.map((c) => el("th", {}, G.CALC_NAMES[c] || c))));
    series.forEach((s, i) => {
      const name = el("td", { class: "name" }, el("span", { class: "swatch", style: { background: colors[i] } }), s.name);
      table.append(el("tr", {}, name, ...calcs.map((c) => el("td", {}, G.formatValue(unit, G.reduce(c, columns[i]), decimals)))));
    });
    return table;
  }

  function sparkline(points, stroke) {
    const values = points.filter((p) => p[1] !== null);
    if (values.length < 2) return null;
    const [t0, t1] = [values[0][0], values[values.length - 1][0]];
    const ys = values.map((p) => p[1]);
    const [lo, hi] = [Math.min(...ys), Math.max(...ys)];
    const xy = values.map(([t, v]) => `${((t - t0) / (t1 - t0 || 1)) * 100},${hi === lo ? 50 : 100 - ((v - lo) / (hi - lo)) * 90}`);
    const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
    svg.setAttribute("viewBox", "0 0 100 100");
    svg.setAttribute("preserveAspectRatio", "none");
    svg.innerHTML = `<path d="M0,100 L${xy.join(" L")} L100,100 Z" fill="${G.alpha(stroke, 0.15)}" stroke="none"/>`
      + `<polyline points="${xy.join(" ")}" fill="none" stroke="${stroke}" stroke-width="1.5" vector-effect="non-scaling-stroke"/>`;
    return svg;
  }

  function drawStat(panel, body, series) {
    const { unit, decimals, thresholds } = unitOf(panel);
    const options = panel.options || {};
    const calc = ((options.reduceOptions && options.reduceOptions.calcs) || ["lastNotNull"])[0];
    const box = el("div", { class: "stats" });
    body.append(box);
    const height = body.clientHeight;
    for (const s of series) {
      const value = G.reduce(calc, s.points.map((p) => p[1]));
      const colour = G.thresholdColor(thresholds, value);
      const text = options.textMode === "name" ? s.name : G.formatValue(unit, value, decimals);
      const showName = options.textMode === "value_and_name" || (options.textMode !== "name" && options.textMode !== "value" && series.length > 1);
      const background = options.colorMode === "background";
      const tile = el("div", { class: "stat", "data-series": s.name, style: background ? { background: colour } : {} });
      const size = Math.max(14, Math.min(height * (showName ? 0.4 : 0.5), (body.clientWidth / series.length) / (0.62 * Math.max(3, text.length))));
      if (showName) tile.append(el("div", { class: "name" }, s.name));
      tile.append(el("div", { class: "value", style: { fontSize: `${size}px`, color: background || options.colorMode === "none" ? "#fff" : colour } }, text));
      if (options.graphMode === "area") {
        const line = sparkline(s.points, background ? "#ffffff" : colour);
        if (line) tile.append(line);
      }
      box.append(tile);
    }
  }

  function drawBarGauge(panel, body, series) {
    const { unit, decimals, thresholds, min, max } = unitOf(panel);
    const calc = (((panel.options || {}).reduceOptions || {}).calcs || ["lastNotNull"])[0];
    const values = series.map((s) => G.reduce(calc, s.points.map((p) => p[1])));
    const present = values.filter((v) => v !== null);
    const lo = min !== undefined ? min : Math.min(0, ...present);
    const hi = max !== undefined ? max : Math.max(...present, lo + 1e-9);
    const box = el("div", { class: "bars" });
    series.forEach((s, i) => {
      const colour = G.thresholdColor(thresholds, values[i]);
      const share = values[i] === null ? 0 : Math.max(0, Math.min(1, (values[i] - lo) / (hi - lo)));
      const fill = el("div", { class: "fill", style: { width: `${share * 100}%`, background: `linear-gradient(90deg, ${G.alpha(colour, 0.35)}, ${colour})` } });
      box.append(el("div", { class: "bar", "data-series": s.name }, el("span", { class: "name" }, s.name),
        el("div", { class: "track" }, fill), el("span", { class: "num", style: { color: colour } }, G.formatValue(unit, values[i], decimals))));
    });
    body.append(box);
  }

  function drawTable(panel, body, series) {
    const { unit, decimals } = unitOf(panel);
    const labelNames = [...new Set(series.flatMap((s) => Object.keys(s.labels)))].sort();
    let columns = ["Time", ...labelNames, "Value"];
    const rows = series.map((s) => {
      const last = [...s.points].reverse().find((p) => p[1] !== null) || s.points[s.points.length - 1] || [null, null];
      return { Time: last[0], ...s.labels, Value: last[1] };
    });
    const renamed = {};
    for (const t of panel.transformations || []) {
      if (t.id !== "organize") { report.warnings.push(`${panel.title}: transformation ${t.id} is not applied by this renderer`); continue; }
      const o = t.options || {};
      columns = columns.filter((c) => !(o.excludeByName || {})[c]);
      if (o.indexByName) columns.sort((a, b) => (o.indexByName[a] ?? 1e9) - (o.indexByName[b] ?? 1e9));
      Object.assign(renamed, o.renameByName || {});
    }
    const cell = (column, value) => column === "Time" ? new Date(value * 1000).toISOString().replace("T", " ").slice(0, 19)
      : column === "Value" ? G.formatValue(unit, value, decimals) : value ?? "";
    const table = el("table", { class: "data" }, el("tr", {}, ...columns.map((c) => el("th", {}, renamed[c] || c))));
    for (const row of rows) table.append(el("tr", {}, ...columns.map((c) => el("td", {}, String(cell(c, row[c]))))));
    body.append(table);
  }

  const DRAW = { timeseries: drawTimeseries, stat: drawStat, gauge: drawStat, bargauge: drawBarGauge, table: drawTable };

  async function renderPanel(panel, grid, width, ctx) {
    const box = layoutBox(panel.gridPos, width);
    const entry = { id: panel.id, title: panel.title || "", type: panel.type, state: "loading", series: 0 };
    report.panels.push(entry);
    const node = el("section", { class: "panel", "data-panel-id": String(panel.id), "data-type": panel.type, "data-state": "loading", style: px(box) },
      el("h2", { class: "panel-title" }, G.interpolate(panel.title || "", ctx.variables)));
    const body = el("div", { class: "panel-body" });
    node.append(body);
    grid.append(node);
    try {
      if (!DRAW[panel.type]) throw new Error(`panel type ${panel.type} is not supported by this renderer`);
      const ds = panel.datasource;
      if (ds && ds.type && ds.type !== "prometheus") throw new Error(`datasource ${ds.type} is not supported; only Prometheus is`);
      const config = panel.fieldConfig || {};
      for (const [what, list] of [["overrides", config.overrides], ["value mappings", config.defaults && config.defaults.mappings]]) {
        if (list && list.length) report.warnings.push(`${panel.title}: ${what} are not applied by this renderer`);
      }
      const series = await runTargets(panel, ctx, box.width);
      entry.series = series.length;
      const empty = !series.length || series.every((s) => s.points.every((p) => p[1] === null));
      if (empty) noData(body); else DRAW[panel.type](panel, body, series);
      entry.state = empty ? "nodata" : "ok";
    } catch (e) {
      entry.state = "error";
      entry.error = e.message;
      report.errors.push({ panel: entry.title, id: panel.id, refused: e instanceof QueryError, error: e.message });
      body.append(el("div", { class: "error" }, e.message));
    }
    node.dataset.state = entry.state;
  }

  function flatten(panels) {
    const out = [];
    for (const panel of panels || []) {
      out.push(panel);
      if (panel.type === "row" && !panel.collapsed) out.push(...(panel.panels || []));
    }
    return out;
  }

  /** "30m" -> "30 minutes", as Grafana's time picker says it; compound durations stay as written. */
  function spoken(duration) {
    const m = /^(\d+)([smhdw])$/.exec(duration);
    if (!m) return duration;
    const unit = { s: "second", m: "minute", h: "hour", d: "day", w: "week" }[m[2]];
    return `${m[1]} ${unit}${m[1] === "1" ? "" : "s"}`;
  }

  async function main() {
    const now = Date.now();
    const ctx = { fromMs: timeOf(params.get("from") || "now-6h", now), toMs: timeOf(params.get("to") || "now", now),
      scrapeMs: G.parseDuration(params.get("scrape") || "15s") };
    const source = params.get("dashboard");
    if (!source) throw new Error("no dashboard: open this page with ?dashboard=<url of a dashboard JSON>");
    const response = await fetch(source);
    if (!response.ok) throw new Error(`dashboard ${source}: HTTP ${response.status}`);
    const dashboard = await response.json();
    timezone = dashboard.timezone || "browser";
    document.title = dashboard.title || source;
    document.getElementById("title").textContent = dashboard.title || source;
    const relative = /^now-(.+)$/.exec(params.get("from") || "now-6h");
    document.getElementById("time").textContent = relative && (params.get("to") || "now") === "now" ? `Last ${spoken(relative[1])}`
      : `${new Date(ctx.fromMs).toISOString()} to ${new Date(ctx.toMs).toISOString()}`;
    const { variables, shown } = await resolveVariables(dashboard, ctx.fromMs, ctx.toMs);
    ctx.variables = variables;
    const vars = document.getElementById("vars");
    for (const [label, value] of shown) vars.append(el("div", { class: "var" }, el("span", { class: "label" }, label), el("span", {}, value)));
    const grid = document.getElementById("grid");
    const width = grid.clientWidth;
    const panels = flatten(dashboard.panels);
    const bottom = Math.max(0, ...panels.map((p) => p.gridPos.y + p.gridPos.h));
    grid.style.height = `${bottom * (CELL + GAP) - GAP}px`;
    const jobs = [];
    for (const panel of panels) {
      if (panel.type === "row") {
        const box = layoutBox(panel.gridPos, width);
        const hidden = panel.collapsed ? ` (${(panel.panels || []).length} panels)` : "";
        grid.append(el("div", { class: "row", "data-type": "row", style: px(box) }, el("span", { class: "chevron" }, panel.collapsed ? "▸" : "▾"),
          el("span", { class: "row-title" }, G.interpolate(panel.title || "", variables) + hidden)));
        report.panels.push({ id: panel.id, title: panel.title || "", type: "row", state: "ok", series: 0 });
      } else {
        jobs.push(renderPanel(panel, grid, width, ctx));
      }
    }
    await Promise.all(jobs);
  }

  main().catch((e) => {
    report.errors.push({ panel: null, refused: e instanceof QueryError, error: e.message });
    document.getElementById("grid").append(el("div", { class: "error" }, e.message));
  }).finally(() => {
    report.unfinished = report.panels.filter((p) => p.state === "loading").map((p) => p.title);
    document.body.dataset.ready = "true";
  });
})();
