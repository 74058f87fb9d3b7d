// The Plotly figure of one or more roles' attribution graphs: one subplot per role with the same axes
// (x = token positions labelled with their tokens, y = layers; zoom and pan linked), edges bucketed by
// |weight|, nodes coloured by type or by diff status, pinned nodes labelled, and per-subplot overlay
// traces for the selected node and the hover marks (restyled without redrawing the graph).

import { fmt } from "../format.js";
import { roleColor, roleLabel } from "../roles.js";
import { nodeLabel, nodeType, positionColumns, spreadLayout } from "./circuitgraph.js";

export const TYPE_STYLE = {
  embedding: { label: "token embedding", symbol: "square", color: "#868e96" },
  logit: { label: "output logit", symbol: "diamond", color: "#1d2330" },
  error: { label: "reconstruction error", symbol: "square-open", color: "#adb5bd" },
  feature: { label: "transcoder feature", symbol: "circle", color: "#7048e8" },
};
export const DIFF_STYLE = {
  matched: { label: "matched", color: "#868e96" },
  gained: { label: "gained (only here)", color: "#2b8a3e" },
  lost: { label: "lost (only in the reference)", color: "#c92a2a" },
};
const MARK_COLOR = "#f08c00";
const SELECT_COLOR = "#1d2330";

/** Columns side by side when each subplot gets `minWidth` px, else rows. */
export function arrangement(nPanels, width, minWidth = 360) {
  return nPanels === 1 || width / nPanels >= minWidth ? "columns" : "rows";
}

const axisKey = (i, axis) => `${axis}axis${i ? i + 1 : ""}`;
const axisRef = (i, axis) => `${axis}${i ? i + 1 : ""}`;

/**
 * The figure. panels: [{role, nodes, links, status (Map id -> matched|gained|lost) | null, lost: [nodes]}];
 * returns {traces, layout, overlays: {role: {select, mark}} (trace indexes), positions: {role: Map id -> {x, y}}}.
 */
export function figure(panels, { nLayers, nPos, tokens, width, graphs, pinned, selected }) {
  const n = panels.length;
  const mode = arrangement(n, width);
  const panelH = Math.max(240, Math.min(520, 62 * (nLayers + 2) + 60));
  const height = mode === "columns" ? panelH + 110 : n * panelH + 110;
  const panelW = mode === "columns" ? (width - 60) / n : width - 60;
  const cellH = Math.max(12, (panelH - 30) / (nLayers + 2));
  // shared by every subplot: a position holding a crowded cell in any role is wider in all
  const columns = positionColumns(panels.map((p) => [...p.nodes, ...p.lost]), nPos, nLayers, Math.max(1, Math.floor((0.75 * cellH) / 9)));
  const span = columns.length ? columns[columns.length - 1].x + columns[columns.length - 1].w / 2 : 1;
  const unitPx = Math.max(4, (panelW - 20) / span);
  const gap = mode === "columns" ? 0.05 : 0.09;
  const traces = [];
  const positions = {};
  const layout = {
    height, showlegend: false, hovermode: "closest", dragmode: "pan", margin: { l: 52, r: 10, t: 26, b: 80 }, annotations: [],
  };
  const yTicks = [-1, ...Array.from({ length: nLayers }, (_, i) => i), nLayers];
  panels.forEach((panel, i) => {
    const lo = mode === "columns" ? i / n + (i ? gap / 2 : 0) : 1 - (i + 1) / n + (i < n - 1 ? gap / 2 : 0);
    const hi = mode === "columns" ? (i + 1) / n - (i < n - 1 ? gap / 2 : 0) : 1 - i / n - (i ? gap / 2 : 0);
    const showX = mode === "columns" || i === n - 1;
    layout[axisKey(i, "x")] = {
      domain: mode === "columns" ? [lo, hi] : [0, 1], anchor: axisRef(i, "y"), matches: i ? "x" : undefined,
      range: [-0.2, span + 0.2], tickvals: columns.map((c) => c.x), showticklabels: showX,
      ticktext: Array.from({ length: nPos }, (_, k) => (tokens && tokens[k] !== undefined ? `${tokens[k]}` : `${k}`)),
      tickangle: -45, showgrid: true, gridcolor: "#f1f3f5", zeroline: false, fixedrange: false,
    };
    layout[axisKey(i, "y")] = {
      domain: mode === "columns" ? [0, 1] : [lo, hi], anchor: axisRef(i, "x"), matches: i ? "y" : undefined,
      range: [-1.6, nLayers + 0.6], tickvals: yTicks, showticklabels: mode === "rows" || i === 0,
      ticktext: yTicks.map((y) => (y === -1 ? "Emb" : y === nLayers ? "Logit" : `L${y}`)), showgrid: true, gridcolor: "#f1f3f5", zeroline: false,
    };
    layout.annotations.push({
      xref: "paper", yref: "paper", x: mode === "columns" ? lo : 0, y: mode === "columns" ? 1 : hi, xanchor: "left", yanchor: "bottom",
      showarrow: false, align: "left", font: { size: 12.5, color: roleColor(panel.role) },
      text: `<b>${roleLabel(panel.role)}</b>  ${panel.nodes.length} nodes · ${panel.links.length} edges`,
    });
    const all = [...panel.nodes, ...panel.lost.map((x) => ({ ...x, node_id: `lost:${x.node_id}` }))];
    const pos = spreadLayout(all, nLayers, { columns, unitPx, cellH });
    positions[panel.role] = pos;
    const xa = axisRef(i, "x"), ya = axisRef(i, "y");
    traces.push(...edgeTraces(panel.links, pos, xa, ya));
    traces.push(...nodeTraces(panel, pos, xa, ya, tokens, graphs[panel.role]));
  });
  // overlays after every node trace: pinned labels, the selection, the hover marks
  const overlays = {};
  panels.forEach((panel, i) => {
    const xa = axisRef(i, "x"), ya = axisRef(i, "y");
    const pos = positions[panel.role];
    const pins = panel.nodes.filter((x) => pinned.has(`${panel.role}:${x.node_id}`) && pos.get(x.node_id));
    traces.push({
      type: "scatter", mode: "markers+text", xaxis: xa, yaxis: ya, hoverinfo: "skip", meta: `pins:${panel.role}`,
      x: pins.map((x) => pos.get(x.node_id).x), y: pins.map((x) => pos.get(x.node_id).y),
      text: pins.map((x) => nodeLabel(x, tokens, graphs[panel.role])), textposition: "top center", textfont: { size: 10.5, color: "#1d2330" },
      marker: { size: 17, symbol: "circle-open", color: "#7048e8", line: { width: 2 } },
    });
    const sel = selected && selected.role === panel.role ? pos.get(selected.id) : null;
    overlays[panel.role] = { select: traces.length, mark: traces.length + 1 };
    traces.push({
      type: "scatter", mode: "markers", xaxis: xa, yaxis: ya, hoverinfo: "skip", meta: `select:${panel.role}`,
      x: sel ? [sel.x] : [], y: sel ? [sel.y] : [], marker: { size: 21, symbol: "circle-open", color: SELECT_COLOR, line: { width: 3 } },
    });
    traces.push({
      type: "scatter", mode: "markers", xaxis: xa, yaxis: ya, hoverinfo: "skip", meta: `mark:${panel.role}`,
      x: [], y: [], marker: { size: 19, symbol: "circle-open", color: MARK_COLOR, line: { width: 3 } },
    });
  });
  return { traces, layout, overlays, positions, mode };
}

