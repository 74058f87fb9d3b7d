// Patching: AtP, AtP* and activation-patching maps per role (resid_pre: layer x position,
// heads: layer x head, ...) with token labels on position axes, a normalisation toggle (raw,
// divided by each role's clean - corrupt gap, or by its largest effect), difference maps to the
// original, and top-k lists for dense node types (neurons); for patching-fidelity also the
// AtP-vs-activation scatter and the fidelity statistics (correlations and error on their own axes).

import { tokenize } from "../api.js";
import { h, replace, segmented, tokenLabels } from "../dom.js";
import { fmt, fmtCI, signClass } from "../format.js";
import { divergingHeatmap, heatmapLayout, maxAbs, minMax, render as plot, subtract } from "../plots.js";
import { setQuery } from "../router.js";
import { roleColor, roleLabel, sortRoles } from "../roles.js";
import { loadResult, manifestCard, notice, resultHeader, roleTitle } from "./common.js";
import { baseOf, interventionBar, patchingComponent } from "../intervene-actions.js";

export const METHOD_LABEL = { atp: "AtP", atp_star: "AtP*", activation: "activation patching" };
const METHOD_ORDER = ["activation", "atp", "atp_star"];
const NODE_ORDER = ["resid_pre", "head", "head_pos", "mlp", "head_q", "head_k", "head_v", "head_q_pos", "head_k_pos", "head_v_pos", "neuron", "neuron_pos"];
const NODE_LABEL = {
  resid_pre: "resid_pre (layer × position)", head: "heads (layer × head)", head_pos: "heads × position",
  mlp: "MLP (layer × position)", head_q: "queries", head_k: "keys", head_v: "values",
  head_q_pos: "queries × position", head_k_pos: "keys × position", head_v_pos: "values × position",
  neuron: "neurons", neuron_pos: "neurons × position",
};
const STATS = [
  ["pearson", "Pearson r"], ["spearman", "Spearman ρ"], ["top_k_recall", "top-k recall"], ["normalized_error", "normalised error"],
];
const BOUNDED_STATS = STATS.filter(([k]) => k !== "normalized_error");
const ERROR_STAT = STATS.find(([k]) => k === "normalized_error");
const MIN_GROUPS = 5; // fewer prompt groups than this make a bootstrap CI unreliable
const DENSE_COLUMNS = 64; // wider maps (neurons) get no cell gaps and a top-k list
const TOP_K = 12;
const NORM_LABEL = { raw: "raw", gap: "÷ clean − corrupt gap", peak: "÷ largest |effect|" };
const NORM_UNIT = { raw: "Δ metric", gap: "Δ metric / (clean − corrupt)", peak: "Δ metric / role's max |effect|" };
const NORM_SHORT = { raw: "Δ metric", gap: "÷ gap", peak: "÷ max" }; // colour-bar titles
const NORM_HELP = {
  raw: "Effects in metric units: a model with a smaller clean − corrupt gap looks weaker.",
  gap: "Each role's effects divided by its own clean − corrupt metric gap: 1 = the whole gap restored.",
  peak: "Each role's effects divided by its largest |effect| of this node type (the result stores no metric gap).",
};

/** {nodeType: {method: {role: {mean, lo?, hi?}}}} from any patching result. */
export function collectMaps(result) {
  const maps = {};
  const put = (node, method, role, entry) => {
    ((maps[node] ||= {})[method] ||= {})[role] = entry;
  };
  for (const [role, r] of Object.entries(result.roles || {})) {
    for (const [node, m] of Object.entries(r.atp || {})) put(node, "atp", role, { mean: m });
    for (const [node, m] of Object.entries(r.atp_star || {})) put(node, "atp_star", role, { mean: m });
    for (const [node, m] of Object.entries(r.effects || {})) put(node, "activation", role, { mean: m });
    for (const nm of r.node_maps || []) put(nm.node_type, nm.method, role, { mean: nm.mean, lo: nm.lo, hi: nm.hi });
    if (r.activation && r.activation.effects) for (const [node, m] of Object.entries(r.activation.effects)) put(node, "activation", role, { mean: m });
    if (r.atp && r.atp.atp) {
      for (const [node, m] of Object.entries(r.atp.atp)) put(node, "atp", role, { mean: m });
      for (const [node, m] of Object.entries(r.atp.atp_star || {})) put(node, "atp_star", role, { mean: m });
    }
  }
  return maps;
}

