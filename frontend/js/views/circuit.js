// Circuits: attribution graphs (circuit-tracer's JSON: nodes[{node_id, feature, layer, ctx_idx,
// feature_type, influence, activation}], links[{source, target, weight}]) of one or several roles in
// linked subplots; a readable default (the most influential nodes, weak edges hidden), pins kept in
// the URL, matched nodes marked across roles, a node panel, and the scores and feature lists of a diff.

import { api, getKinds, submitAnalysis } from "../api.js";
import { h, replace, segmented } from "../dom.js";
import { fmt } from "../format.js";
import { followJob } from "../progress.js";
import { navigate, setQuery } from "../router.js";
import { roleLabel, sortRoles } from "../roles.js";
import { featurePage, openFeaturePage } from "./feature.js";
import { circuitFeatureBar } from "../intervene-actions.js";
import { loadResult, manifestCard, notice, resultHeader, roleBadge } from "./common.js";
import { plotly, render as plot } from "../plots.js";
import {
  counterparts, diffGraphs, extractGraphs, featureIndex, featureRecord, nLayersOf, nodeLabel, nodeName, nodeType, selectGraph,
} from "./circuitgraph.js";
import { figure } from "./circuitplot.js";
import { diffSummary, edgeChanges, featureLists, scoresTable, topPaths } from "./circuitlists.js";

export { diffGraphs, extractGraphs, featureIndex, nodeType, prune } from "./circuitgraph.js";

export const DEFAULT_BUDGET = 50;
export const DEFAULT_MIN_WEIGHT = 0.2;

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

/** "role:node_id,…" <-> Set of "role:node_id" (the pinned nodes in the URL). */
export function parsePins(text) {
  return new Set(String(text || "").split(",").map((x) => x.trim()).filter((x) => /^[^:]+:.+$/.test(x)));
}

