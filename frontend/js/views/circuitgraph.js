// Attribution-graph data helpers (no DOM): node kinds and names, the readable selection of a graph
// (a node budget by influence, weak edges hidden, pinned nodes always in), the spread layout of
// nodes sharing a (layer, position) cell, and the matching of nodes across roles.

export const MAX_EDGES = 6000;

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
export function matchKey(n, { features = true } = {}) {
  const t = nodeType(n);
  if (t === "logit") return `logit|${n.feature}`;
  if (t === "embedding") return `emb|${n.ctx_idx}`;
  if (t === "feature" && !features) return null;
  return `${t}|${n.layer}|${n.feature}|${n.ctx_idx}`;
}

/** The layer row of a node: embeddings -1, layers 0.., logits on top. */
export function layerRow(n, nLayers) {
  const t = nodeType(n);
  if (t === "embedding" || n.layer === "E") return -1;
  if (t === "logit") return nLayers;
  const l = Number.parseInt(n.layer, 10);
  return Number.isFinite(l) ? l : 0;
}

/** Number of transformer layers the graphs span (logits sit at n_layers + 1 in circuit-tracer's ids). */
export function nLayersOf(graphs) {
  let m = 0;
  for (const g of Object.values(graphs)) for (const n of g.nodes) {
    const t = nodeType(n);
    if (t === "logit") m = Math.max(m, Number.parseInt(n.layer, 10) - 1 || 0);
    else if (t !== "embedding") m = Math.max(m, (Number.parseInt(n.layer, 10) || 0) + 1);
  }
  return m;
}

/** Per node id, circuit-tracer's cumulative influence score (in [0, 1], lower = more important). */
export function cumulativeScores(graph) {
  if (graph._score) return graph._score;
  const nodes = graph.nodes;
  const vals = nodes.map((n) => n.influence).filter((v) => typeof v === "number");
  const score = new Map();
  if (vals.length && vals.every((v) => v >= 0 && v <= 1 + 1e-9)) {
    for (const n of nodes) score.set(n.node_id, typeof n.influence === "number" ? n.influence : 0);
  } else {
    // rank by |influence| (or by incident |weight|) and accumulate shares
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
  }
  Object.defineProperty(graph, "_score", { value: score, enumerable: false });
  return score;
}

/**
 * The drawn part of a graph: logits, then the `budget` most influential other nodes with cumulative
 * influence <= nodeT, plus `pinned` ids; edges among them whose |weight| is at least `minWeight` times
 * the strongest input of their target. With `pinnedOnly`, the pinned nodes and the edges among them.
 */
export function selectGraph(graph, { nodeT = 1, budget = 50, minWeight = 0, pinned = new Set(), pinnedOnly = false } = {}) {
  const score = cumulativeScores(graph);
  const keep = new Set();
  if (pinnedOnly) {
    for (const n of graph.nodes) if (pinned.has(n.node_id)) keep.add(n.node_id);
  } else {
    const ranked = [];
    for (const n of graph.nodes) {
      if (nodeType(n) === "logit") keep.add(n.node_id);
      else if ((score.get(n.node_id) ?? 0) <= nodeT + 1e-12) ranked.push(n);
    }
    ranked.sort((a, b) => (score.get(a.node_id) ?? 0) - (score.get(b.node_id) ?? 0));
    for (const n of ranked.slice(0, Math.max(0, budget))) keep.add(n.node_id);
    for (const n of graph.nodes) if (pinned.has(n.node_id)) keep.add(n.node_id);
  }
  const among = graph.links.filter((l) => keep.has(l.source) && keep.has(l.target));
  const strongestInto = new Map();
  for (const l of among) strongestInto.set(l.target, Math.max(strongestInto.get(l.target) || 0, Math.abs(l.weight)));
  const links = among.filter((l) => Math.abs(l.weight) >= minWeight * strongestInto.get(l.target) - 1e-15)
    .sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight)).slice(0, MAX_EDGES);
  return { nodes: graph.nodes.filter((n) => keep.has(n.node_id)), links };
}