/** Labels along one axis of a NodeMap: token labels for positions when known, else the stored labels. */
function axisLabels(nodeMap, axis, n, posLabels) {
  if (axis === "pos") return Array.from({ length: n }, (_, i) => (posLabels && posLabels[i] !== undefined ? posLabels[i] : `pos ${i}`));
  return (nodeMap.axis_labels || {})[axis] || Array.from({ length: n }, (_, i) => `${axis}${i}`);
}

/** A NodeMap as a 2-D grid: rows (layer, or layer·head for 3 axes) x columns. */
export function grid(nodeMap, posLabels) {
  const axes = nodeMap.axes;
  const lab = (axis, n) => axisLabels(nodeMap, axis, n, posLabels);
  const v = nodeMap.values;
  if (axes.length === 2) {
    return { z: v, y: lab(axes[0], nodeMap.shape[0]), x: lab(axes[1], nodeMap.shape[1]), xTitle: axisTitle(axes[1]), yTitle: axisTitle(axes[0]), cells: (i, j) => [i, j] };
  }
  if (axes.length === 3) {
    // [layer, pos, head] -> rows layer·head, columns pos; [layer, pos, neuron] likewise.
    const [a0, a1, a2] = axes;
    const [n0, n1, n2] = nodeMap.shape;
    const l0 = lab(a0, n0), l1 = lab(a1, n1), l2 = lab(a2, n2);
    const z = [], y = [];
    for (let i = 0; i < n0; i++) for (let k = 0; k < n2; k++) {
      y.push(`${l0[i]}${l2[k]}`);
      z.push(v[i].map((row) => row[k]));
    }
    return { z, y, x: l1, xTitle: axisTitle(a1), yTitle: `${axisTitle(a0)} · ${axisTitle(a2)}`, cells: null };
  }
  if (axes.length === 1) return { z: [v], y: [nodeMap.node_type], x: lab(axes[0], nodeMap.shape[0]), xTitle: axisTitle(axes[0]), yTitle: "" };
  return null;
}

function axisTitle(axis) {
  return { pos: "position", head: "head", layer: "layer", neuron: "neuron" }[axis] || axis;
}

function flat(v, out = []) {
  if (Array.isArray(v)) v.forEach((x) => flat(x, out));
  else out.push(v);
  return out;
}

/** Flat node labels ("L1 · H3", "L0 · 5 ·Mary") in the order flat(values) walks a NodeMap. */
function flatLabels(nodeMap, posLabels) {
  const lists = nodeMap.axes.map((a, i) => axisLabels(nodeMap, a, nodeMap.shape[i], posLabels));
  let out = [""];
  for (const [i, l] of lists.entries()) out = out.flatMap((p) => l.map((x) => (i ? `${p} · ${x}` : x)));
  return out;
}

/** Nested values times `factor` (nulls kept). */
function scaleValues(v, factor) {
  if (Array.isArray(v)) return v.map((x) => scaleValues(x, factor));
  return typeof v === "number" ? v * factor : v;
}

function scaleMap(nodeMap, factor) {
  return factor === 1 ? nodeMap : { ...nodeMap, values: scaleValues(nodeMap.values, factor) };
}

/** The metric summary (clean, corrupt, denominator, normalized) of a role, where the result has one. */
function roleMetric(r) {
  return r.metric || (r.atp && r.atp.metric) || (r.activation && r.activation.metric) || null;
}

/** Whether the stored effects are already divided by the gap (the request's `normalize`). */
function storedNormalized(r, out) {
  const m = roleMetric(r);
  if (m) return Boolean(m.normalized);
  const options = (r.manifest && r.manifest.options) || (out.inputs && out.inputs.options) || {};
  return Boolean(options.normalize);
}

/** The normalisation modes this result supports: raw and gap need the gap (or effects stored raw / normalised). */
function normModes(result, roles, out) {
  const metrics = roles.map((role) => roleMetric(result.roles[role]));
  const withGap = metrics.every((m) => m && Math.abs(m.denominator) > 1e-12);
  const normalizedAtSource = roles.every((role) => storedNormalized(result.roles[role], out));
  const modes = [];
  if (withGap || !normalizedAtSource) modes.push("raw");
  if (withGap || normalizedAtSource) modes.push("gap");
  modes.push("peak");
  return modes;
}