/** The interactive graphs of `graphs` ({role: graph}) appended to `container`. */
export function graphView(container, graphs, { result, resultId = null, kind = null, pair = null, route, signal, available = [], fileName = null }) {
  const roles = sortRoles(Object.keys(graphs));
  const q = route.query || {};
  const diff = result && result.diff && Array.isArray(result.diff.matched_nodes) ? result.diff : null;
  const diffRoles = diff && Array.isArray(diff.roles) ? diff.roles : null;
  // a circuit-diff focuses its second role against its first; otherwise the first role
  const defaultRole = diffRoles && roles.includes(diffRoles[1]) ? diffRoles[1] : roles[0];
  const role0 = roles.includes(q.role) ? q.role : defaultRole;
  const defaultRef = diffRoles && roles.includes(diffRoles[0]) && diffRoles[0] !== role0 ? diffRoles[0]
    : roles.find((r) => r !== role0) || roles[0];
  const num = (v, d) => (v !== undefined && v !== "" && Number.isFinite(Number(v)) ? Number(v) : d);
  const state = {
    role: role0,
    diff: roles.length > 1 && (q.diff === "1" || (kind === "circuit-diff" && q.diff !== "0")),
    ref: roles.includes(q.ref) && q.ref !== role0 ? q.ref : defaultRef,
    panels: q.panels === "one" || roles.length === 1 ? "one" : "all",
    nodeT: num(q.nodes, 0.8),
    budget: Math.round(num(q.budget, DEFAULT_BUDGET)),
    minW: num(q.minw, DEFAULT_MIN_WEIGHT),
    selected: q.node ? { role: roles.includes(q.noderole) ? q.noderole : role0, id: q.node } : null,
    pins: parsePins(q.pins),
    pinnedOnly: q.sub === "1",
  };
  const nLayers = nLayersOf(graphs);
  // features of different roles match only through a diff's decoder-cosine matching (or in a file, by id)
  const links = counterparts(graphs, diff, { features: kind !== "circuit" });
  const persist = () => {
    if (!resultId) return;
    setQuery({
      role: state.role, diff: state.diff ? "1" : "0", ref: state.diff ? state.ref : undefined, panels: state.panels === "one" ? "one" : undefined,
      nodes: state.nodeT, budget: state.budget, minw: state.minW,
      node: state.selected ? state.selected.id : undefined, noderole: state.selected ? state.selected.role : undefined,
      pins: [...state.pins].join(",") || undefined, sub: state.pinnedOnly ? "1" : undefined,
    });
  };

  // -- controls
  const roleToggle = segmented(roles.map((r) => ({ value: r, label: roleLabel(r) })), state.role,
    (r) => { state.role = r; diffAgainstAnother(); persist(); draw(); },
    { id: "circuit-role", "aria-label": "focus role", title: "the role whose nodes are compared with the reference" });
  const panelToggle = segmented([{ value: "all", label: "side by side" }, { value: "one", label: "one role" }], state.panels,
    (v) => { state.panels = v; persist(); draw(); }, { id: "circuit-panels", "aria-label": "panels" });
  const diffBox = h("input", { type: "checkbox", id: "circuit-diff", checked: state.diff, disabled: roles.length < 2 });
  const refSel = h("select", { id: "circuit-ref", "aria-label": "reference role" }, roles.map((r) => h("option", { value: r, selected: r === state.ref }, roleLabel(r))));
  /** A role is never diffed against itself: move the reference to another role. */
  function diffAgainstAnother() {
    if (state.ref !== state.role) return;
    state.ref = roles.find((x) => x !== state.role) || state.ref;
    refSel.value = state.ref;
  }
  diffBox.addEventListener("change", () => { state.diff = diffBox.checked; diffAgainstAnother(); persist(); draw(); });
  refSel.addEventListener("change", () => { state.ref = refSel.value; diffAgainstAnother(); persist(); draw(); });
  const subBox = h("input", { type: "checkbox", id: "circuit-subgraph", checked: state.pinnedOnly });
  subBox.addEventListener("change", () => { state.pinnedOnly = subBox.checked; persist(); draw(); });
  const slider = (label, key, id, min, max, step, show) => {
    const out = h("span", { class: "mono" }, show(state[key]));
    const input = h("input", { type: "range", id, min, max, step, value: state[key] });
    input.addEventListener("input", () => { state[key] = Number(input.value); out.textContent = show(state[key]); drawSoon(); });
    input.addEventListener("change", persist);
    return h("label", { class: "slider" }, h("span", { class: "label small" }, h("span", {}, label), out), input);
  };
  const counts = h("span", { class: "small muted", id: "circuit-counts" });
  const plotEl = h("div", { class: "graph-plot circuit-plot", id: "circuit-graph" });
  const panel = h("div", { class: "card node-panel circuit-node-panel", id: "node-panel" }, h("p", { class: "muted" }, "Click a node to see its links and open its feature."));
  const pinBar = h("div", { class: "circuit-pins", id: "circuit-pins" });
  const featureBox = h("div", { id: "feature-box" });
  const legend = h("div", { class: "legend" });
  const meta = graphs[state.role].metadata || {};
  const tokens = meta.prompt_tokens || (diff && diff.prompt_tokens) || null;
  const details = h("div", { id: "circuit-details" });

  container.append(
    h("section", { class: "card" },
      h("div", { class: "toolbar" }, h("span", { class: "label" }, "Focus"), roleToggle,
        h("label", { class: "check" }, diffBox, "diff against"), refSel,
        roles.length > 1 ? [h("span", { class: "label" }, "Panels"), panelToggle] : null,
        h("label", { class: "check", title: "draw only the pinned nodes and the edges among them" }, subBox, "pinned only")),
      h("div", { class: "toolbar circuit-sliders" },
        slider("nodes per role (most influential)", "budget", "node-budget", 5, 300, 5, (v) => String(Math.round(v))),
        slider("node threshold (cumulative influence)", "nodeT", "node-threshold", 0.05, 1, 0.01, (v) => v.toFixed(2)),
        slider("hide edges below × strongest input", "minW", "edge-threshold", 0, 1, 0.01, (v) => v.toFixed(2))),
      h("div", { class: "row", style: { justifyContent: "space-between", alignItems: "center", marginBottom: "6px" } }, legend, counts),
      fileName ? h("div", { class: "small muted" }, `file: ${fileName}`) : null,
      meta.prompt ? h("div", { class: "small muted mono", style: { marginBottom: "4px" } }, `prompt: ${meta.prompt}`) : null,
      pinBar,
      h("div", { class: "circuit-layout circuit-paired" }, h("div", { class: "circuit-plot-wrap" }, plotEl), panel)),
    featureBox, details);

  let pending = null;
  const drawSoon = () => { cancelAnimationFrame(pending); pending = requestAnimationFrame(draw); };
  let current = null; // the drawn figure: {panels, positions, overlays}

  const pinsOf = (role) => new Set([...state.pins].filter((p) => p.startsWith(`${role}:`)).map((p) => p.slice(role.length + 1)));
  /** [a id, b id] pairs of a diff oriented reference -> shown, for diffGraphs. */
  const pairsFor = (ref, role) => {
    if (!diffRoles || !diffRoles.includes(ref) || !diffRoles.includes(role) || ref === role) return null;
    const forward = ref === diffRoles[0];
    return { pairs: diff.matched_nodes.map((m) => (forward ? [m.node_id_a, m.node_id_b] : [m.node_id_b, m.node_id_a])) };
  };

  function draw() {
    refSel.disabled = !state.diff;
    const shown = state.panels === "one" ? [state.role] : roles.slice(0, 3);
    const drawn = new Map(shown.map((r) => [r, selectGraph(graphs[r], {
      nodeT: state.nodeT, budget: state.budget, minWeight: state.minW, pinned: pinsOf(r), pinnedOnly: state.pinnedOnly })]));
    const comparing = state.diff && state.ref !== state.role && graphs[state.ref];
    const refDrawn = comparing ? drawn.get(state.ref) || selectGraph(graphs[state.ref], {
      nodeT: state.nodeT, budget: state.budget, minWeight: state.minW, pinned: pinsOf(state.ref), pinnedOnly: state.pinnedOnly }) : null;
    const features = kind !== "circuit";
    const focusDiff = comparing ? diffGraphs(refDrawn, drawn.get(state.role), pairsFor(state.ref, state.role), { features }) : null;
    const panels = shown.map((r) => {
      const d = drawn.get(r);
      if (!comparing) return { role: r, ...d, status: null, lost: [] };
      if (r === state.ref) {
        const lostIds = new Set(focusDiff.lost.map((x) => x.node_id));
        return { role: r, ...d, status: new Map(d.nodes.map((x) => [x.node_id, lostIds.has(x.node_id) ? "lost" : "matched"])), lost: [] };
      }
      const dd = r === state.role ? focusDiff : diffGraphs(refDrawn, d, pairsFor(state.ref, r), { features });
      // the reference drawn elsewhere shows what is lost; alone, its lost nodes are drawn here as open rings
      return { role: r, ...d, status: dd.status, lost: shown.includes(state.ref) ? [] : dd.lost };
    });
    const nPos = Math.max(1, ...roles.flatMap((r) => graphs[r].nodes.map((x) => Number(x.ctx_idx) + 1)), tokens ? tokens.length : 0);
    const fig = figure(panels, { nLayers, nPos, tokens, width: plotEl.clientWidth || 900, graphs,
      pinned: state.pins, selected: state.selected });
    current = { panels, positions: fig.positions, overlays: fig.overlays, drawn };
    plot(plotEl, fig.traces, fig.layout, { scrollZoom: true });
    plotEl.dataset.arrangement = fig.mode;
    plotEl.dataset.roles = shown.join(" ");
    const focus = drawn.get(state.role) || drawn.get(shown[0]);
    const g = graphs[state.role];
    counts.textContent = `${roleLabel(state.role)}: ${focus.nodes.length} of ${g.nodes.length} nodes · ${focus.links.length} of ${g.links.length} edges`
      + (comparing ? ` · ${[...focusDiff.status.values()].filter((x) => x === "gained").length} gained, ${focusDiff.lost.length} lost vs ${roleLabel(state.ref)}` : "");
    const styles = comparing ? [["#868e96", "matched"], ["#2b8a3e", `gained (not in ${roleLabel(state.ref)})`], ["#c92a2a", `lost (not in ${roleLabel(state.role)})`]]
      : [["#868e96", "token embedding"], ["#7048e8", "feature (role colour)"], ["#adb5bd", "error"], ["#1d2330", "logit"]];
    replace(legend, styles.map(([c, label]) => h("span", {}, h("span", { class: "swatch", style: { background: c, borderRadius: "50%" } }), label)),
      h("span", {}, h("span", { class: "swatch", style: { background: "#3b5bdb", height: "3px" } }), "positive edge"),
      h("span", {}, h("span", { class: "swatch", style: { background: "#c92a2a", height: "3px" } }), "negative edge"),
      h("span", {}, h("span", { class: "swatch", style: { border: "2px solid #f08c00", borderRadius: "50%" } }), "match of the hovered node"));
    if (!plotEl.dataset.bound) {
      plotEl.dataset.bound = "1";
      plotEl.on("plotly_click", (ev) => {
        const pt = ev.points && ev.points.find((p) => p.customdata !== undefined);
        if (!pt) return;
        const role = pt.data.meta;
        if (ev.event && ev.event.shiftKey) togglePin(role, String(pt.customdata).replace(/^lost:/, ""));
        else select(String(pt.customdata).startsWith("lost:") ? state.ref : role, String(pt.customdata).replace(/^lost:/, ""));
      });
      plotEl.on("plotly_hover", (ev) => {
        const pt = ev.points && ev.points.find((p) => p.customdata !== undefined);
        if (pt) mark(withCounterparts(pt.data.meta, String(pt.customdata)));
      });
      plotEl.on("plotly_unhover", () => mark(null));
    }
    renderPins();
    showPanel();
    renderDetails(drawn);
  }

  /** The node itself and its matched nodes in the other roles: [{role, id}]. */
  function withCounterparts(role, id) {
    const raw = id.replace(/^lost:/, "");
    const own = id.startsWith("lost:") ? state.ref : role;
    return [{ role: own, id: raw }, ...(links.get(`${own}|${raw}`) || [])];
  }

  /** Ring `marks` ([{role, id}] or null) in every subplot they are drawn in (no redraw). */
  function mark(marks) {
    if (!current) return;
    const key = (marks || []).map((m) => `${m.role}:${m.id}`).join(" ");
    if (plotEl.dataset.marked === key) return;
    plotEl.dataset.marked = key;
    const xs = [], ys = [], idx = [];
    for (const [role, o] of Object.entries(current.overlays)) {
      const pos = current.positions[role];
      const ps = (marks || []).filter((m) => m.role === role).map((m) => pos.get(m.id) || pos.get(`lost:${m.id}`)).filter(Boolean);
      xs.push(ps.map((p) => p.x)); ys.push(ps.map((p) => p.y)); idx.push(o.mark);
    }
    plotly().restyle(plotEl, { x: xs, y: ys }, idx);
    for (const tr of details.querySelectorAll("tr.circuit-marked")) tr.classList.remove("circuit-marked");
    for (const m of marks || []) {
      for (const tr of details.querySelectorAll(`tr[data-node-a="${CSS.escape(m.id)}"], tr[data-node-b="${CSS.escape(m.id)}"], tr[data-node="${CSS.escape(m.id)}"]`)) tr.classList.add("circuit-marked");
    }
  }

  function select(role, id) {
    state.selected = { role, id };
    persist();
    draw();
    // the panel sits beside the graph; make sure it is on screen after a click
    const r = panel.getBoundingClientRect();
    if (r.top < 0 || r.top > window.innerHeight - 80) panel.scrollIntoView({ block: "nearest" });
  }

  function togglePin(role, id) {
    const key = `${role}:${id}`;
    if (state.pins.has(key)) state.pins.delete(key);
    else state.pins.add(key);
    persist();
    draw();
  }

  function renderPins() {
    if (!state.pins.size) { replace(pinBar, h("span", { class: "small muted" }, "Pin nodes (node panel, or shift-click) to label them and keep them drawn; “pinned only” draws their subgraph.")); return; }
    replace(pinBar, h("span", { class: "label small" }, "Pinned"), [...state.pins].map((p) => {
      const [role, ...rest] = p.split(":");
      const id = rest.join(":");
      const n = graphs[role] && graphs[role].nodes.find((x) => x.node_id === id);
      return h("span", { class: "circuit-pin", dataset: { pin: p } },
        h("button", { type: "button", class: "small", onclick: () => select(role, id) }, `${roleLabel(role)} · ${n ? nodeLabel(n, tokens, graphs[role]) : id}`),
        h("button", { type: "button", class: "small circuit-unpin", title: "unpin", onclick: () => togglePin(role, id) }, "×"));
    }), h("button", { type: "button", class: "small", id: "circuit-unpin-all", onclick: () => { state.pins.clear(); state.pinnedOnly = false; subBox.checked = false; persist(); draw(); } }, "clear"));
  }

  function showPanel() {
    const sel = state.selected;
    if (!sel) { replace(panel, h("p", { class: "muted" }, "Click a node to see its links, its match in the other role(s) and open its feature."), h("p", { class: "muted small" }, "Hover a node: its matched nodes are ringed in orange.")); return; }
    const g = graphs[sel.role];
    const n = g && g.nodes.find((x) => x.node_id === sel.id);
    if (!n) { replace(panel, h("p", { class: "muted" }, "The selected node is not in this graph.")); return; }
    const all = new Map(g.nodes.map((x) => [x.node_id, x]));
    const incoming = g.links.filter((l) => l.target === n.node_id).sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight)).slice(0, 12);
    const outgoing = g.links.filter((l) => l.source === n.node_id).sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight)).slice(0, 12);
    const linkRow = (l, other) => h("tr", { class: "clickable", onclick: () => select(sel.role, other) },
      h("td", {}, all.has(other) ? nodeName(all.get(other), tokens) : other), h("td", { class: ["num", l.weight >= 0 ? "pos" : "neg"] }, fmt(l.weight, 3)));
    const isFeature = nodeType(n) === "feature";
    const pinned = state.pins.has(`${sel.role}:${n.node_id}`);
    const partners = (links.get(`${sel.role}|${n.node_id}`) || []).map((p) => ({ ...p, node: graphs[p.role] && graphs[p.role].nodes.find((x) => x.node_id === p.id) }));
    const cos = matchCos(sel.role, n.node_id);
    replace(panel,
      h("div", { class: "card-head" }, h("h3", {}, nodeName(n, tokens)), roles.length > 1 ? roleBadge(sel.role) : null),
      h("dl", { class: "kv" },
        h("dt", {}, "node"), h("dd", { class: "mono" }, String(n.node_id)),
        h("dt", {}, "type"), h("dd", {}, n.feature_type || "–"),
        h("dt", {}, "layer"), h("dd", {}, String(n.layer)),
        h("dt", {}, "position"), h("dd", {}, `${n.ctx_idx}${tokens && tokens[n.ctx_idx] !== undefined ? ` (${JSON.stringify(tokens[n.ctx_idx])})` : ""}`),
        h("dt", {}, "feature"), h("dd", {}, String(isFeature ? featureIndex(n) : n.feature)),
        h("dt", {}, "activation"), h("dd", {}, fmt(n.activation, 4)),
        h("dt", {}, "influence"), h("dd", {}, fmt(n.influence, 4)),
        n.clerp ? [h("dt", {}, "label"), h("dd", {}, n.clerp)] : null),
      h("div", { class: "row", style: { margin: "10px 0", alignItems: "center" } },
        isFeature ? h("button", { type: "button", class: "primary small", id: "open-feature", onclick: () => openFeature(n, sel.role) }, "Open feature page") : null,
        h("button", { type: "button", class: "small", id: "pin-node", onclick: () => togglePin(sel.role, n.node_id) }, pinned ? "Unpin" : "Pin")),
      // ablate / steer the feature on the circuit's prompt (an error or embedding node has no feature)
      isFeature && available.includes("intervene") ? circuitFeatureBar({ resultId, pair, role: sel.role, node: n, layer: Number.parseInt(n.layer, 10),
        feature: featureIndex(n), roles, matches: featureMatches(sel.role, n.node_id), graph: g, signal }) : null,
      roles.length > 1 ? h("div", { class: "circuit-partners", id: "node-partners" },
        h("h3", { style: { margin: "8px 0 4px" } }, "Match in the other role"),
        partners.length ? h("ul", {}, partners.map((p) => h("li", {},
          h("a", { href: "javascript:void 0", onclick: () => select(p.role, p.id) }, `${roleLabel(p.role)}: ${p.node ? nodeName(p.node, tokens) : p.id}`),
          cos !== null ? h("span", { class: "muted small" }, ` decoder cos ${fmt(cos, 3)}`) : null)))
          : h("p", { class: "muted small" }, kind === "circuit" && isFeature ? "Features are matched across roles by a circuit diff." : "no matched node in the other graph(s)")) : null,
      h("div", { class: "links" },
        h("h3", { style: { margin: "8px 0 4px" } }, `Inputs (${incoming.length})`),
        incoming.length ? h("table", { class: "data" }, h("tbody", {}, incoming.map((l) => linkRow(l, l.source)))) : h("p", { class: "muted small" }, "none"),
        h("h3", { style: { margin: "8px 0 4px" } }, `Outputs (${outgoing.length})`),
        outgoing.length ? h("table", { class: "data" }, h("tbody", {}, outgoing.map((l) => linkRow(l, l.target)))) : h("p", { class: "muted small" }, "none")));
  }

  /** The decoder cosine of a node's match in a circuit-diff, or null. */
  function matchCos(role, id) {
    if (!diff) return null;
    const side = role === diffRoles[0] ? "node_id_a" : "node_id_b";
    const m = diff.matched_nodes.find((x) => x[side] === id);
    return m && typeof m.decoder_cos === "number" ? m.decoder_cos : null;
  }

  /** The matched features of a feature node in the other roles: [{role, layer, feature, cos}]. */
  function featureMatches(role, id) {
    return (links.get(`${role}|${id}`) || []).map((p) => {
      const m = graphs[p.role] && graphs[p.role].nodes.find((x) => x.node_id === p.id);
      const parts = /^(\d+)_(\d+)_(\d+)$/.exec(p.id);
      const layer = m ? Number.parseInt(m.layer, 10) : parts ? Number(parts[1]) : null;
      const feature = m ? featureIndex(m) : parts ? Number(parts[2]) : null;
      return { role: p.role, layer, feature, cos: matchCos(role, id) };
    }).filter((m) => Number.isFinite(m.layer) && Number.isFinite(m.feature) && m.feature >= 0);
  }

  /** The feature page: embedded in the file (with its match's beside it), else the `feature` kind. */
  async function openFeature(n, role) {
    const d = featureRecord(graphs[role], n);
    if (d) {
      const pages = [featurePage(d, { role: roles.length > 1 ? role : null, heading: `Feature ${nodeName(n, tokens)}`, compact: roles.length > 1 })];
      for (const p of links.get(`${role}|${n.node_id}`) || []) {
        const m = graphs[p.role].nodes.find((x) => x.node_id === p.id);
        const rec = m && featureRecord(graphs[p.role], m);
        if (rec) pages.push(featurePage(rec, { role: p.role, heading: `Match: ${nodeName(m, tokens)}`, idSuffix: `-${p.role}`, compact: true }));
      }
      replace(featureBox, h("div", { class: ["feature-across", `feature-across-${pages.length}`], id: "feature-across" }, pages));
      featureBox.scrollIntoView({ behavior: "smooth", block: "start" });
      return;
    }
    if (!available.includes("feature")) {
      replace(featureBox, notice("No feature data for this node: the graph does not embed feature pages and this server has no `feature` analysis."));
      return;
    }
    const box = h("div", { class: "card" }, h("h3", {}, `Feature ${nodeName(n, tokens)}`));
    replace(featureBox, box);
    openFeaturePage({ pair, role, layer: Number.parseInt(n.layer, 10), feature: featureIndex(n), matches: featureMatches(role, n.node_id),
      circuit: resultId, box, signal });
  }

  /** Scores, diff summary, feature lists, edge changes and top paths under the graph. */
  function renderDetails(drawn) {
    const counts = new Map([...drawn].map(([r, d]) => [r, { nodes: d.nodes.length, links: d.links.length }]));
    const openSpec = (spec) => {
      const box = h("div", { class: "card" }, h("h3", {}, `Feature ${roleLabel(spec.role)} L${spec.layer} #${spec.feature}`));
      replace(featureBox, box);
      box.scrollIntoView({ block: "nearest" });
      openFeaturePage({ pair, ...spec, circuit: resultId, box, signal });
    };
    const name = (role, id) => {
      const n = graphs[role] && graphs[role].nodes.find((x) => x.node_id === id);
      return n ? nodeName(n, tokens) : id;
    };
    if (!details.dataset.built) {
      details.dataset.built = "1";
      replace(details,
        h("section", { class: "card circuit-scores-card" }, h("h2", {}, diff ? "Scores and diff" : "Scores"),
          h("div", { class: diff ? "circuit-two" : "" }, h("div", { id: "circuit-scores-box" }), diff ? diffSummary(diff) : null),
          kind === "circuit" && roles.length > 1 && available.includes("circuit-diff") && pair ? runDiffButton() : null),
        diff ? h("section", { class: "card" }, h("h2", {}, "Features"), featureLists(diff, tokens, {
          hover: (marks) => mark(marks), select: (role, id) => select(role, id), open: openSpec })) : null,
        diff ? h("section", { class: "card" }, h("h2", {}, "Largest edge-weight changes"), edgeChanges(diff, name)) : null,
        result && result.roles ? h("section", { class: "card" }, h("h2", {}, "Top paths"), topPaths(result, roles)) : null);
    }
    const box = details.querySelector("#circuit-scores-box");
    if (box) replace(box, scoresTable(result, graphs, roles, counts));
  }

  /** For a `circuit` of several roles: run the circuit-diff of the same prompt (features matched by decoder cosine). */
  function runDiffButton() {
    const [a, b] = roles.includes("original") && roles.includes("ln_free") ? ["original", "ln_free"] : roles.slice(0, 2);
    const box = h("div", { style: { marginTop: "10px" } });
    const btn = h("button", { type: "button", class: "small", id: "run-circuit-diff", onclick: async () => {
      btn.disabled = true;
      const prompt = (result && result.prompt) || meta.prompt;
      try {
        const { status, data } = await submitAnalysis("circuit-diff", { pair, prompts: [prompt], roles: [a, b] });
        if (status === 200) { navigate(["circuit-diff", data.id]); return; }
        const job = await followJob(data.id, box, { signal });
        if (job.status === "done") navigate(["circuit-diff", job.id]);
        else box.append(notice(job.error || job.status, { error: true }));
      } catch (e) {
        if (e.name !== "AbortError") box.append(notice(e.message, { error: true }));
      }
    } }, `Match features: run the circuit diff ${roleLabel(a)} → ${roleLabel(b)}`);
    return h("div", {}, h("p", { class: "small muted" }, "Features of different roles are matched by decoder cosine in a circuit diff; here only embeddings, errors and logits are linked."), btn, box);
  }

  window.addEventListener("resize", drawSoon, { signal });
  draw();
}
