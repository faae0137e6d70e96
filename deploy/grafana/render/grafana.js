/* What Grafana decides before it draws, as pure functions (no DOM, no network): time intervals, template
 * variable interpolation, series names, reducers, units and threshold colours. render.js draws with them;
 * tests/test_dashboard_render.py calls them in the browser as window.GrafanaLite. */
(function (root) {
  "use strict";

  // Grafana's "palette-classic" series colours and the named colours dashboards use in thresholds.
  const PALETTE = ["#7EB26D", "#EAB839", "#6ED0E0", "#EF843C", "#E24D42", "#1F78C1", "#BA43A6", "#705DA0",
    "#508642", "#CCA300", "#447EBC", "#C15C17", "#890F02", "#0A437C", "#6D1F62", "#584477"];
  const NAMED = {
    green: "#73BF69", "dark-green": "#37872D", "semi-dark-green": "#56A64B", "light-green": "#96D98D",
    red: "#F2495C", "dark-red": "#C4162A", "semi-dark-red": "#E02F44", "light-red": "#FF7383",
    orange: "#FF9830", "dark-orange": "#FA6400", "semi-dark-orange": "#FF780A", "light-orange": "#FFB357",
    yellow: "#FADE2A", "dark-yellow": "#E0B400", "semi-dark-yellow": "#F2CC0C", "light-yellow": "#FFEE52",
    blue: "#5794F2", "dark-blue": "#1F60C4", "semi-dark-blue": "#3274D9", "light-blue": "#8AB8FF",
    purple: "#B877D9", "dark-purple": "#8F3BB8", "semi-dark-purple": "#A352CC", "light-purple": "#CA95E5",
    text: "#CCCCDC", transparent: "rgba(0,0,0,0)",
  };
  const DEFAULT_THRESHOLDS = { mode: "absolute", steps: [{ color: "green", value: null }, { color: "red", value: 80 }] };
  const UNITS_MS = { ms: 1, s: 1000, m: 60000, h: 3600000, d: 86400000, w: 604800000, y: 31536000000 };

  /** "30m", "1h30m", "15s" -> milliseconds; throws on anything else. */
  function parseDuration(text) {
    const trimmed = String(text).trim();
    const parts = /^(\d+(ms|[smhdwy]))+$/.test(trimmed) ? trimmed.match(/\d+(ms|[smhdwy])/g) : null;
    if (!parts) throw new Error(`not a duration: ${JSON.stringify(text)} (write e.g. 30m, 1h, 15s)`);
    return parts.reduce((sum, part) => {
      const [, n, unit] = part.match(/^(\d+)(ms|[smhdwy])$/);
      return sum + Number(n) * UNITS_MS[unit];
    }, 0);
  }

  /** Milliseconds -> the shortest PromQL duration that says it (90000 -> "90s", 120000 -> "2m"). */
  function promDuration(ms) {
    ms = Math.max(1, Math.round(ms));
    for (const unit of ["d", "h", "m", "s"]) if (ms % UNITS_MS[unit] === 0) return `${ms / UNITS_MS[unit]}${unit}`;
    return `${ms}ms`;
  }

  /** Grafana's kbn.roundInterval: a raw interval snapped to a readable one. */
  function roundInterval(ms) {
    const table = [[10, 1], [15, 10], [35, 20], [75, 50], [150, 100], [350, 200], [750, 500], [1500, 1000],
      [3500, 2000], [7500, 5000], [12500, 10000], [17500, 15000], [25000, 20000], [45000, 30000], [90000, 60000],
      [210000, 120000], [450000, 300000], [750000, 600000], [1050000, 900000], [1500000, 1200000],
      [2700000, 1800000], [5400000, 3600000], [9000000, 7200000], [16200000, 10800000], [24300000, 21600000],
      [64800000, 43200000], [129600000, 86400000]];
    for (const [upTo, value] of table) if (ms <= upTo) return value;
    return 604800000;
  }

  /** $__interval (also the query step) and $__rate_interval for a time range drawn `widthPx` wide. */
  function intervals(fromMs, toMs, widthPx, scrapeMs) {
    const intervalMs = Math.max(scrapeMs, roundInterval((toMs - fromMs) / Math.max(1, widthPx)));
    return { intervalMs, rateIntervalMs: Math.max(intervalMs + scrapeMs, 4 * scrapeMs) };
  }

  function regexEscape(value) {
    return String(value).replace(/[\\^$*+?.()|{}[\]]/g, "\\\\$&");
  }

  /** The text a variable puts into a PromQL expression (Grafana's Prometheus interpolateQueryExpr). */
  function variableText(variable) {
    const values = [].concat(variable.value);
    if (values.length === 1 && values[0] === "$__all") {
      if (variable.allValue) return variable.allValue;
      return variableText({ ...variable, value: variable.options || [] });
    }
    if (!variable.multi && !variable.includeAll) return String(values[0] ?? "").replace(/\\/g, "\\\\").replace(/'/g, "\\'");
    const escaped = values.map(regexEscape);
    return escaped.length === 1 ? escaped[0] : `(${escaped.join("|")})`;
  }

  /** Replace $name, ${name}, ${name:format} and [[name]] with their values; unknown names stay as written. */
  function interpolate(text, variables) {
    return String(text).replace(/\$(\w+)|\[\[(\w+)(?::\w+)?\]\]|\$\{(\w+)(?::[^}]+)?\}/g, (whole, a, b, c) => {
      const name = a || b || c;
      const variable = variables[name];
      if (variable === undefined) return whole;
      return typeof variable === "string" ? variable : variableText(variable);
    });
  }

  /** The built-in variables of one panel's queries. */
  function builtins(fromMs, toMs, iv) {
    const rangeMs = toMs - fromMs;
    return {
      __interval: promDuration(iv.intervalMs), __interval_ms: String(iv.intervalMs),
      __rate_interval: promDuration(iv.rateIntervalMs), __rate_interval_ms: String(iv.rateIntervalMs),
      __range: `${Math.round(rangeMs / 1000)}s`, __range_s: String(Math.round(rangeMs / 1000)),
      __range_ms: String(rangeMs), DS_PROMETHEUS: "prometheus",
    };
  }

  /** label_values(selector, label) or label_values(label) -> {selector, label}; anything else -> null. */
  function parseLabelValues(query) {
    const m = String(query).trim().match(/^label_values\(\s*(?:(.+?)\s*,\s*)?([A-Za-z_]\w*)\s*\)$/s);
    return m ? { selector: m[1] || null, label: m[2] } : null;
  }

  /** Variable options in the order of Grafana's `sort` (0 as given, 1/2 alphabetical, 3/4 numerical). */
  function sortOptions(values, sort) {
    const copy = [...values];
    if (sort === 1 || sort === 2) copy.sort((a, b) => a.localeCompare(b));
    if (sort === 3 || sort === 4) copy.sort((a, b) => (parseFloat(a) || 0) - (parseFloat(b) || 0));
    if (sort === 2 || sort === 4) copy.reverse();
    return copy;
  }

  /** A series' name: the legend format with {{label}} filled in, or Grafana's automatic name. */
  function seriesName(legendFormat, labels, expr) {
    if (legendFormat && legendFormat !== "__auto") {
      return legendFormat.replace(/\{\{\s*(.+?)\s*\}\}/g, (_, name) => labels[name] ?? "");
    }
    const { __name__: metric = "", ...rest } = labels;
    const pairs = Object.keys(rest).sort().map((key) => `${key}="${rest[key]}"`);
    if (!metric && !pairs.length) return expr;
    return pairs.length ? `${metric}{${pairs.join(", ")}}` : metric;
  }

  /** Prometheus sample text -> number, or null where a chart draws a gap. */
  function sampleValue(text) {
    const value = text === "+Inf" ? Infinity : text === "-Inf" ? -Infinity : parseFloat(text);
    return Number.isFinite(value) ? value : null;
  }

  const CALC_NAMES = { lastNotNull: "Last *", last: "Last", firstNotNull: "First *", first: "First", max: "Max",
    min: "Min", mean: "Mean", sum: "Total", count: "Count", range: "Range", delta: "Delta", diff: "Difference" };

  /** One reducer of Grafana's reduceOptions.calcs over a series' values (nulls included). */
  function reduce(calc, values) {
    const present = values.filter((v) => v !== null && v !== undefined);
    switch (calc) {
      case "lastNotNull": return present.length ? present[present.length - 1] : null;
      case "last": return values.length ? values[values.length - 1] : null;
      case "firstNotNull": return present.length ? present[0] : null;
      case "first": return values.length ? values[0] : null;
      case "max": return present.length ? Math.max(...present) : null;
      case "min": return present.length ? Math.min(...present) : null;
      case "mean": return present.length ? present.reduce((a, b) => a + b, 0) / present.length : null;
      case "sum": return present.reduce((a, b) => a + b, 0);
      case "count": return values.length;
      case "range": return present.length ? Math.max(...present) - Math.min(...present) : null;
      case "delta": case "diff": return present.length ? present[present.length - 1] - present[0] : null;
      default: throw new Error(`reducer ${calc} is not supported by this renderer`);
    }
  }

  function fixed(value, decimals) {
    if (decimals === undefined || decimals === null) {
      const size = Math.abs(value);
      decimals = size === 0 || size >= 100 ? 0 : Math.max(0, Math.min(6, 2 - Math.floor(Math.log10(size))));
    }
    const text = value.toFixed(decimals);
    return text.includes(".") ? text.replace(/\.?0+$/, "") : text;
  }

  function scaled(value, base, suffixes, decimals) {
    let i = 0;
    while (Math.abs(value) >= base && i < suffixes.length - 1) { value /= base; i += 1; }
    return [fixed(value, decimals), suffixes[i]];
  }

  function duration(seconds, decimals) {
    const size = Math.abs(seconds);
    if (size === 0) return "0 s";
    if (size < 1e-3) return `${fixed(seconds * 1e6, decimals)} µs`;
    if (size < 1) return `${fixed(seconds * 1e3, decimals)} ms`;
    const steps = [[60, "s", 1], [3600, "min", 60], [86400, "hour", 3600], [604800, "day", 86400]];
    for (const [below, name, div] of steps) if (size < below) return `${fixed(seconds / div, decimals)} ${name}`;
    return `${fixed(seconds / 604800, decimals)} week`;
  }

  /** A value as Grafana writes it for a unit (the units these dashboards use; others as plain numbers). */
  function formatValue(unit, value, decimals) {
    if (value === null || value === undefined || Number.isNaN(value)) return "No data";
    if (!Number.isFinite(value)) return value > 0 ? "+Inf" : "-Inf";
    const join = ([n, suffix]) => n + suffix;
    switch (unit) {
      case "percent": return `${fixed(value, decimals)}%`;
      case "percentunit": return `${fixed(value * 100, decimals)}%`;
      case "s": return duration(value, decimals);
      case "ms": return duration(value / 1000, decimals);
      case "h": return duration(value * 3600, decimals);
      case "reqps": return join(scaled(value, 1000, [" req/s", "K req/s", "M req/s"], decimals));
      case "ops": return join(scaled(value, 1000, [" ops/s", "K ops/s", "M ops/s"], decimals));
      case "currencyUSD": {
        const [n, suffix] = scaled(Math.abs(value), 1000, ["", "K", "M", "B", "T"], decimals);
        return `${value < 0 ? "-" : ""}$${n}${suffix}`;
      }
      case "bytes": return join(scaled(value, 1024, [" B", " KiB", " MiB", " GiB", " TiB", " PiB"], decimals));
      case "decbytes": return join(scaled(value, 1000, [" B", " kB", " MB", " GB", " TB", " PB"], decimals));
      case "Bps": return join(scaled(value, 1000, [" B/s", " kB/s", " MB/s", " GB/s", " TB/s"], decimals));
      case "none": return fixed(value, decimals);
      default: return join(scaled(value, 1000, ["", " K", " Mil", " Bil", " Tri"], decimals));
    }
  }

  /** A colour name or hex as CSS. */
  function color(name) {
    return NAMED[name] || name;
  }

  /** The colour of the highest threshold step the value reaches (Grafana's absolute thresholds). */
  function thresholdColor(thresholds, value) {
    const steps = (thresholds && thresholds.steps && thresholds.steps.length ? thresholds : DEFAULT_THRESHOLDS).steps;
    let chosen = steps[0].color;
    for (const step of steps) if (step.value === null || step.value === undefined || (value !== null && value >= step.value)) chosen = step.color;
    return color(chosen);
  }

  /** "#RRGGBB" + opacity 0..1 -> "rgba(...)". */
  function alpha(hex, opacity) {
    const m = /^#([0-9a-f]{2})([0-9a-f]{2})([0-9a-f]{2})$/i.exec(hex);
    if (!m) return hex;
    return `rgba(${parseInt(m[1], 16)}, ${parseInt(m[2], 16)}, ${parseInt(m[3], 16)}, ${opacity})`;
  }

  root.GrafanaLite = {
    PALETTE, CALC_NAMES, alpha, builtins, color, formatValue, interpolate, intervals, parseDuration, parseLabelValues,
    promDuration, reduce, roundInterval, sampleValue, seriesName, sortOptions, thresholdColor, variableText,
  };
})(typeof window !== "undefined" ? window : globalThis);