export async function render({ root, route, signal }) {
  const id = route.parts[0];
  const out = await loadResult(root, id, signal);
  if (!out) return;
  const result = out.result;
  const roles = sortRoles(result.roles);
  const maps = collectMaps(result);
  const nodeTypes = Object.keys(maps).sort((a, b) => rank(NODE_ORDER, a) - rank(NODE_ORDER, b));
  if (!nodeTypes.length) { replace(root, resultHeader(out), notice("This result has no node maps.")); return; }
  const fidelity = roles.some((r) => result.roles[r].summaries);
  const modes = normModes(result, roles, out);
  const defaultMode = roles.length > 1 ? (modes.includes("gap") ? "gap" : "peak") : modes[0];
  const state = {
    node: nodeTypes.includes(route.query.node) ? route.query.node : nodeTypes[0],
    method: ["atp", "atp_star"].includes(route.query.method) ? route.query.method : "atp",
    norm: modes.includes(route.query.norm) ? route.query.norm : defaultMode,
  };
  const positions = await positionLabels(out, signal);
  const posLabels = positions.labels;

  /** The factor a role's stored values are multiplied by in the current normalisation. */
  function factor(role, node) {
    const r = result.roles[role];
    const m = roleMetric(r);
    const normalized = storedNormalized(r, out);
    if (state.norm === "raw") return normalized && m ? m.denominator : 1;
    if (state.norm === "gap") return normalized ? 1 : 1 / m.denominator;
    const byMethod = maps[node];
    const ref = (byMethod.activation && byMethod.activation[role]) || Object.values(byMethod).map((e) => e[role]).find(Boolean);
    return ref ? 1 / maxAbs(ref.mean.values) : 1;
  }
  const entryOf = (node, method, role) => {
    const e = maps[node][method] && maps[node][method][role];
    if (!e) return null;
    const f = factor(role, node);
    return { mean: scaleMap(e.mean, f), lo: e.lo && scaleMap(e.lo, f), hi: e.hi && scaleMap(e.hi, f) };
  };

  const nodeToggle = segmented(nodeTypes.map((n) => ({ value: n, label: n, title: NODE_LABEL[n] || n })), state.node,
    (n) => { state.node = n; setQuery({ node: n }); redraw(); }, { id: "node-toggle", "aria-label": "node type" });
  const normHelp = h("span", { class: "small muted", id: "norm-help" });
  const normToggle = segmented(modes.map((m) => ({ value: m, label: NORM_LABEL[m], title: NORM_HELP[m] })), state.norm,
    (m) => { state.norm = m; setQuery({ norm: m }); redraw(); }, { id: "norm-toggle", "aria-label": "normalisation" });
  const mapsBox = h("div", { id: "patching-maps" });
  const mapsHint = h("span", { class: "hint" });
  const mapsCard = h("section", { class: "card" },
    h("div", { class: "card-head" }, h("h2", {}, "Patching effects per node"), mapsHint),
    positions.note ? h("p", { class: "small muted", id: "position-note", style: { marginTop: 0 } }, positions.note) : null,
    mapsBox);
  // ablate / steer the node of the clicked cell
  const bar = interventionBar({ id: "patching-intervene", base: baseOf(out), hint: "click a cell of a map (heads, neurons, resid_pre, MLP)", signal });
  mapsCard.append(bar.el);

  const metricCard = metricSection(result, roles);
  const scatterPlot = h("div", { class: "plot tall", id: "patching-scatter" });
  const statsPlot = h("div", { class: "plot", id: "patching-stats" });
  const statsTable = h("div", { class: "table-wrap" });
  const groupsWarning = h("div", { id: "fidelity-warning" });
  const methodToggle = segmented(["atp", "atp_star"].map((m) => ({ value: m, label: METHOD_LABEL[m] })), state.method,
    (m) => { state.method = m; setQuery({ method: m }); redrawFidelity(); }, { id: "method-toggle", "aria-label": "estimate" });
  const fidelityCard = fidelity ? h("section", { class: "card" },
    h("div", { class: "card-head" }, h("h2", {}, "Fidelity: the estimate against activation patching"),
      h("div", { class: "toolbar", style: { margin: 0 } }, h("span", { class: "label" }, "estimate"), methodToggle)),
    groupsWarning,
    h("div", { class: "grid grid-2" }, h("div", { class: "plot-cell" }, scatterPlot), h("div", { class: "plot-cell" }, statsPlot)),
    statsTable,
    h("p", { class: "small muted" }, "Task-set means over prompt groups with 95% percentile-bootstrap CIs. Pearson r, Spearman ρ and top-k recall "
      + "are at most 1 (left panel); the normalised error Σ|act − est| / |act at the largest node| is unbounded, 0 is perfect (right panel).")) : null;

  replace(root,
    resultHeader(out, { sub: "Attribution patching estimates every node's patching effect from two forwards and one backward; activation patching measures it." }),
    h("div", { class: "card toolbar sticky-toolbar", style: { position: "sticky", top: "60px", zIndex: 5 } },
      h("span", { class: "label" }, "Node type"), nodeToggle,
      h("span", { class: "label" }, "Effects"), normToggle, normHelp),
    metricCard, mapsCard, fidelityCard, manifestCard(out));

  function redraw() {
    normHelp.textContent = NORM_HELP[state.norm];
    mapsHint.textContent = `${NORM_UNIT[state.norm]}; denoising: the corrupt run with one node patched to its clean value; one colour range per node type`;
    const byMethod = maps[state.node];
    const methods = Object.keys(byMethod).sort((a, b) => rank(METHOD_ORDER, a) - rank(METHOD_ORDER, b));
    const entries = Object.fromEntries(methods.map((m) => [m, Object.fromEntries(roles.map((r) => [r, entryOf(state.node, m, r)]))]));
    const zmax = maxAbs(methods.map((m) => roles.map((r) => entries[m][r] && entries[m][r].mean.values)));
    const diffRoles = roles.includes("original") ? roles.filter((r) => r !== "original") : [];
    const diffs = Object.fromEntries(methods.map((m) => [m, Object.fromEntries(diffRoles.map((r) => [r, diffMap(entries[m][r], entries[m].original)]))]));
    const dmax = maxAbs(methods.map((m) => diffRoles.map((r) => diffs[m][r] && diffs[m][r].values)));
    const unit = NORM_UNIT[state.norm];
    const short = NORM_SHORT[state.norm];
    replace(mapsBox, methods.map((method) => h("div", { class: "method-row", dataset: { method } },
      h("h3", { style: { margin: "6px 0 6px" } }, METHOD_LABEL[method] || method),
      h("div", { class: "roles-grid" }, roles.map((role) => mapCell({
        id: `patch-${method}-${role}`, dataset: { role, method }, title: roleTitle(role), entry: entries[method][role],
        zmax, unit: short, name: `${roleLabel(role)} · ${METHOD_LABEL[method] || method}`, posLabels,
      }))),
      diffRoles.length ? h("div", { class: "diff-row" },
        h("div", { class: "small muted diff-head" }, `Difference to the original (${unit}); blue: larger than in the original`),
        h("div", { class: "roles-grid" }, diffRoles.map((role) => mapCell({
          id: `patch-diff-${method}-${role}`, dataset: { role, method, diff: `${role} - original` }, title: diffTitle(role),
          entry: diffs[method][role] && { mean: diffs[method][role] }, zmax: dmax, unit: state.norm === "raw" ? short : `Δ (${short})`,
          name: `${roleLabel(role)} − original · ${METHOD_LABEL[method] || method}`, posLabels,
        })))) : null)));
    // after the maps' queued draws have set up each plot's events
    queueMicrotask(() => {
      for (const el of mapsBox.querySelectorAll(".plot")) {
        if (typeof el.on !== "function") continue;
        el.on("plotly_click", (ev) => { const c = patchingComponent(state.node, ev.points && ev.points[0]); if (c) bar.set(c); });
      }
    });
    if (fidelity) redrawFidelity();
  }

  function redrawFidelity() {
    const est = maps[state.node][state.method] ? state.method : "atp";
    drawScatter(scatterPlot, roles, (role) => entryOf(state.node, "activation", role), (role) => entryOf(state.node, est, role),
      { est, node: state.node, unit: NORM_UNIT[state.norm], posLabels });
    const summaries = (role, method = est) => (result.roles[role].summaries || []).filter((s) => s.node_type === state.node && s.method === method);
    drawStats(statsPlot, roles, summaries, { est, node: state.node });
    replace(groupsWarning, groupsNotice(roles.flatMap((r) => summaries(r))));
    replace(statsTable, statsTableOf(roles, summaries));
  }

  redraw();
}

