// Patching: AtP, AtP* and activation-patching maps per role (resid_pre: layer x position,
// heads: layer x head, ...), on one colour range per node type; for patching-fidelity also the
// AtP-vs-activation scatter, the fidelity statistics and their task-set means with 95% CIs.

import { tokenize } from "../api.js";
import { h, replace, segmented, tokenText } from "../dom.js";
import { fmt, fmtCI } from "../format.js";
import { divergingHeatmap, heatmapLayout, maxAbs, minMax, render as plot } from "../plots.js";
import { setQuery } from "../router.js";
import { roleColor, roleLabel, sortRoles } from "../roles.js";
import { loadResult, manifestCard, notice, resultHeader, roleTitle } from "./common.js";

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

/** A NodeMap as a 2-D grid: rows (layer, or layer·head for 3 axes) x columns. */
export function grid(nodeMap, posLabels) {
  const axes = nodeMap.axes;
  const labels = nodeMap.axis_labels || {};
  const lab = (axis, n) => (axis === "pos" && posLabels ? posLabels.slice(0, n).concat(Array.from({ length: Math.max(0, n - posLabels.length) }, (_, i) => `P${posLabels.length + i}`))
    : labels[axis] || Array.from({ length: n }, (_, i) => `${axis}${i}`));
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

/** Flat node labels in the order flat(values) walks a NodeMap. */
function flatLabels(nodeMap) {
  const labels = nodeMap.axis_labels || {};
  const lists = nodeMap.axes.map((a, i) => labels[a] || Array.from({ length: nodeMap.shape[i] }, (_, j) => `${a}${j}`));
  let out = [""];
  for (const l of lists) out = out.flatMap((p) => l.map((x) => p + x));
  return out;
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
  const state = {
    node: nodeTypes.includes(route.query.node) ? route.query.node : nodeTypes[0],
    method: ["atp", "atp_star"].includes(route.query.method) ? route.query.method : "atp",
  };
  const first = result.roles[roles[0]];
  const normalized = first.metric ? first.metric.normalized : first.manifest && first.manifest.options ? first.manifest.options.normalize : false;
  const unit = normalized ? "Δ metric / (clean − corrupt)" : "Δ metric";
  const posLabels = await positionLabels(out);

  const nodeToggle = segmented(nodeTypes.map((n) => ({ value: n, label: n, title: NODE_LABEL[n] || n })), state.node,
    (n) => { state.node = n; setQuery({ node: n }); redraw(); }, { id: "node-toggle", "aria-label": "node type" });
  const mapsBox = h("div", { id: "patching-maps" });
  const mapsCard = h("section", { class: "card" },
    h("div", { class: "card-head" }, h("h2", {}, "Patching effects per node"),
      h("span", { class: "hint" }, `${unit}; denoising: the corrupt run with one node patched to its clean value; one colour range per node type`)),
    mapsBox);

  const metricCard = metricSection(result, roles);
  const scatterPlot = h("div", { class: "plot tall", id: "patching-scatter" });
  const statsPlot = h("div", { class: "plot", id: "patching-stats" });
  const statsTable = h("div", { class: "table-wrap" });
  const methodToggle = segmented(["atp", "atp_star"].map((m) => ({ value: m, label: METHOD_LABEL[m] })), state.method,
    (m) => { state.method = m; setQuery({ method: m }); redrawFidelity(); }, { id: "method-toggle", "aria-label": "estimate" });
  const fidelityCard = fidelity ? h("section", { class: "card" },
    h("div", { class: "card-head" }, h("h2", {}, "Fidelity: the estimate against activation patching"),
      h("div", { class: "toolbar", style: { margin: 0 } }, h("span", { class: "label" }, "estimate"), methodToggle)),
    h("div", { class: "grid grid-2" }, h("div", { class: "plot-cell" }, scatterPlot), h("div", { class: "plot-cell" }, statsPlot)),
    statsTable,
    h("p", { class: "small muted" }, "Task-set means over prompt groups with 95% percentile-bootstrap CIs. Normalised error: "
      + "Σ|act − est| / |act at the largest node| (0 is perfect).")) : null;

  replace(root, 
    resultHeader(out, { sub: "Attribution patching estimates every node's patching effect from two forwards and one backward; activation patching measures it." }),
    h("div", { class: "card toolbar", style: { position: "sticky", top: "60px", zIndex: 5 } }, h("span", { class: "label" }, "Node type"), nodeToggle),
    metricCard, mapsCard, fidelityCard, manifestCard(out));

  function redraw() {
    const byMethod = maps[state.node];
    const methods = Object.keys(byMethod).sort((a, b) => rank(METHOD_ORDER, a) - rank(METHOD_ORDER, b));
    const zmax = maxAbs(methods.map((m) => roles.map((r) => byMethod[m][r] && byMethod[m][r].mean.values)));
    const rows = [];
    for (const method of methods) {
      const cells = roles.map((role) => {
        const entry = byMethod[method][role];
        if (!entry) return h("div", { class: "plot-cell muted small" }, roleTitle(role), "not computed");
        const g = grid(entry.mean, posLabels);
        const el = h("div", { class: "plot", id: `patch-${method}-${role}`, dataset: { role, method } });
        const hasCI = entry.lo && entry.hi;
        const custom = hasCI ? ciGrid(entry, posLabels) : undefined;
        const many = g.y.length;
        queueMicrotask(() => plot(el, [divergingHeatmap({
          z: g.z, x: g.x, y: g.y, zmax, colorbarTitle: unit.length > 12 ? "Δ metric" : unit, customdata: custom,
          hovertemplate: `${roleLabel(role)} · ${METHOD_LABEL[method] || method}<br>%{y} %{x}<br>%{z:.4g}`
            + (hasCI ? "<br>95% CI [%{customdata[0]:.3g}, %{customdata[1]:.3g}]" : "") + "<extra></extra>",
        })], heatmapLayout({
          title: `${METHOD_LABEL[method] || method}${hasCI ? " · task-set mean" : ""}`, xTitle: g.xTitle, yTitle: g.yTitle,
          height: Math.max(230, Math.min(640, 100 + many * (many > 24 ? 9 : 24))),
          extra: g.x.length > 12 ? { xaxis: { tickangle: -50, tickfont: { size: 10 } } } : {},
        })));
        return h("div", { class: "plot-cell" }, roleTitle(role), el);
      });
      rows.push(h("div", { class: "method-row", dataset: { method } },
        h("h3", { style: { margin: "6px 0 6px" } }, METHOD_LABEL[method] || method),
        h("div", { class: "roles-grid" }, cells)));
    }
    replace(mapsBox, rows);
    if (fidelity) redrawFidelity();
  }

  function redrawFidelity() {
    const byMethod = maps[state.node] || {};
    const est = byMethod[state.method] ? state.method : "atp";
    const traces = [];
    let lo = Infinity, hi = -Infinity;
    for (const [i, role] of roles.entries()) {
      const act = byMethod.activation && byMethod.activation[role];
      const at = byMethod[est] && byMethod[est][role];
      if (!act || !at) continue;
      const x = flat(act.mean.values), y = flat(at.mean.values);
      const [a, b] = minMax([x, y]);
      lo = Math.min(lo, a); hi = Math.max(hi, b);
      traces.push({
        type: "scatter", mode: "markers", name: roleLabel(role), x, y, text: flatLabels(act.mean),
        marker: { color: roleColor(role, i), size: 7, opacity: 0.8, line: { width: 0.5, color: "#fff" } },
        hovertemplate: `${roleLabel(role)} %{text}<br>activation %{x:.4g}<br>${METHOD_LABEL[est]} %{y:.4g}<extra></extra>`,
      });
    }
    if (traces.length) {
      const pad = (hi - lo) * 0.05 || 1e-3;
      traces.unshift({ type: "scatter", mode: "lines", x: [lo - pad, hi + pad], y: [lo - pad, hi + pad], name: "y = x",
        line: { color: "#adb5bd", dash: "dash", width: 1 }, hoverinfo: "skip" });
      plot(scatterPlot, traces, {
        title: `${METHOD_LABEL[est]} vs activation patching · ${state.node}`, height: 420,
        xaxis: { title: { text: `activation patching (${unit})` }, zeroline: true, zerolinecolor: "#dee2e6", gridcolor: "#f1f3f5" },
        yaxis: { title: { text: `${METHOD_LABEL[est]} (${unit})` }, zeroline: true, zerolinecolor: "#dee2e6", gridcolor: "#f1f3f5", scaleanchor: "x", scaleratio: 1 },
        legend: { orientation: "h", y: 1.02, yanchor: "bottom", x: 1, xanchor: "right" }, margin: { t: 60 },
      });
    } else {
      replace(scatterPlot, notice(`No ${METHOD_LABEL[est]} and activation maps for ${state.node}.`));
    }
    // statistics with CIs
    const statTraces = roles.map((role, i) => {
      const ss = (result.roles[role].summaries || []).filter((s) => s.node_type === state.node && s.method === est);
      const get = (k) => ss.find((s) => s.statistic === k);
      const vals = STATS.map(([k]) => get(k));
      return {
        type: "bar", name: roleLabel(role), x: STATS.map(([, l]) => l), y: vals.map((s) => (s ? s.interval.mean : null)),
        marker: { color: roleColor(role, i) },
        error_y: { type: "data", symmetric: false, thickness: 1.2, width: 4, color: "#1d2330",
          array: vals.map((s) => (s && s.interval.hi !== null ? s.interval.hi - s.interval.mean : 0)),
          arrayminus: vals.map((s) => (s && s.interval.lo !== null ? s.interval.mean - s.interval.lo : 0)) },
        hovertemplate: `${roleLabel(role)} %{x}: %{y:.3g}<extra></extra>`,
      };
    });
    plot(statsPlot, statTraces, {
      title: `Task-set mean with 95% CI · ${METHOD_LABEL[est]} · ${state.node}`, barmode: "group", height: 420,
      yaxis: { title: { text: "statistic" }, zeroline: true, zerolinecolor: "#9aa3b5", gridcolor: "#eef0f4" },
      legend: { orientation: "h", y: 1.02, yanchor: "bottom", x: 1, xanchor: "right" }, margin: { t: 60 },
    });
    const rows = [];
    for (const role of roles) {
      for (const method of ["atp", "atp_star"]) {
        const ss = (result.roles[role].summaries || []).filter((s) => s.node_type === state.node && s.method === method);
        if (!ss.length) continue;
        rows.push(h("tr", { dataset: { role, method } }, h("td", {}, roleTitle(role)), h("td", {}, METHOD_LABEL[method]),
          STATS.map(([k]) => {
            const s = ss.find((x) => x.statistic === k);
            return h("td", { class: "num" }, s ? h("span", {}, fmt(s.interval.mean, 3), h("span", { class: "muted" }, ` ${fmtCI(s.interval.lo, s.interval.hi, 2)}`)) : "–");
          }),
          h("td", { class: "num" }, String((ss[0].interval || {}).n ?? "–"))));
      }
    }
    replace(statsTable, rows.length ? h("table", { class: "data", id: "fidelity-table" },
      h("thead", {}, h("tr", {}, h("th", {}, "role"), h("th", {}, "estimate"), STATS.map(([, l]) => h("th", { class: "num" }, l)), h("th", { class: "num" }, "groups"))),
      h("tbody", {}, rows)) : null);
  }

  redraw();
}

function ciGrid(entry, posLabels) {
  const lo = grid(entry.lo, posLabels).z, hi = grid(entry.hi, posLabels).z;
  return lo.map((row, i) => row.map((v, j) => [v, hi[i][j]]));
}

function metricSection(result, roles) {
  const items = roles.map((role) => {
    const r = result.roles[role];
    const m = r.metric || (r.atp && r.atp.metric) || (r.activation && r.activation.metric);
    if (!m) {
      if (!r.groups) return null;
      return h("div", { class: "stat", dataset: { role } },
        h("div", { class: "label" }, h("span", { class: "swatch", style: { background: roleColor(role) } }), roleLabel(role)),
        h("div", { class: "value" }, `${r.groups.length} groups`),
        h("div", { class: "ci" }, `${r.n_prompts} prompts · ${r.n_bootstrap} bootstrap resamples`));
    }
    return h("div", { class: "stat", dataset: { role } },
      h("div", { class: "label" }, h("span", { class: "swatch", style: { background: roleColor(role) } }), `${roleLabel(role)}: metric clean → corrupt`),
      h("div", { class: "value" }, `${fmt(m.clean, 3)} → ${fmt(m.corrupt, 3)}`),
      h("div", { class: "ci" }, `gap ${fmt(m.denominator, 3)}${m.normalized ? " (effects normalised by it)" : ""} · ${r.n_prompts} prompts`));
  }).filter(Boolean);
  return items.length ? h("div", { class: "stat-row", style: { marginBottom: "16px" } }, items) : null;
}

/** Token labels for positions when every prompt is the same custom clean prompt (else P0, P1, ...). */
async function positionLabels(out) {
  const inputs = out.inputs || {};
  let text = null;
  if (inputs.task && inputs.task.name === "custom" && inputs.task.pairs && inputs.task.pairs.length) text = inputs.task.pairs[0].clean;
  else if (inputs.prompts && inputs.prompts.length) text = inputs.prompts[0];
  if (!text) return null;
  try {
    const tok = await tokenize(out.pair, text, true);
    return tok.tokens.map((t, i) => `${i} ${tokenText(t.text)}`);
  } catch {
    return null;
  }
}

function rank(order, x) {
  const i = order.indexOf(x);
  return i < 0 ? 99 : i;
}