/** circuit-tracer's pruning: nodes with cumulative influence <= nodeT (logits and embeddings always), then
 *  the edges carrying the top edgeT share of |weight| among them. */
export function prune(graph, nodeT, edgeT, { dropIsolated = true } = {}) {
  const score = cumulativeScores(graph);
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

/**
 * The x extent of every position: [{x (centre), w (width)}]. A position gets wider when one of its
 * (layer, position) cells holds more nodes than fit in a column of `rowsPerCell` markers.
 */
export function positionColumns(nodeLists, nPos, nLayers, rowsPerCell = 5) {
  const demand = new Array(nPos).fill(0);
  for (const nodes of nodeLists) {
    const cells = new Map();
    for (const n of nodes) {
      const key = `${layerRow(n, nLayers)}|${n.ctx_idx}`;
      cells.set(key, (cells.get(key) || 0) + 1);
    }
    for (const [key, k] of cells) {
      const p = Number(key.split("|")[1]);
      if (p >= 0 && p < nPos) demand[p] = Math.max(demand[p], k);
    }
  }
  let start = 0;
  return demand.map((k) => {
    const w = Math.max(k ? 1 : 0.7, Math.min(10, 0.5 * Math.ceil(k / rowsPerCell)));
    const col = { x: start + w / 2, w };
    start += w;
    return col;
  });
}

/**
 * x, y and marker size of every node: x in its position's column, y = layer row; nodes sharing a cell
 * are laid on a small grid inside it (most influential first), sized from the cell's pixels.
 */
export function spreadLayout(nodes, nLayers, { columns, unitPx = 40, cellH = 60, maxSize = 11 } = {}) {
  const cells = new Map();
  for (const n of nodes) {
    const key = `${layerRow(n, nLayers)}|${n.ctx_idx}`;
    (cells.get(key) || cells.set(key, []).get(key)).push(n);
  }
  const pos = new Map();
  for (const list of cells.values()) {
    list.sort((a, b) => (a.influence ?? 0) - (b.influence ?? 0) || String(a.node_id).localeCompare(String(b.node_id)));
    const col = (columns && columns[Number(list[0].ctx_idx)]) || { x: Number(list[0].ctx_idx), w: 1 };
    const cellW = col.w * unitPx;
    const k = list.length;
    const cols = Math.max(1, Math.min(k, Math.round(Math.sqrt((k * cellW) / Math.max(1, cellH)))));
    const rows = Math.ceil(k / cols);
    const size = Math.max(4, Math.min(maxSize, (0.85 * cellW) / cols - 1, (0.75 * cellH) / rows - 1));
    list.forEach((n, i) => {
      const c = i % cols, r = Math.floor(i / cols);
      const dx = cols === 1 ? 0 : col.w * (-0.42 + (0.84 * (c + 0.5)) / cols);
      const dy = rows === 1 ? 0 : 0.37 - (0.74 * (r + 0.5)) / rows;
      pos.set(n.node_id, { x: col.x + dx, y: layerRow(n, nLayers) + dy, size });
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

/** The top promoted token (else the top context's peak token) of an embedded feature record, or null. */
export function featureGist(record) {
  if (!record || typeof record !== "object") return null;
  const top = (record.top_logits || record.promoted || [])[0];
  if (top !== undefined && top !== null) return typeof top === "string" ? top : top.token ?? null;
  const ex = (record.top_contexts || [])[0];
  if (ex && Array.isArray(ex.tokens)) return ex.tokens[ex.highlight ?? 0] ?? null;
  const q = (record.examples_quantiles || [])[0];
  const e = q && (q.examples || [])[0];
  if (e && Array.isArray(e.tokens) && Array.isArray(e.tokens_acts_list)) {
    const best = e.tokens_acts_list.reduce((bi, a, i, arr) => (a > arr[bi] ? i : bi), 0);
    return e.tokens[best] ?? null;
  }
  return null;
}

/** The embedded feature record of a node, when the graph file carries feature pages. */
export function featureRecord(graph, n) {
  const feats = graph && graph.features;
  if (!feats) return null;
  return feats[n.node_id] || feats[String(n.feature)] || feats[`${n.layer}_${n.feature}`] || feats[`${n.layer}.${n.feature}`] || null;
}

/** Short label of a node: `L1 #23 "Mary"` (the feature's top token when known), `Emb "tok"`, the logit's text. */
export function nodeLabel(n, tokens, graph = null) {
  const t = nodeType(n);
  const tok = tokens && tokens[n.ctx_idx] !== undefined ? ` "${tokens[n.ctx_idx]}"` : "";
  if (t === "embedding") return `Emb${tok}`;
  if (t === "logit") return n.clerp || `logit ${n.feature}`;
  if (t === "error") return `error L${n.layer}`;
  const gist = featureGist(featureRecord(graph, n));
  return `L${n.layer} #${featureIndex(n)}${gist !== null ? ` ${JSON.stringify(gist)}` : ""}`;
}

/** A node's name with its position: `L1 #23 @9`. */
export function nodeName(n, tokens) {
  const t = nodeType(n);
  const tok = tokens && tokens[n.ctx_idx] !== undefined ? ` "${tokens[n.ctx_idx]}"` : "";
  if (t === "embedding") return `Emb${tok}`;
  if (t === "logit") return n.clerp || `logit ${n.feature}`;
  if (t === "error") return `error L${n.layer} @${n.ctx_idx}`;
  return `L${n.layer} #${featureIndex(n)} @${n.ctx_idx}`;
}

/**
 * Node statuses of graph `b` against reference `a`: {status: Map(node_id of b -> matched|gained), lost: [nodes of a]}.
 * `diff.pairs` [[a id, b id]] when the result has a matching; else nodes match by matchKey.
 */
export function diffGraphs(a, b, diff, { features = true } = {}) {
  const status = new Map();
  const aIds = new Map(a.nodes.map((n) => [n.node_id, n]));
  if (diff && Array.isArray(diff.pairs)) {
    const partnerOfB = new Map(diff.pairs.map(([x, y]) => [y, x]));
    const partnerOfA = new Map(diff.pairs.map(([x, y]) => [x, y]));
    const bIds = new Set(b.nodes.map((n) => n.node_id));
    for (const n of b.nodes) status.set(n.node_id, aIds.has(partnerOfB.get(n.node_id)) ? "matched" : "gained");
    return { status, lost: a.nodes.filter((n) => !bIds.has(partnerOfA.get(n.node_id))) };
  }
  const keyOf = (n) => matchKey(n, { features });
  const bKeys = new Set(b.nodes.map(keyOf).filter(Boolean));
  const aKeys = new Set(a.nodes.map(keyOf).filter(Boolean));
  for (const n of b.nodes) status.set(n.node_id, aKeys.has(keyOf(n)) ? "matched" : "gained");
  return { status, lost: a.nodes.filter((n) => !bKeys.has(keyOf(n))) };
}

/**
 * Counterparts of every node across roles: Map("role|node_id" -> [{role, id}]). From a circuit-diff's
 * matched_nodes when the result has them; else by matchKey (features only when `features`).
 */
export function counterparts(graphs, diff, { features = true } = {}) {
  const out = new Map();
  const add = (ra, ia, rb, ib) => {
    const k = `${ra}|${ia}`;
    (out.get(k) || out.set(k, []).get(k)).push({ role: rb, id: ib });
  };
  if (diff && Array.isArray(diff.matched_nodes) && Array.isArray(diff.roles)) {
    const [a, b] = diff.roles;
    for (const m of diff.matched_nodes) {
      add(a, m.node_id_a, b, m.node_id_b);
      add(b, m.node_id_b, a, m.node_id_a);
    }
    return out;
  }
  const roles = Object.keys(graphs);
  const byKey = new Map();
  for (const r of roles) for (const n of graphs[r].nodes) {
    const key = matchKey(n, { features });
    if (key) (byKey.get(key) || byKey.set(key, []).get(key)).push({ role: r, id: n.node_id });
  }
  for (const list of byKey.values()) for (const x of list) for (const y of list) if (x.role !== y.role) add(x.role, x.id, y.role, y.id);
  return out;
}