function diffTitle(role) {
  return h("div", { class: "role-title", dataset: { role } }, h("span", { class: "swatch", style: { background: roleColor(role) } }), `${roleLabel(role)} − original`);
}

/** a − b of two entries' mean maps as a NodeMap (null if either is missing). */
function diffMap(a, b) {
  if (!a || !b) return null;
  return { ...a.mean, values: subtract(a.mean.values, b.mean.values) };
}

/** One map: a heatmap (no cell gaps when dense) and, for dense node types, the top-k nodes by |value|. */
function mapCell({ id, dataset, title, entry, zmax, unit, name, posLabels }) {
  if (!entry) return h("div", { class: "plot-cell muted small", dataset }, title, "not computed");
  const g = grid(entry.mean, posLabels);
  const dense = g.x.length > DENSE_COLUMNS;
  const el = h("div", { class: "plot", id, dataset });
  const hasCI = entry.lo && entry.hi;
  const rows = g.y.length;
  queueMicrotask(() => plot(el, [divergingHeatmap({
    z: g.z, x: g.x, y: g.y, zmax, colorbarTitle: unit, gap: dense || rows > 24 ? 0 : 1,
    customdata: hasCI ? ciGrid(entry, posLabels) : undefined,
    hovertemplate: `${name}<br>%{y} %{x}<br>%{z:.4g}`
      + (hasCI ? "<br>95% CI [%{customdata[0]:.3g}, %{customdata[1]:.3g}]" : "") + "<extra></extra>",
  })], heatmapLayout({
    title: dense ? `${g.y.length} × ${g.x.length} nodes · drag to zoom` : hasCI ? "task-set mean" : "",
    xTitle: g.xTitle, yTitle: g.yTitle,
    height: Math.max(230, Math.min(640, 100 + rows * (rows > 24 ? 9 : 24))),
    extra: {
      xaxis: dense ? { showticklabels: false, title: { text: `${g.xTitle} (0–${g.x.length - 1})` } }
        : g.x.length > 8 ? { tickangle: -50, tickfont: { size: 10 }, type: "category", ...positionTicks(g.x, el.clientWidth - 140) } : { type: "category" },
      margin: { t: 30 },
    },
  })));
  return h("div", { class: "plot-cell", dataset }, title, el, dense ? topList(`${id}-top`, entry.mean, unit, posLabels) : null);
}

