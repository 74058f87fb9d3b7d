// Circuits: the attribution graph (circuit-tracer's JSON: nodes[{node_id, feature, layer, ctx_idx,
// feature_type, influence, activation}], links[{source, target, weight}]) laid out by layer (y)
// and position (x); edge width by |weight|; client-side pruning by cumulative influence; a role
// toggle and a diff mode (matched / gained / lost nodes); a node panel and the feature page.

import { api, getKinds, submitAnalysis } from "../api.js";
import { h, replace, segmented } from "../dom.js";
import { fmt } from "../format.js";
import { followJob } from "../progress.js";
import { navigate, setQuery } from "../router.js";
import { roleColor, roleLabel, sortRoles } from "../roles.js";
import { featurePage } from "./feature.js";
import { loadResult, manifestCard, notice, resultHeader } from "./common.js";
import { render as plot } from "../plots.js";

const TYPE_STYLE = {
  embedding: { label: "token embedding", symbol: "square", color: "#868e96" },
  logit: { label: "output logit", symbol: "diamond", color: "#1d2330" },
  error: { label: "reconstruction error", symbol: "square-open", color: "#adb5bd" },
  feature: { label: "transcoder feature", symbol: "circle", color: "#7048e8" },
};
const DIFF_STYLE = {
  matched: { label: "matched", color: "#868e96" },
  gained: { label: "gained (only here)", color: "#2b8a3e" },
  lost: { label: "lost (only in the reference)", color: "#c92a2a" },
};
const MAX_EDGES = 6000;

/** "feature" | "error" | "embedding" | "logit" from a node's feature_type. */
export function nodeType(node) {
  const t = String(node.feature_type || "").toLowerCase();
  if (t.includes("embed")) return "embedding";
  if (t.includes("logit")) return "logit";
  if (t.includes("error")) return "error";
  return "feature";
}

/** Every graph in a result: {role: graph}. Accepts a bare graph, {graph}, {roles: {r: graph | {graph}}}, {graphs}. */
export function extractGraphs(result) {
  if (!result || typeof result !== "object") return {};
  const isGraph = (g) => g && Array.isArray(g.nodes) && Array.isArray(g.links);
  if (isGraph(result)) return { [result.role || (result.metadata && result.metadata.role) || "graph"]: result };
  if (isGraph(result.graph)) return { [result.role || "graph"]: result.graph };
  const out = {};
  for (const key of ["roles", "graphs"]) {
    const m = result[key];
    if (!m || typeof m !== "object") continue;
    for (const [role, v] of Object.entries(m)) {
      if (isGraph(v)) out[role] = v;
      else if (v && isGraph(v.graph)) out[role] = { ...v.graph, features: v.graph.features || v.features };
    }
  }
  return out;
}

/** The key two graphs' nodes are matched by when the result carries no matching of its own. */
function matchKey(n) {
  const t = nodeType(n);
  if (t === "logit") return `logit|${n.feature}`;
  if (t === "embedding") return `emb|${n.ctx_idx}`;
  return `${t}|${n.layer}|${n.feature}|${n.ctx_idx}`;
}

/**
 * Node statuses of graph `b` against reference `a`: {status: Map(node_id of b -> matched|gained), lost: [nodes of a]}.
 * Uses the result's own diff when it has one ({matched: [[a_id, b_id] | {a, b}], gained: [b ids], lost: [a ids]}).
 */
