// The numbers beside the circuit graphs: per-role scores, the diff summary, matched / gained / lost
// feature tables (hover marks the nodes, "open" shows the feature with its match), edge-weight
// changes and the top paths. All read from the stored result's JSON.

import { h } from "../dom.js";
import { fmt, fmtSigned } from "../format.js";
import { roleColor, roleLabel } from "../roles.js";

const roleDot = (role) => h("span", { class: "circuit-dot", style: { background: roleColor(role) } });

/** Replacement / completeness scores and sizes per role (from summaries, diff scores or graph metadata). */
export function scoresTable(result, graphs, roles, drawn) {
  const fromDiff = new Map(((result && result.diff && result.diff.scores) || []).map((s) => [s.role, s]));
  const rows = roles.map((role) => {
    const s = (result && result.roles && result.roles[role] && result.roles[role].summary) || fromDiff.get(role) || {};
    const meta = graphs[role].metadata || {};
    const d = drawn.get(role) || { nodes: 0, links: 0 };
    return h("tr", { dataset: { role } },
      h("td", {}, roleDot(role), roleLabel(role)),
      h("td", { class: "num" }, fmt(s.replacement_score ?? meta.replacement_score, 3)),
      h("td", { class: "num" }, fmt(s.completeness_score ?? meta.completeness_score, 3)),
      h("td", { class: "num" }, fmt(s.n_active_features ?? null, 4)),
      h("td", { class: "num" }, `${graphs[role].nodes.length} / ${graphs[role].links.length}`),
      h("td", { class: "num" }, `${d.nodes} / ${d.links}`));
  });
  return h("table", { class: "data compact", id: "circuit-scores" },
    h("thead", {}, h("tr", {}, h("th", {}, "role"), h("th", { class: "num", title: "share of the logits' input explained by features (not error nodes)" }, "replacement"),
      h("th", { class: "num", title: "share of every node's input explained by features" }, "completeness"),
      h("th", { class: "num" }, "active features"), h("th", { class: "num" }, "stored nodes / edges"), h("th", { class: "num" }, "drawn nodes / edges"))),
    h("tbody", {}, rows));
}

/** The diff's headline: node Jaccard, matched / only-a / only-b counts, edges compared, matching per layer. */
export function diffSummary(diff) {
  const [a, b] = diff.roles;
  const both = diff.matched_nodes.filter((m) => m.in_pruned_a && m.in_pruned_b).length;
  const item = (k, v, id) => [h("dt", {}, k), h("dd", { id }, v)];
  return h("div", { id: "circuit-diff-summary" },
    h("dl", { class: "kv" },
      item("node Jaccard", fmt(diff.node_jaccard, 3), "circuit-jaccard"),
      item("matched in both", String(both)),
      item(`only in ${roleLabel(a)} (lost)`, String(diff.only_a.length)),
      item(`only in ${roleLabel(b)} (gained)`, String(diff.only_b.length)),
      item("edges compared", String(diff.n_edges_compared)),
      item("thresholds", `node ${diff.node_threshold} · edge ${diff.edge_threshold}`)),
    diff.matching && diff.matching.length ? h("table", { class: "data compact", style: { marginTop: "8px" } },
      h("thead", {}, h("tr", {}, h("th", {}, "layer"), h("th", { class: "num" }, "features matched"), h("th", { class: "num" }, "mean decoder cos"), h("th", {}, "method"))),
      h("tbody", {}, diff.matching.map((m) => h("tr", {}, h("td", {}, `L${m.layer}`), h("td", { class: "num" }, `${m.matched} / ${m.n_a}`),
        h("td", { class: "num" }, fmt(m.mean_cos, 3)), h("td", {}, m.method || ""))))) : null);
}

/**
 * Matched, gained and lost feature tables of a circuit-diff. `on.hover([{role, id}] | null)` marks nodes,
 * `on.select(role, id)` selects one, `on.open({role, layer, feature, matches})` opens its feature page.
 */