/**
 * Which category labels to show on a crowded position axis (about 15 px per rotated label): every
 * template role (IO, S1, S2, END), then evenly spaced tokens that do not crowd a role.
 */
function positionTicks(labels, widthPx) {
  const fit = Math.max(4, Math.floor(widthPx / 15));
  if (labels.length <= fit) return {};
  const step = Math.ceil(labels.length / fit);
  const roles = labels.map((l, i) => (/^\d+ (IO|S1|S2|END|BOS)$/.test(l) ? i : -1)).filter((i) => i >= 0);
  const near = (i) => roles.some((r) => r !== i && Math.abs(r - i) < step);
  const keep = labels.map((_, i) => i).filter((i) => roles.includes(i) || (i % step === 0 && !near(i)));
  return { tickmode: "array", tickvals: keep.map((i) => labels[i]), ticktext: keep.map((i) => labels[i]) };
}

/** The TOP_K nodes by |value| of a NodeMap as a compact table. */
function topList(id, nodeMap, unit, posLabels) {
  const values = flat(nodeMap.values);
  const labels = flatLabels(nodeMap, posLabels);
  const order = values.map((v, i) => i).filter((i) => typeof values[i] === "number")
    .sort((a, b) => Math.abs(values[b]) - Math.abs(values[a])).slice(0, TOP_K);
  return h("div", { class: "table-wrap top-nodes" }, h("table", { class: "data compact", id },
    h("caption", { class: "small muted" }, `top ${order.length} of ${values.length} by |value|`),
    h("thead", {}, h("tr", {}, h("th", { class: "num" }, "#"), h("th", {}, "node"), h("th", { class: "num" }, unit))),
    h("tbody", {}, order.map((i, k) => h("tr", {}, h("td", { class: "num" }, String(k + 1)), h("td", { class: "mono" }, labels[i]),
      h("td", { class: ["num", signClass(values[i])] }, fmt(values[i], 4)))))));
}