export function diffGraphs(a, b, diff) {
  const status = new Map();
  const aIds = new Map(a.nodes.map((n) => [n.node_id, n]));
  if (diff && Array.isArray(diff.pairs)) {
    // [[reference id, shown id]]: matched when the partner is drawn in the other (client-pruned) graph
    const partnerOfB = new Map(diff.pairs.map(([x, y]) => [y, x]));
    const partnerOfA = new Map(diff.pairs.map(([x, y]) => [x, y]));
    const bIds = new Set(b.nodes.map((n) => n.node_id));
    for (const n of b.nodes) status.set(n.node_id, aIds.has(partnerOfB.get(n.node_id)) ? "matched" : "gained");
    return { status, lost: a.nodes.filter((n) => !bIds.has(partnerOfA.get(n.node_id))) };
  }
  if (diff && (diff.matched || diff.gained || diff.lost)) {
    const idOf = (x, side) => (Array.isArray(x) ? x[side] : x && typeof x === "object" ? x[side ? "b" : "a"] ?? x[side ? "target" : "source"] ?? x.node_id : x);
    const matchedB = new Set((diff.matched || []).map((m) => idOf(m, 1)));
    const matchedA = new Set((diff.matched || []).map((m) => idOf(m, 0)));
    for (const n of b.nodes) status.set(n.node_id, matchedB.has(n.node_id) ? "matched" : "gained");
    const lostIds = new Set((diff.lost || []).map((x) => idOf(x, 0)));
    const lost = a.nodes.filter((n) => lostIds.has(n.node_id) || (!matchedA.has(n.node_id) && !diff.lost && !matchedB.has(n.node_id)));
    return { status, lost };
  }
  const bKeys = new Set(b.nodes.map(matchKey));
  const aKeys = new Set(a.nodes.map(matchKey));
  for (const n of b.nodes) status.set(n.node_id, aKeys.has(matchKey(n)) ? "matched" : "gained");
  const lost = [...aIds.values()].filter((n) => !bKeys.has(matchKey(n)));
  return { status, lost };
}

/** The layer row of a node: embeddings -1, layers 0.., logits on top. */
function layerRow(n, nLayers) {
  const t = nodeType(n);
  if (t === "embedding" || n.layer === "E") return -1;
  if (t === "logit") return nLayers;
  const l = Number.parseInt(n.layer, 10);
  return Number.isFinite(l) ? l : 0;
}

/** Whether `influence` is circuit-tracer's cumulative score (in [0, 1], lower = more important). */
function cumulativeScores(graph) {
  const nodes = graph.nodes;
  const vals = nodes.map((n) => n.influence).filter((v) => typeof v === "number");
  const score = new Map();
  if (vals.length && vals.every((v) => v >= 0 && v <= 1 + 1e-9)) {
    for (const n of nodes) score.set(n.node_id, typeof n.influence === "number" ? n.influence : 0);
    return score;
  }
  // otherwise: rank by |influence| (or by incident |weight|) and accumulate shares
  const mag = new Map(nodes.map((n) => [n.node_id, Math.abs(typeof n.influence === "number" ? n.influence : 0)]));
  if (!vals.length) for (const l of graph.links) {
    mag.set(l.source, (mag.get(l.source) || 0) + Math.abs(l.weight));
    mag.set(l.target, (mag.get(l.target) || 0) + Math.abs(l.weight));
  }
  const total = [...mag.values()].reduce((s, v) => s + v, 0) || 1;
  let acc = 0;
  for (const [id, v] of [...mag.entries()].sort((x, y) => y[1] - x[1])) {
    acc += v;
    score.set(id, acc / total);
  }
  return score;
}

/** Keep nodes with cumulative influence <= nodeT (logits and embeddings always) and the edges
 *  carrying the top edgeT share of |weight| among them. */
export function prune(graph, nodeT, edgeT, { dropIsolated = true } = {}) {
  const score = graph._score || (graph._score = cumulativeScores(graph));
  const keep = new Set(graph.nodes.filter((n) => {
    const t = nodeType(n);
    return t === "logit" || t === "embedding" || (score.get(n.node_id) ?? 0) <= nodeT + 1e-12;
  }).map((n) => n.node_id));
  const cand = graph.links.filter((l) => keep.has(l.source) && keep.has(l.target)).sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight));
  const total = cand.reduce((s, l) => s + Math.abs(l.weight), 0) || 1;
  const links = [];
  let acc = 0;
  for (const l of cand) {
    if (acc / total >= edgeT - 1e-12 || links.length >= MAX_EDGES) break;
    links.push(l);
    acc += Math.abs(l.weight);
  }
  let nodes = graph.nodes.filter((n) => keep.has(n.node_id));
  if (dropIsolated) {
    const used = new Set(links.flatMap((l) => [l.source, l.target]));
    nodes = nodes.filter((n) => used.has(n.node_id) || ["logit", "embedding"].includes(nodeType(n)));
  }
  return { nodes, links };
}