export function featureLists(diff, tokens, on) {
  const [a, b] = diff.roles;
  const tok = (pos) => (tokens && tokens[pos] !== undefined ? JSON.stringify(tokens[pos]) : "");
  const openBtn = (label, spec) => h("button", { type: "button", class: "small circuit-open", onclick: (ev) => { ev.stopPropagation(); on.open(spec); } }, label);
  const hoverable = (tr, marks, role, id) => {
    tr.addEventListener("mouseenter", () => on.hover(marks));
    tr.addEventListener("mouseleave", () => on.hover(null));
    tr.addEventListener("click", () => on.select(role, id));
    return tr;
  };
  const matched = diff.matched_nodes.filter((m) => m.kind === "feature")
    .sort((x, y) => (y.influence_a + y.influence_b) - (x.influence_a + x.influence_b));
  const matchedRows = matched.map((m) => {
    const specA = { role: a, layer: m.layer, feature: m.feature_a, matches: [{ role: b, layer: m.layer, feature: m.feature_b, cos: m.decoder_cos }] };
    const specB = { role: b, layer: m.layer, feature: m.feature_b, matches: [{ role: a, layer: m.layer, feature: m.feature_a, cos: m.decoder_cos }] };
    return hoverable(h("tr", { class: "clickable", dataset: { nodeA: m.node_id_a, nodeB: m.node_id_b } },
      h("td", {}, `L${m.layer}`), h("td", { class: "mono" }, `${m.pos} ${tok(m.pos)}`),
      h("td", { class: "num" }, `#${m.feature_a}`), h("td", { class: "num" }, `#${m.feature_b}`), h("td", { class: "num" }, fmt(m.decoder_cos, 3)),
      h("td", { class: "num" }, `${fmt(m.influence_a, 3)} → ${fmt(m.influence_b, 3)}`),
      h("td", { class: "num" }, `${fmt(m.activation_a, 3)} → ${fmt(m.activation_b, 3)}`),
      h("td", { class: "nowrap" }, openBtn(roleLabel(a), specA), " ", openBtn(roleLabel(b), specB))),
    [{ role: a, id: m.node_id_a }, { role: b, id: m.node_id_b }], b, m.node_id_b);
  });
  // a node only in one graph may still have a matched feature (pruned in the other): link it when known
  const partner = new Map(diff.matched_nodes.filter((m) => m.kind === "feature").flatMap((m) => [
    [`${a}|${m.node_id_a}`, { role: b, id: m.node_id_b, layer: m.layer, feature: m.feature_b, cos: m.decoder_cos }],
    [`${b}|${m.node_id_b}`, { role: a, id: m.node_id_a, layer: m.layer, feature: m.feature_a, cos: m.decoder_cos }]]));
  const onlyRows = (list, role) => list.filter((n) => n.kind === "feature").sort((x, y) => y.influence - x.influence).map((n) => {
    const p = partner.get(`${role}|${n.node_id}`);
    return hoverable(h("tr", { class: "clickable", dataset: { node: n.node_id } },
      h("td", {}, `L${n.layer}`), h("td", { class: "mono" }, `${n.pos} ${tok(n.pos)}`), h("td", { class: "num" }, `#${n.feature}`),
      h("td", { class: "num" }, fmt(n.influence, 3)), h("td", { class: "num" }, fmt(n.activation, 3)),
      h("td", { class: "small muted" }, n.reason || ""),
      h("td", {}, openBtn("open", { role, layer: n.layer, feature: n.feature, matches: p ? [p] : [] }))),
    [{ role, id: n.node_id }, ...(p ? [{ role: p.role, id: p.id }] : [])], role, n.node_id);
  });
  const table = (id, head, rows, empty) => h("div", { class: "circuit-table-wrap" }, rows.length
    ? h("table", { class: "data compact", id }, h("thead", {}, h("tr", {}, head.map((c) => h("th", { class: c.startsWith("#") ? "num" : "" }, c.replace(/^#/, ""))))), h("tbody", {}, rows))
    : h("p", { class: "muted small", id }, empty));
  const onlyHead = ["layer", "position", "#feature", "#influence", "#activation", "why", "feature page"];
  return h("div", { class: "circuit-lists" },
    h("div", {}, h("h3", {}, `Matched features (${matchedRows.length})`),
      h("p", { class: "small muted" }, `Decoder-cosine matches active in both graphs; influence and activation ${roleLabel(a)} → ${roleLabel(b)}.`),
      table("circuit-matched", ["layer", "position", `#${roleLabel(a)}`, `#${roleLabel(b)}`, "#cos", "#influence", "#activation", "feature pages"], matchedRows, "no matched features")),
    h("div", { class: "circuit-lists-pair" },
      h("div", {}, h("h3", {}, `Gained: only in ${roleLabel(b)} (${onlyRows(diff.only_b, b).length})`), table("circuit-gained", onlyHead, onlyRows(diff.only_b, b), "none")),
      h("div", {}, h("h3", {}, `Lost: only in ${roleLabel(a)} (${onlyRows(diff.only_a, a).length})`), table("circuit-lost", onlyHead, onlyRows(diff.only_a, a), "none"))));
}

/** The largest edge-weight changes between matched edges. */
export function edgeChanges(diff, name, k = 12) {
  const [a, b] = diff.roles;
  const edges = (diff.edges || []).slice(0, k);
  if (!edges.length) return h("p", { class: "muted small", id: "circuit-edge-changes" }, "no matched edges");
  return h("table", { class: "data compact", id: "circuit-edge-changes" },
    h("thead", {}, h("tr", {}, h("th", {}, "source → target"), h("th", { class: "num" }, roleLabel(a)), h("th", { class: "num" }, roleLabel(b)), h("th", { class: "num" }, "change"))),
    h("tbody", {}, edges.map((e) => h("tr", {}, h("td", {}, `${name(a, e.source_a)} → ${name(a, e.target_a)}`),
      h("td", { class: "num" }, fmt(e.weight_a, 3)), h("td", { class: "num" }, fmt(e.weight_b, 3)),
      h("td", { class: ["num", e.delta >= 0 ? "pos" : "neg"] }, fmtSigned(e.delta, 3))))));
}

/** Each role's strongest embedding-to-target paths (CircuitRole.top_paths). */
export function topPaths(result, roles) {
  const blocks = roles.map((role) => {
    const paths = (result && result.roles && result.roles[role] && result.roles[role].top_paths) || [];
    return h("div", { class: "circuit-paths", id: `circuit-paths-${role}` }, h("h3", {}, roleDot(role), `Top paths · ${roleLabel(role)}`),
      paths.length ? h("ol", {}, paths.map((p) => h("li", {}, h("span", { class: "mono small" }, p.nodes.map((s) => s.label || s.node_id).join(" → ")),
        h("span", { class: "muted small" }, ` score ${fmt(p.score, 3)}`)))) : h("p", { class: "muted small" }, "none stored"));
  });
  return h("div", { class: "circuit-paths-grid" }, blocks);
}