function drawScatter(el, roles, actOf, estOf, { est, node, unit, posLabels }) {
  const traces = [];
  let lo = Infinity, hi = -Infinity;
  for (const [i, role] of roles.entries()) {
    const act = actOf(role), at = estOf(role);
    if (!act || !at) continue;
    const x = flat(act.mean.values), y = flat(at.mean.values);
    const [a, b] = minMax([x, y]);
    lo = Math.min(lo, a); hi = Math.max(hi, b);
    traces.push({
      type: "scatter", mode: "markers", name: roleLabel(role), x, y, text: flatLabels(act.mean, posLabels),
      marker: { color: roleColor(role, i), size: 7, opacity: 0.8, line: { width: 0.5, color: "#fff" } },
      hovertemplate: `${roleLabel(role)} %{text}<br>activation %{x:.4g}<br>${METHOD_LABEL[est]} %{y:.4g}<extra></extra>`,
    });
  }
  if (!traces.length) { replace(el, notice(`No ${METHOD_LABEL[est]} and activation maps for ${node}.`)); return; }
  const pad = (hi - lo) * 0.05 || 1e-3;
  traces.unshift({ type: "scatter", mode: "lines", x: [lo - pad, hi + pad], y: [lo - pad, hi + pad], name: "y = x",
    line: { color: "#adb5bd", dash: "dash", width: 1 }, hoverinfo: "skip" });
  plot(el, traces, {
    title: `${METHOD_LABEL[est]} vs activation patching · ${node}`, height: 420,
    xaxis: { title: { text: `activation patching (${unit})` }, zeroline: true, zerolinecolor: "#dee2e6", gridcolor: "#f1f3f5" },
    yaxis: { title: { text: `${METHOD_LABEL[est]} (${unit})` }, zeroline: true, zerolinecolor: "#dee2e6", gridcolor: "#f1f3f5", scaleanchor: "x", scaleratio: 1 },
    legend: { orientation: "h", y: 1.02, yanchor: "bottom", x: 1, xanchor: "right" }, margin: { t: 60 },
  });
}

/** Bars with CIs: the bounded statistics (r, ρ, recall) on the left panel, the normalised error on its own axis. */
function drawStats(el, roles, summaries, { est, node }) {
  const errorBars = (vals) => ({
    type: "data", symmetric: false, thickness: 1.2, width: 4, color: "#1d2330",
    array: vals.map((s) => (s && s.interval.hi !== null ? s.interval.hi - s.interval.mean : 0)),
    arrayminus: vals.map((s) => (s && s.interval.lo !== null ? s.interval.mean - s.interval.lo : 0)),
  });
  const traces = [];
  let low = 0;
  for (const [i, role] of roles.entries()) {
    const ss = summaries(role);
    const get = (k) => ss.find((s) => s.statistic === k);
    const bounded = BOUNDED_STATS.map(([k]) => get(k));
    const error = [get(ERROR_STAT[0])];
    for (const s of bounded) if (s && s.interval.lo !== null) low = Math.min(low, s.interval.lo);
    const common = { name: roleLabel(role), legendgroup: role, marker: { color: roleColor(role, i) } };
    traces.push({ type: "bar", ...common, x: BOUNDED_STATS.map(([, l]) => l), y: bounded.map((s) => (s ? s.interval.mean : null)),
      error_y: errorBars(bounded), hovertemplate: `${roleLabel(role)} %{x}: %{y:.3g}<extra></extra>` });
    traces.push({ type: "bar", ...common, showlegend: false, xaxis: "x2", yaxis: "y2", x: [ERROR_STAT[1]],
      y: error.map((s) => (s ? s.interval.mean : null)), error_y: errorBars(error),
      hovertemplate: `${roleLabel(role)} normalised error: %{y:.3g}<extra></extra>` });
  }
  plot(el, traces, {
    title: `Task-set mean with 95% CI · ${METHOD_LABEL[est]} · ${node}`, barmode: "group", height: 420,
    xaxis: { domain: [0, 0.66] },
    yaxis: { title: { text: "r, ρ, recall (≤ 1)" }, range: [Math.min(0, low) - 0.05, 1.05], zeroline: true, zerolinecolor: "#9aa3b5", gridcolor: "#eef0f4" },
    xaxis2: { domain: [0.8, 1], anchor: "y2" },
    yaxis2: { anchor: "x2", title: { text: "normalised error (0 = perfect)", standoff: 4 }, rangemode: "tozero", gridcolor: "#eef0f4" },
    legend: { orientation: "h", y: 1.02, yanchor: "bottom", x: 1, xanchor: "right" }, margin: { t: 60 },
  });
}