/** x, y of every node: x = position (nodes sharing a cell spread out), y = layer row. */
function layout(nodes, nLayers) {
  const cells = new Map();
  for (const n of nodes) {
    const key = `${layerRow(n, nLayers)}|${n.ctx_idx}`;
    (cells.get(key) || cells.set(key, []).get(key)).push(n);
  }
  const pos = new Map();
  for (const list of cells.values()) {
    list.sort((a, b) => (a.influence ?? 0) - (b.influence ?? 0) || String(a.node_id).localeCompare(String(b.node_id)));
    const k = list.length;
    list.forEach((n, i) => {
      const off = k === 1 ? 0 : -0.38 + (0.76 * i) / (k - 1);
      pos.set(n.node_id, { x: Number(n.ctx_idx) + off, y: layerRow(n, nLayers) });
    });
  }
  return pos;
}

/** A feature node's index in its layer: circuit-tracer's node_id is "<layer>_<index>_<pos>" while
 *  its `feature` field is a Cantor pairing of (layer, index); files without such ids keep `feature`. */
export function featureIndex(n) {
  const m = /^(?:lost:)?(\d+)_(\d+)_(\d+)$/.exec(String(n.node_id));
  return m && String(n.layer) === m[1] ? Number(m[2]) : n.feature;
}

function nodeName(n, tokens) {
  const t = nodeType(n);
  const tok = tokens && tokens[n.ctx_idx] !== undefined ? ` "${tokens[n.ctx_idx]}"` : "";
  if (t === "embedding") return `Emb${tok}`;
  if (t === "logit") return n.clerp || `logit ${n.feature}`;
  if (t === "error") return `error L${n.layer} @${n.ctx_idx}`;
  return `L${n.layer} #${featureIndex(n)} @${n.ctx_idx}`;
}

function nLayersOf(graphs) {
  let m = 0;
  for (const g of Object.values(graphs)) for (const n of g.nodes) {
    const t = nodeType(n);
    if (t === "logit") m = Math.max(m, Number.parseInt(n.layer, 10) - 1 || 0);
    else if (t !== "embedding") m = Math.max(m, (Number.parseInt(n.layer, 10) || 0) + 1);
  }
  return m;
}

// -- the view ----------------------------------------------------------------------------------
export async function render({ root, route, signal }) {
  const kinds = await getKinds().catch(() => []);
  const available = kinds.filter((k) => k.name === "circuit" || k.name === "circuit-diff").map((k) => k.name);
  const id = route.parts[0];
  if (!id) {
    await renderIndex(root, available, signal);
    return;
  }
  const out = await loadResult(root, id, signal);
  if (!out) return;
  const graphs = extractGraphs(out.result);
  if (!Object.keys(graphs).length) {
    replace(root, resultHeader(out), notice("This result holds no attribution graph (nodes and links)."), manifestCard(out));
    return;
  }
  const head = resultHeader(out, { title: out.kind === "circuit-diff" ? "Circuit diff" : "Attribution graph",
    sub: "Transcoder features, error nodes, token embeddings and output logits; edges are direct linear effects." });
  replace(root, head);
  graphView(root, graphs, { result: out.result, resultId: out.id, kind: out.kind, pair: out.pair, route, signal, available: kinds.map((k) => k.name) });
  root.append(manifestCard(out) || "");
}