/** Edges bucketed by sign and |weight| (relative to the panel's strongest) so a few traces draw them all. */
function edgeTraces(links, pos, xa, ya) {
  const maxW = Math.max(1e-12, ...links.map((l) => Math.abs(l.weight)));
  const buckets = new Map();
  for (const l of links) {
    const a = pos.get(l.source), b = pos.get(l.target);
    if (!a || !b) continue;
    const k = `${l.weight >= 0 ? "+" : "-"}${Math.min(5, Math.floor((Math.abs(l.weight) / maxW) * 6))}`;
    const bkt = buckets.get(k) || buckets.set(k, { x: [], y: [] }).get(k);
    bkt.x.push(a.x, b.x, null);
    bkt.y.push(a.y, b.y, null);
  }
  return [...buckets].map(([k, v]) => {
    const level = Number(k.slice(1));
    return {
      type: "scatter", mode: "lines", x: v.x, y: v.y, xaxis: xa, yaxis: ya, hoverinfo: "skip", showlegend: false,
      line: { width: 0.4 + level * 1.0, color: k[0] === "+" ? `rgba(59, 91, 219, ${0.2 + level * 0.1})` : `rgba(201, 42, 42, ${0.2 + level * 0.1})` },
    };
  });
}

/** One marker trace per node type (or diff status); customdata = node ids, meta = the role. */
function nodeTraces(panel, pos, xa, ya, tokens, graph) {
  const groups = new Map();
  const add = (key, node, id) => {
    const p = pos.get(id);
    if (!p) return;
    const g = groups.get(key) || groups.set(key, { x: [], y: [], ids: [], text: [], size: [] }).get(key);
    g.x.push(p.x); g.y.push(p.y); g.ids.push(id); g.size.push(p.size);
    g.text.push(`<b>${nodeLabel(node, tokens, graph)}</b> @${node.ctx_idx}<br>${node.feature_type}`
      + (node.activation !== null && node.activation !== undefined ? `<br>activation ${fmt(node.activation, 3)}` : "")
      + (typeof node.influence === "number" ? `<br>cumulative influence ${fmt(node.influence, 3)}` : "")
      + (panel.status ? `<br>${panel.status.get(node.node_id) || "lost"}` : ""));
  };
  for (const x of panel.nodes) add(panel.status ? panel.status.get(x.node_id) || "matched" : nodeType(x), x, x.node_id);
  for (const x of panel.lost) add("lost", x, `lost:${x.node_id}`);
  return [...groups].map(([key, g]) => {
    const st = panel.status || key === "lost" ? DIFF_STYLE[key] : null;
    const ty = TYPE_STYLE[key];
    return {
      type: "scatter", mode: "markers", name: st ? st.label : ty.label, meta: panel.role, xaxis: xa, yaxis: ya,
      x: g.x, y: g.y, customdata: g.ids, text: g.text, hovertemplate: "%{text}<extra></extra>",
      marker: {
        size: g.size, symbol: key === "lost" && !panel.status ? "circle-open" : ty ? ty.symbol : "circle",
        color: st ? st.color : key === "feature" ? roleColor(panel.role) : ty.color,
        line: { width: key === "lost" ? 1.5 : 0.8, color: key === "lost" ? DIFF_STYLE.lost.color : "#fff" },
      },
    };
  });
}