/** A visible warning when a CI rests on fewer than MIN_GROUPS prompt groups. */
function groupsNotice(summaries) {
  const counts = summaries.map((s) => s.interval && s.interval.n).filter((n) => typeof n === "number");
  if (!counts.length) return null;
  const n = Math.min(...counts);
  if (n >= MIN_GROUPS) return null;
  return h("div", { class: "notice warn", role: "status" },
    `These 95% intervals rest on only ${n} prompt group${n === 1 ? "" : "s"} (fewer than ${MIN_GROUPS}): a bootstrap over so few groups `
    + "is too narrow or degenerate to trust. Rerun with more prompts or a smaller group_size (n_prompts / group_size ≥ 5).");
}

function statsTableOf(roles, summaries) {
  const rows = [];
  for (const role of roles) {
    for (const method of ["atp", "atp_star"]) {
      const ss = summaries(role, method);
      if (!ss.length) continue;
      const n = (ss[0].interval || {}).n;
      rows.push(h("tr", { dataset: { role, method } }, h("td", {}, roleTitle(role)), h("td", {}, METHOD_LABEL[method]),
        STATS.map(([k]) => {
          const s = ss.find((x) => x.statistic === k);
          return h("td", { class: "num" }, s ? h("span", {}, fmt(s.interval.mean, 3), h("span", { class: "muted" }, ` ${fmtCI(s.interval.lo, s.interval.hi, 2)}`)) : "–");
        }),
        h("td", { class: ["num", n < MIN_GROUPS && "warn-text"], title: n < MIN_GROUPS ? `fewer than ${MIN_GROUPS} groups: the CI is unreliable` : null },
          n < MIN_GROUPS ? `⚠ ${n}` : String(n ?? "–"))));
    }
  }
  return rows.length ? h("table", { class: "data", id: "fidelity-table" },
    h("thead", {}, h("tr", {}, h("th", {}, "role"), h("th", {}, "estimate"), STATS.map(([, l]) => h("th", { class: "num" }, l)), h("th", { class: "num" }, "groups"))),
    h("tbody", {}, rows)) : null;
}

function ciGrid(entry, posLabels) {
  const lo = grid(entry.lo, posLabels).z, hi = grid(entry.hi, posLabels).z;
  return lo.map((row, i) => row.map((v, j) => [v, hi[i][j]]));
}

function metricSection(result, roles) {
  const items = roles.map((role) => {
    const r = result.roles[role];
    const m = roleMetric(r);
    if (!m) {
      if (!r.groups) return null;
      return h("div", { class: "stat", dataset: { role } },
        h("div", { class: "label" }, h("span", { class: "swatch", style: { background: roleColor(role) } }), roleLabel(role)),
        h("div", { class: "value" }, `${r.groups.length} groups`),
        h("div", { class: "ci" }, `${r.n_prompts} prompts · ${r.n_bootstrap} bootstrap resamples`));
    }
    return h("div", { class: "stat", dataset: { role, gap: m.denominator } },
      h("div", { class: "label" }, h("span", { class: "swatch", style: { background: roleColor(role) } }), `${roleLabel(role)}: metric clean → corrupt`),
      h("div", { class: "value" }, `${fmt(m.clean, 3)} → ${fmt(m.corrupt, 3)}`),
      h("div", { class: "ci" }, `gap ${fmt(m.denominator, 3)}${m.normalized ? " (stored effects normalised by it)" : ""} · ${r.n_prompts} prompts`));
  }).filter(Boolean);
  return items.length ? h("div", { class: "stat-row", style: { marginBottom: "16px" } }, items) : null;
}