async function renderIndex(root, available, signal) {
  const fileInput = h("input", { type: "file", accept: ".json,application/json", id: "graph-file" });
  const fileErr = h("div", { class: "file-error", role: "alert" });
  const drop = h("div", { class: "drop" },
    h("div", { class: "field-label", style: { marginBottom: "6px" } }, "Open a circuit-tracer graph file (JSON) from disk"), fileInput, fileErr,
    h("div", { class: "small muted", style: { marginTop: "6px" } }, "The file is read in the browser; nothing is uploaded."));
  const viewBox = h("div", { id: "file-graph" });
  fileInput.addEventListener("change", async () => {
    fileErr.textContent = "";
    const file = fileInput.files && fileInput.files[0];
    if (!file) return;
    try {
      const data = JSON.parse(await file.text());
      const graphs = extractGraphs(data);
      if (!Object.keys(graphs).length) throw new Error("no nodes and links in this file");
      replace(viewBox);
      graphView(viewBox, graphs, { result: data, route: { query: {} }, signal, available: [], fileName: file.name });
    } catch (e) {
      fileErr.textContent = `Could not read ${file.name}: ${e.message}`;
    }
  });
  const stored = h("div", {});
  const status = available.length
    ? h("p", {}, "Run a circuit from ", h("a", { href: "#/" }, "the analyses"), `; stored circuits are listed below.`)
    : notice("The circuit analysis is not available on this server yet (GET /api/v1/kinds lists no circuit kind). "
      + "You can still open a circuit-tracer graph file below.", { children: [] });
  status.id = "circuit-availability";
  status.dataset.available = String(available.length > 0);
  replace(root, 
    h("div", { class: "page-head" }, h("div", {}, h("h1", {}, "Circuits"),
      h("div", { class: "sub" }, "Attribution graphs of transcoder features for each model of a pair, and their differences."))),
    h("section", { class: "card" }, status, stored, drop), viewBox);
  if (available.length) {
    try {
      const pages = await Promise.all(available.map((k) => api("/results", { query: { kind: k, status: "done", limit: 20 }, signal })));
      const items = pages.flatMap((p) => p.items).sort((a, b) => String(b.created_at).localeCompare(String(a.created_at)));
      replace(stored, items.length ? h("ul", {}, items.map((it) => h("li", {}, h("a", { href: `#/${it.kind}/${it.id}` }, `${it.kind} · ${it.pair}`),
        h("span", { class: "muted small" }, ` ${new Date(it.created_at).toLocaleString()}`)))) : h("p", { class: "muted" }, "No stored circuits yet."));
    } catch { /* the list is a convenience */ }
  }
}

