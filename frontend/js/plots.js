// Plotly helpers: one look for every plot, a diverging scale centred at 0, shared ranges.
// Plotly.js is served by lnscope itself (/vendor/plotly.min.js, from the plotly Python package).

/** RdBu (ColorBrewer, 11 classes): red negative, white 0, blue positive. */
export const DIVERGING = [
  [0.0, "#67001f"], [0.1, "#b2182b"], [0.2, "#d6604d"], [0.3, "#f4a582"], [0.4, "#fddbc7"],
  [0.5, "#f7f7f7"],
  [0.6, "#d1e5f0"], [0.7, "#92c5de"], [0.8, "#4393c3"], [0.9, "#2166ac"], [1.0, "#053061"],
];

/** Sequential (for magnitudes >= 0). */
export const SEQUENTIAL = [
  [0.0, "#f7fbff"], [0.2, "#d2e3f3"], [0.4, "#9ac8e0"], [0.6, "#529dcc"], [0.8, "#1c6cb1"], [1.0, "#08306b"],
];

const FONT = 'system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, "DejaVu Sans", sans-serif';

export const BASE_LAYOUT = {
  font: { family: FONT, size: 12, color: "#1d2330" },
  margin: { l: 56, r: 16, t: 40, b: 44 },
  paper_bgcolor: "rgba(0,0,0,0)",
  plot_bgcolor: "#ffffff",
  hoverlabel: { font: { family: FONT, size: 12 }, bgcolor: "#ffffff", bordercolor: "#cfd4dd" },
  title: { font: { size: 13 }, x: 0, xanchor: "left", xref: "paper", y: 0.98, yanchor: "top" },
  legend: { orientation: "h", y: -0.18, font: { size: 11.5 } },
  colorway: ["#3b5bdb", "#e8590c", "#2b8a3e", "#7048e8", "#0b7285", "#a61e4d"],
};

export const CONFIG = {
  responsive: true,
  displaylogo: false,
  modeBarButtonsToRemove: ["select2d", "lasso2d", "autoScale2d", "toggleSpikelines"],
  toImageButtonOptions: { format: "png", scale: 2 },
};

export function plotly() {
  if (!window.Plotly) throw new Error("Plotly.js did not load (/vendor/plotly.min.js)");
  return window.Plotly;
}

function isObject(x) {
  return x && typeof x === "object" && !Array.isArray(x);
}

export function merge(base, extra) {
  const out = { ...base };
  for (const [k, v] of Object.entries(extra || {})) {
    out[k] = isObject(v) && isObject(base[k]) ? merge(base[k], v) : v;
  }
  return out;
}

/** Draw or update (Plotly.react: no flicker, no re-creation) a plot in `el`. */
export function render(el, data, layout = {}, config = {}) {
  const full = merge(BASE_LAYOUT, layout);
  if (typeof full.title === "string") full.title = { ...BASE_LAYOUT.title, text: full.title };
  return plotly().react(el, data, full, { ...CONFIG, ...config });
}

export function purgeAll(root) {
  if (!window.Plotly || !root) return;
  for (const el of root.querySelectorAll(".js-plotly-plot")) {
    try { window.Plotly.purge(el); } catch { /* already gone */ }
  }
}

/** max |x| over nested arrays (nulls ignored); `floor` if everything is 0 or missing. */
export function maxAbs(values, floor = 1e-12) {
  let m = 0;
  const walk = (v) => {
    if (Array.isArray(v)) v.forEach(walk);
    else if (typeof v === "number" && Number.isFinite(v)) m = Math.max(m, Math.abs(v));
  };
  walk(values);
  return m > 0 ? m : floor;
}

export function minMax(values) {
  let lo = Infinity, hi = -Infinity;
  const walk = (v) => {
    if (Array.isArray(v)) v.forEach(walk);
    else if (typeof v === "number" && Number.isFinite(v)) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
  };
  walk(values);
  return lo === Infinity ? [0, 1] : [lo, hi];
}

/** A layer x something heatmap on a diverging scale centred at 0, symmetric range [-zmax, zmax]. */
export function divergingHeatmap({ z, x, y, zmax, colorbarTitle = "", hovertemplate, customdata, showscale = true, name, gap = 1 }) {
  const m = zmax ?? maxAbs(z);
  return {
    type: "heatmap", z, x, y, customdata, name,
    zmin: -m, zmax: m, zmid: 0, colorscale: DIVERGING,
    xgap: gap, ygap: gap, showscale,
    colorbar: { title: { text: colorbarTitle, side: "right" }, thickness: 11, outlinewidth: 0, len: 0.92, tickfont: { size: 10.5 } },
    hovertemplate: hovertemplate || "%{y} %{x}<br>%{z:.4g}<extra></extra>",
    hoverongaps: false,
  };
}

/** Layout for a heatmap whose rows are layers (layer 0 at the top, as in TransformerLens plots). */
export function heatmapLayout({ title, xTitle, yTitle = "layer", height = 300, extra = {} }) {
  return merge({
    title: { text: title },
    height,
    margin: { l: 52, r: 12, t: 38, b: 46 },
    xaxis: { title: { text: xTitle, standoff: 6 }, showgrid: false, zeroline: false, ticks: "", automargin: true },
    yaxis: { title: { text: yTitle, standoff: 4 }, autorange: "reversed", showgrid: false, zeroline: false, ticks: "", automargin: true },
  }, extra);
}

export function range(n) {
  return Array.from({ length: n }, (_, i) => i);
}

/** Elementwise a - b of two equally-shaped nested arrays (null where either is missing). */
export function subtract(a, b) {
  if (Array.isArray(a)) return a.map((v, i) => subtract(v, b ? b[i] : undefined));
  return typeof a === "number" && typeof b === "number" ? a - b : null;
}

export function shapeOf(z) {
  const s = [];
  let v = z;
  while (Array.isArray(v)) { s.push(v.length); v = v[0]; }
  return s;
}

/**
 * A labelled horizontal reference line: {shape, annotation} for a layout's shapes / annotations.
 * `log`: the y axis is logarithmic (Plotly places shapes and annotations there in log10 units).
 */
export function referenceLine(value, text, { color = "#868e96", yref = "y", xref = "paper", log = false } = {}) {
  const y = log ? Math.log10(value) : value;
  return {
    shape: { type: "line", xref, yref, x0: 0, x1: 1, y0: y, y1: y, line: { color, dash: "dash", width: 1.2 } },
    annotation: { xref, yref, x: 1, y, xanchor: "right", yanchor: "bottom", text, showarrow: false,
      font: { size: 11, color }, bgcolor: "rgba(255,255,255,0.8)" },
  };
}

/** Tick angle for `n` category labels of up to `chars` characters on a plot about `widthPx` wide. */
export function tickAngle(n, chars, widthPx) {
  return n * (chars * 6.5 + 8) > widthPx ? -45 : 0;
}