/** The clean prompts of a result's inputs (custom task pairs or prompts), at most 16. */
function cleanPrompts(inputs) {
  if (inputs.task && inputs.task.name === "custom") return (inputs.task.pairs || []).slice(0, 16).map((p) => p.clean);
  return (inputs.prompts || []).slice(0, 16);
}

/**
 * Position labels: "index token" from the tokenized clean prompts ("a/b" where they differ),
 * or the template role (IO, S1, S2, END) where every prompt has it at the same position.
 * {labels: null, note} when the result does not store its prompts (built-in tasks).
 */
async function positionLabels(out, signal) {
  const inputs = out.inputs || {};
  const prompts = cleanPrompts(inputs);
  if (!prompts.length) {
    const task = inputs.task ? inputs.task.name : null;
    return { labels: null, note: task ? `Positions are token indices: the ${task} task's prompts are generated on the server and not `
      + "stored with the result, and its templates differ in length, so one position is not one token across prompts." : "" };
  }
  let toks;
  try {
    toks = await Promise.all(prompts.map((p) => tokenize(out.pair, p, true, signal)));
  } catch (e) {
    if (e.name === "AbortError") throw e;
    return { labels: null, note: `Positions are token indices (tokenizing the prompts failed: ${e.message}).` };
  }
  const perPrompt = toks.map((t, i) => withBos(tokenLabels(prompts[i], t.tokens), t.tokens, prompts[i]));
  const n = Math.max(...perPrompt.map((l) => l.length));
  const roles = templateRoles(inputs.task, toks);
  const labels = Array.from({ length: n }, (_, i) => {
    if (roles[i]) return `${i} ${roles[i]}`;
    const words = [...new Set(perPrompt.map((l) => l[i]).filter((w) => w !== undefined))];
    return `${i} ${words.length <= 2 ? words.join("/") : `${words[0]}/…`}`;
  });
  const named = Object.values(roles);
  const note = [
    prompts.length > 1 ? `Position labels: the tokens of the ${prompts.length} clean prompts ("a/b" where they differ).` : "Position labels: the clean prompt's tokens.",
    named.length ? `${named.join(", ")}: ${roleHelp(named)}.` : "",
  ].join(" ");
  return { labels, note };
}

/** Labels with a prepended BOS token (not part of the prompt's text) shown as "BOS". */
function withBos(labels, tokens, text) {
  return tokens.length && tokens[0].text && !text.startsWith(tokens[0].text) ? ["BOS", ...labels.slice(1)] : labels;
}

function roleHelp(named) {
  const help = { IO: "the indirect object (the correct answer)", S1: "the subject's first mention", S2: "its second mention", END: "the last token" };
  return named.map((r) => help[r]).filter(Boolean).join("; ");
}

/** {position: "IO" | "S1" | "S2" | "END"} where every prompt of an aligned IOI-like custom task agrees. */
function templateRoles(task, toks) {
  const lengths = new Set(toks.map((t) => t.tokens.length));
  if (!task || task.name !== "custom" || lengths.size !== 1) return {};
  const out = { [[...lengths][0] - 1]: "END" };
  const found = toks.map((t, k) => ioiPositions(t.tokens, task.pairs[k]));
  if (found.every((f) => f && f.IO === found[0].IO && f.S1 === found[0].S1 && f.S2 === found[0].S2)) {
    for (const role of ["IO", "S1", "S2"]) out[found[0][role]] = role;
  }
  return out;
}

/** IO (the correct name, once) and S1, S2 (the wrong name, twice) positions in one prompt, or null. */
function ioiPositions(tokens, pair) {
  if (!pair || !pair.correct || !pair.wrong) return null;
  const at = (word) => tokens.map((t, i) => (t.text.trim() === word.trim() ? i : -1)).filter((i) => i >= 0);
  const io = at(pair.correct), s = at(pair.wrong);
  return io.length === 1 && s.length === 2 ? { IO: io[0], S1: s[0], S2: s[1] } : null;
}

function rank(order, x) {
  const i = order.indexOf(x);
  return i < 0 ? 99 : i;
}