/** The interactive graph for `graphs` ({role: graph}) appended to `container`. */
export function graphView(container, graphs, { result, resultId = null, kind = null, pair = null, route, signal, available = [], fileName = null }) {
  const roles = sortRoles(Object.keys(graphs));
  const q = route.query || {};
  // a circuit-diff shows its second role against its first; otherwise ln_free / original when present
  const diffRoles = result && result.diff && Array.isArray(result.diff.roles) ? result.diff.roles : null;
  const defaultRole = diffRoles && roles.includes(diffRoles[1]) ? diffRoles[1] : roles.includes("ln_free") && kind === "circuit-diff" ? "ln_free" : roles[0];
  const role0 = roles.includes(q.role) ? q.role : defaultRole;
  const defaultRef = diffRoles && roles.includes(diffRoles[0]) && diffRoles[0] !== role0 ? diffRoles[0]
    : roles.includes("original") ? "original" : roles[0];
  const state = {
    role: role0,
    diff: q.diff === "1" || (kind === "circuit-diff" && q.diff !== "0"),
    ref: roles.includes(q.ref) ? q.ref : defaultRef,
    nodeT: q.nodes ? Number(q.nodes) : 0.8,
    edgeT: q.edges ? Number(q.edges) : 0.98,
    selected: q.node || null,
  };
  const nLayers = nLayersOf(graphs);
  const persist = () => {
    if (!resultId) return;
    setQuery({ role: state.role, diff: state.diff ? "1" : "0", ref: state.diff ? state.ref : undefined, nodes: state.nodeT, edges: state.edgeT, node: state.selected || undefined });
  };

  // controls
  const roleToggle = segmented(roles.map((r) => ({ value: r, label: roleLabel(r) })), state.role,
    (r) => { state.role = r; state.selected = null; diffAgainstAnother(); persist(); draw(); },
    { id: "circuit-role", "aria-label": "role" });
  const diffBox = h("input", { type: "checkbox", id: "circuit-diff", checked: state.diff, disabled: roles.length < 2 });
  const refSel = h("select", { id: "circuit-ref", "aria-label": "reference role" }, roles.map((r) => h("option", { value: r, selected: r === state.ref }, roleLabel(r))));
  /** A role is never diffed against itself: move the reference to another role. */
  function diffAgainstAnother() {
    if (!state.diff || state.ref !== state.role) return;
    state.ref = roles.find((x) => x !== state.role) || state.ref;
    refSel.value = state.ref;
  }
  diffBox.addEventListener("change", () => { state.diff = diffBox.checked; diffAgainstAnother(); persist(); draw(); });
  refSel.addEventListener("change", () => { state.ref = refSel.value; persist(); draw(); });
  const slider = (label, key, id, min, max) => {
    const out = h("span", { class: "mono" }, state[key].toFixed(2));
    const input = h("input", { type: "range", id, min, max, step: 0.01, value: state[key] });
    input.addEventListener("input", () => { state[key] = Number(input.value); out.textContent = state[key].toFixed(2); drawSoon(); });
    input.addEventListener("change", persist);
    return h("label", { class: "slider" }, h("span", { class: "label small" }, h("span", {}, label), out), input);
  };
  const counts = h("span", { class: "small muted", id: "circuit-counts" });
  const plotEl = h("div", { class: "graph-plot", id: "circuit-graph" });
  const panel = h("div", { class: "card node-panel", id: "node-panel" }, h("p", { class: "muted" }, "Click a node to see its links and open its feature."));
  const featureBox = h("div", { id: "feature-box" });
  const legend = h("div", { class: "legend" });
  const meta = graphs[state.role].metadata || {};

  container.append(
    h("section", { class: "card" },
      h("div", { class: "toolbar" }, h("span", { class: "label" }, "Model"), roleToggle,
        h("label", { class: "check" }, diffBox, "diff against"), refSel,
        h("span", { class: "spacer" }),
        slider("node threshold (cumulative influence)", "nodeT", "node-threshold", 0.05, 1),
        slider("edge threshold (cumulative |weight|)", "edgeT", "edge-threshold", 0.05, 1)),
      h("div", { class: "row", style: { justifyContent: "space-between", alignItems: "center", marginBottom: "6px" } }, legend, counts),
      fileName ? h("div", { class: "small muted" }, `file: ${fileName}`) : null,
      meta.prompt ? h("div", { class: "small muted mono", style: { marginBottom: "4px" } }, `prompt: ${meta.prompt}`) : null,
      h("div", { class: "circuit-layout" }, h("div", {}, plotEl), panel)),
    featureBox);

  let pending = null;
  const drawSoon = () => { cancelAnimationFrame(pending); pending = requestAnimationFrame(draw); };
  let current = null; // {nodes: Map id -> node}

  function draw() {
    refSel.disabled = !state.diff;
    const g = graphs[state.role];
    const tokens = (g.metadata && g.metadata.prompt_tokens) || null;
    const pruned = prune(g, state.nodeT, state.edgeT);
    let status = null, lost = [];
    if (state.diff && state.ref !== state.role && graphs[state.ref]) {
      const ref = prune(graphs[state.ref], state.nodeT, state.edgeT);
      const d = diffGraphs(ref, pruned, diffInfo(result, state.ref, state.role));
      status = d.status;
      lost = d.lost;
    }
    const pos = layout([...pruned.nodes, ...lost.map((n) => ({ ...n, node_id: `lost:${n.node_id}` }))], nLayers);
    const byId = new Map(pruned.nodes.map((n) => [n.node_id, n]));
    current = { byId, g, tokens, lost: new Map(lost.map((n) => [`lost:${n.node_id}`, n])) };
    const maxW = Math.max(1e-12, ...pruned.links.map((l) => Math.abs(l.weight)));
    // edges: bucketed by width and sign so a few traces draw thousands of segments
    const buckets = new Map();
    for (const l of pruned.links) {
      const a = pos.get(l.source), b = pos.get(l.target);
      if (!a || !b) continue;
      const w = Math.abs(l.weight) / maxW;
      const k = `${l.weight >= 0 ? "+" : "-"}${Math.min(5, Math.floor(w * 6))}`;
      const bkt = buckets.get(k) || buckets.set(k, { x: [], y: [] }).get(k);
      bkt.x.push(a.x, b.x, null);
      bkt.y.push(a.y, b.y, null);
    }
    const traces = [];
    for (const [k, v] of buckets) {
      const level = Number(k.slice(1));
      traces.push({
        type: "scatter", mode: "lines", x: v.x, y: v.y, hoverinfo: "skip", showlegend: false,
        line: { width: 0.4 + level * 1.1, color: k[0] === "+" ? `rgba(59, 91, 219, ${0.25 + level * 0.1})` : `rgba(201, 42, 42, ${0.25 + level * 0.1})` },
      });
    }
    // nodes, one trace per type (or per diff status)
    const groups = new Map();
    const addTo = (key, n, id) => {
      const p = pos.get(id);
      if (!p) return;
      const grp = groups.get(key) || groups.set(key, { x: [], y: [], ids: [], text: [], size: [] }).get(key);
      grp.x.push(p.x); grp.y.push(p.y); grp.ids.push(id);
      grp.text.push(`${nodeName(n, tokens)}<br>${n.feature_type}${n.activation !== null && n.activation !== undefined ? `<br>activation ${fmt(n.activation, 3)}` : ""}`
        + `${typeof n.influence === "number" ? `<br>influence ${fmt(n.influence, 3)}` : ""}${n.clerp && nodeType(n) !== "logit" ? `<br>${n.clerp}` : ""}`);
      grp.size.push(nodeType(n) === "feature" ? 11 : 10);
    };
    for (const n of pruned.nodes) addTo(status ? status.get(n.node_id) || "matched" : nodeType(n), n, n.node_id);
    for (const n of lost) addTo("lost", n, `lost:${n.node_id}`);
    for (const [key, grp] of groups) {
      const st = status || key === "lost" ? DIFF_STYLE[key] : null;
      const ty = TYPE_STYLE[key];
      traces.push({
        type: "scatter", mode: "markers", name: (st || ty).label, x: grp.x, y: grp.y, customdata: grp.ids, text: grp.text,
        hovertemplate: "%{text}<extra></extra>",
        marker: {
          size: grp.size, symbol: key === "lost" ? "circle-open" : ty ? ty.symbol : "circle",
          color: st ? st.color : key === "feature" ? roleColor(state.role) : ty.color,
          line: { width: key === "lost" ? 2 : 1, color: key === "lost" ? DIFF_STYLE.lost.color : "#fff" },
        },
      });
    }
    // the selected node
    if (state.selected && (pos.get(state.selected))) {
      const p = pos.get(state.selected);
      traces.push({ type: "scatter", mode: "markers", x: [p.x], y: [p.y], hoverinfo: "skip", showlegend: false,
        marker: { size: 20, symbol: "circle-open", color: "#f08c00", line: { width: 3 } } });
    }
    const nPos = Math.max(1, ...g.nodes.map((n) => Number(n.ctx_idx) + 1), tokens ? tokens.length : 0);
    const yTicks = [-1, ...Array.from({ length: nLayers }, (_, i) => i), nLayers];
    plot(plotEl, traces, {
      height: 620, showlegend: false, hovermode: "closest", dragmode: "pan",
      margin: { l: 60, r: 10, t: 16, b: 90 },
      xaxis: { range: [-0.6, nPos - 0.4], tickvals: Array.from({ length: nPos }, (_, i) => i),
        ticktext: Array.from({ length: nPos }, (_, i) => (tokens && tokens[i] !== undefined ? `${tokens[i]}` : `${i}`)),
        tickangle: -45, showgrid: true, gridcolor: "#f1f3f5", zeroline: false, title: { text: "token position" } },
      yaxis: { range: [-1.6, nLayers + 0.6], tickvals: yTicks, ticktext: yTicks.map((y) => (y === -1 ? "Emb" : y === nLayers ? "Logit" : `L${y}`)),
        showgrid: true, gridcolor: "#f1f3f5", zeroline: false, title: { text: "layer" } },
    }, { scrollZoom: true });
    counts.textContent = `${pruned.nodes.length} of ${g.nodes.length} nodes · ${pruned.links.length} of ${g.links.length} edges`
      + (status ? ` · ${[...status.values()].filter((s) => s === "gained").length} gained, ${lost.length} lost vs ${roleLabel(state.ref)}` : "");
    replace(legend, (status ? Object.values(DIFF_STYLE) : Object.values(TYPE_STYLE)).map((s) =>
      h("span", {}, h("span", { class: "swatch", style: { background: s.color, borderRadius: "50%" } }), s.label)),
    h("span", {}, h("span", { class: "swatch", style: { background: "#3b5bdb", height: "3px" } }), "positive edge"),
    h("span", {}, h("span", { class: "swatch", style: { background: "#c92a2a", height: "3px" } }), "negative edge"));
    if (!plotEl.dataset.bound) {
      plotEl.dataset.bound = "1";
      plotEl.on("plotly_click", (ev) => {
        const pt = ev.points && ev.points.find((p) => p.customdata !== undefined);
        if (pt) select(pt.customdata);
      });
    }
    showPanel();
  }

  function select(id) {
    state.selected = id;
    persist();
    draw();
  }

  function showPanel() {
    const id = state.selected;
    if (!current) return;
    if (!id) { replace(panel, h("p", { class: "muted" }, "Click a node to see its links and open its feature.")); return; }
    const n = current.byId.get(id) || current.lost.get(id);
    if (!n) { replace(panel, h("p", { class: "muted" }, "The selected node is pruned at these thresholds.")); return; }
    const links = current.g.links;
    const incoming = links.filter((l) => l.target === n.node_id).sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight)).slice(0, 12);
    const outgoing = links.filter((l) => l.source === n.node_id).sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight)).slice(0, 12);
    const all = new Map(current.g.nodes.map((x) => [x.node_id, x]));
    const linkRow = (l, other) => h("tr", { class: "clickable", onclick: () => select(other) },
      h("td", {}, all.has(other) ? nodeName(all.get(other), current.tokens) : other), h("td", { class: ["num", l.weight >= 0 ? "pos" : "neg"] }, fmt(l.weight, 3)));
    const isFeature = nodeType(n) === "feature";
    const open = isFeature ? h("button", { type: "button", class: "primary small", id: "open-feature", onclick: () => openFeature(n) }, "Open feature page") : null;
    replace(panel,
      h("h3", {}, nodeName(n, current.tokens)),
      h("dl", { class: "kv" },
        h("dt", {}, "node"), h("dd", { class: "mono" }, String(n.node_id).replace(/^lost:/, "")),
        h("dt", {}, "type"), h("dd", {}, n.feature_type || "–"),
        h("dt", {}, "layer"), h("dd", {}, String(n.layer)),
        h("dt", {}, "position"), h("dd", {}, `${n.ctx_idx}${current.tokens && current.tokens[n.ctx_idx] !== undefined ? ` (${JSON.stringify(current.tokens[n.ctx_idx])})` : ""}`),
        h("dt", {}, "feature"), h("dd", {}, String(nodeType(n) === "feature" ? featureIndex(n) : n.feature)),
        h("dt", {}, "activation"), h("dd", {}, fmt(n.activation, 4)),
        h("dt", {}, "influence"), h("dd", {}, fmt(n.influence, 4)),
        n.clerp ? [h("dt", {}, "label"), h("dd", {}, n.clerp)] : null),
      h("div", { style: { margin: "10px 0" } }, open),
      h("div", { class: "links" },
        h("h3", { style: { margin: "8px 0 4px" } }, `Inputs (${incoming.length})`),
        incoming.length ? h("table", { class: "data" }, h("tbody", {}, incoming.map((l) => linkRow(l, l.source)))) : h("p", { class: "muted small" }, "none"),
        h("h3", { style: { margin: "8px 0 4px" } }, `Outputs (${outgoing.length})`),
        outgoing.length ? h("table", { class: "data" }, h("tbody", {}, outgoing.map((l) => linkRow(l, l.target)))) : h("p", { class: "muted small" }, "none")));
  }

  /** The feature page: embedded in the result/file when it is, else the `feature` kind when the server has it. */
  async function openFeature(n) {
    const g = current.g;
    const feats = g.features || (result && result.features) || (result && result.roles && result.roles[state.role] && result.roles[state.role].features) || null;
    const d = feats ? feats[n.node_id] || feats[String(n.feature)] || feats[`${n.layer}_${n.feature}`] || feats[`${n.layer}.${n.feature}`] : null;
    if (d) {
      replace(featureBox, featurePage(d, { role: roles.length > 1 ? state.role : null, heading: `Feature ${nodeName(n, current.tokens)}` }));
      featureBox.scrollIntoView({ behavior: "smooth", block: "start" });
      return;
    }
    if (!available.includes("feature")) {
      replace(featureBox, notice("No feature data for this node: the graph does not embed feature pages and this server has no `feature` analysis."));
      return;
    }
    const options = { layer: Number.parseInt(n.layer, 10), feature: featureIndex(n) };
    const role = String(state.selected || "").startsWith("lost:") ? state.ref : state.role;
    const body = { pair: pair || undefined, roles: roles.includes(role) && role !== "graph" ? [role] : undefined, options };
    const box = h("div", { class: "card" }, h("h3", {}, `Feature ${nodeName(n, current.tokens)}`));
    replace(featureBox, box);
    try {
      const { status, data } = await submitAnalysis("feature", body);
      if (status === 200) { navigate(["feature", data.id]); return; }
      const job = await followJob(data.id, box, { signal });
      if (job.status === "done") navigate(["feature", job.id]);
      else box.append(notice(job.error || job.status, { error: true }));
    } catch (e) {
      if (e.name !== "AbortError") box.append(notice(e.message, { error: true }));
    }
  }

  draw();
}

function diffInfo(result, ref, role) {
  if (!result) return null;
  const d = result.diff || result.diffs;
  if (!d) return null;
  if (d.matched || d.gained || d.lost) return d;
  if (Array.isArray(d.matched_nodes) && Array.isArray(d.roles)) {
    // lnscope's CircuitDiff: roles [a, b]; matched_nodes {node_id_a, node_id_b}; only_a / only_b kept in one circuit
    const [a, b] = d.roles;
    if (!(new Set([a, b]).has(role) && new Set([a, b]).has(ref)) || role === ref) return null;
    const forward = ref === a; // reference a, shown b
    // every matched pair (not only those the server's pruning kept): statuses follow the sliders
    return { pairs: d.matched_nodes.map((m) => (forward ? [m.node_id_a, m.node_id_b] : [m.node_id_b, m.node_id_a])) };
  }
  return d[`${role} - ${ref}`] || d[`${role}-${ref}`] || d[role] || null;
}
