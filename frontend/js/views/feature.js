// A transcoder feature's page: top activating contexts, activation histogram, promoted and
// suppressed tokens. Reads circuit-tracer's feature JSON (examples_quantiles, top_logits,
// bottom_logits, histogram, act_min/act_max) and close variants.

import { h, replace } from "../dom.js";
import { fmt } from "../format.js";
import { render as plot } from "../plots.js";
import { sortRoles } from "../roles.js";
import { loadResult, manifestCard, notice, resultHeader, roleTitle } from "./common.js";

function tokenLabel(t) {
  if (t === null || t === undefined) return "";
  if (typeof t === "string") return t;
  return t.token ?? t.text ?? t.str ?? String(t.id ?? "");
}

function tokenValue(t) {
  if (!t || typeof t !== "object") return null;
  return t.value ?? t.logit ?? t.weight ?? t.score ?? null;
}

/** Normalise the variants of a feature record into {title, contexts, hist, promoted, suppressed, stats}. */
export function normalizeFeature(d) {
  if (!d || typeof d !== "object") return null;
  const contexts = [];
  if (Array.isArray(d.examples_quantiles)) {
    for (const q of d.examples_quantiles) {
      for (const ex of q.examples || []) contexts.push({ group: q.quantile_name, tokens: ex.tokens || [], acts: ex.tokens_acts_list || ex.acts || [] });
    }
  }
  for (const key of ["top_contexts", "contexts", "examples", "top_examples"]) {
    if (Array.isArray(d[key])) {
      for (const ex of d[key]) contexts.push({
        group: ex.group || ex.quantile || null,
        tokens: ex.tokens || ex.str_tokens || [], acts: ex.acts || ex.activations || ex.tokens_acts_list || ex.values || [],
      });
    }
  }
  let hist = null;
  const hd = d.histogram || d.activation_histogram || d.hist;
  if (Array.isArray(hd) && hd.length) {
    const lo = d.act_min ?? 0, hi = d.act_max ?? hd.length;
    const w = (hi - lo) / hd.length;
    hist = { x: hd.map((_, i) => lo + (i + 0.5) * w), y: hd, width: w };
  } else if (hd && typeof hd === "object") {
    const counts = hd.counts || hd.heights || hd.y || [];
    const edges = hd.edges || hd.bin_edges || hd.bins || null;
    if (counts.length) {
      const x = edges && edges.length === counts.length + 1 ? counts.map((_, i) => (edges[i] + edges[i + 1]) / 2) : hd.x || counts.map((_, i) => i);
      hist = { x, y: counts, width: edges && edges.length > 1 ? edges[1] - edges[0] : undefined };
    }
  }
  const promoted = (d.top_logits || d.promoted || d.promoted_tokens || d.top_tokens || []).map((t) => ({ token: tokenLabel(t), value: tokenValue(t) }));
  const suppressed = (d.bottom_logits || d.suppressed || d.suppressed_tokens || d.bottom_tokens || []).map((t) => ({ token: tokenLabel(t), value: tokenValue(t) }));
  const layer = d.layer ?? null;
  const index = d.index ?? d.feature ?? d.feature_index ?? null;
  const title = d.title || (layer !== null && index !== null ? `Feature L${layer} #${index}` : index !== null ? `Feature #${index}` : "Feature");
  return {
    title, contexts, hist, promoted, suppressed,
    stats: {
      "activation frequency": d.activation_frequency ?? d.firing_rate ?? d.frequency ?? d.density ?? null,
      "mean activation when active": d.mean_activation_when_active ?? null,
      "tokens indexed": d.n_tokens_indexed ?? null,
      "max activation": d.act_max ?? d.max_activation ?? null,
      transcoder: d.transcoder_id ?? d.transcoder ?? null,
      description: d.clerp ?? d.description ?? d.label ?? null,
    },
  };
}

/** The feature page as an element (used by #/feature/<id> and inline on the circuit view). */
export function featurePage(data, { role = null, heading = null } = {}) {
  const f = normalizeFeature(data);
  if (!f) return notice("No feature data.");
  const histEl = h("div", { class: "plot short", id: "feature-histogram" });
  const maxAct = Math.max(1e-9, ...f.contexts.flatMap((c) => c.acts.filter((a) => typeof a === "number")));
  const contexts = f.contexts.slice(0, 24).map((c) => {
    const best = c.acts.reduce((bi, a, i, arr) => (a > arr[bi] ? i : bi), 0);
    return h("div", { class: "context" }, c.group ? h("span", { class: "badge", style: { marginRight: "6px" } }, c.group) : null,
      c.tokens.map((t, i) => {
        const a = c.acts[i] || 0;
        const alpha = Math.max(0, Math.min(1, a / maxAct));
        return h("span", { class: ["t", i === best && a > 0 && "max"], title: `activation ${fmt(a, 3)}`,
          style: { background: a > 0 ? `rgba(232, 89, 12, ${(0.08 + 0.72 * alpha).toFixed(3)})` : "transparent" } }, tokenLabel(t));
      }));
  });
  const list = (items, cls) => (items.length ? h("ul", { class: ["logit-list", cls] },
    items.slice(0, 15).map((t) => h("li", {}, h("span", {}, JSON.stringify(t.token)), h("span", { class: "muted" }, t.value === null ? "" : fmt(t.value, 3)))))
    : h("p", { class: "muted small" }, "none reported"));
  const stats = Object.entries(f.stats).filter(([, v]) => v !== null && v !== undefined && v !== "");
  const el = h("section", { class: "card", id: "feature-page" },
    h("div", { class: "card-head" }, h("h2", {}, heading || f.title), role ? roleTitle(role) : null),
    stats.length ? h("dl", { class: "kv", style: { marginBottom: "12px" } }, stats.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, typeof v === "number" ? fmt(v, 4) : String(v))])) : null,
    h("div", { class: "grid grid-2" },
      h("div", {}, h("h3", { style: { marginBottom: "6px" } }, "Activation histogram"),
        f.hist ? histEl : h("p", { class: "muted small" }, "no histogram"),
        h("div", { class: "grid", style: { gridTemplateColumns: "1fr 1fr", marginTop: "10px" } },
          h("div", {}, h("h3", { style: { marginBottom: "6px" } }, "Promoted tokens"), list(f.promoted, "up")),
          h("div", {}, h("h3", { style: { marginBottom: "6px" } }, "Suppressed tokens"), list(f.suppressed, "down")))),
      h("div", {}, h("h3", { style: { marginBottom: "6px" } }, "Top activating contexts"),
        contexts.length ? h("div", { id: "feature-contexts" }, contexts) : h("p", { class: "muted small" }, "no contexts"))));
  if (f.hist) {
    // drawn once the element is in the page
    requestAnimationFrame(() => plot(histEl, [{
      type: "bar", x: f.hist.x, y: f.hist.y, width: f.hist.width, marker: { color: "#e8590c", line: { width: 0 } },
      hovertemplate: "activation %{x:.3g}<br>count %{y}<extra></extra>",
    }], { height: 240, margin: { t: 12, l: 50 }, bargap: 0.02,
      xaxis: { title: { text: "activation" }, gridcolor: "#f1f3f5" }, yaxis: { title: { text: "count" }, type: Math.max(...f.hist.y) > 50 * Math.max(1, Math.min(...f.hist.y.filter((v) => v > 0))) ? "log" : "linear", gridcolor: "#eef0f4" } }));
  }
  return el;
}

/** #/feature/<result id>: a stored `feature` result (one record, or one per role). */
export async function render({ root, route, signal }) {
  const id = route.parts[0];
  if (!id) {
    replace(root, notice("Feature pages open from a node of an attribution graph (", { children: [h("a", { href: "#/circuit" }, "Circuits"), ")."] }));
    return;
  }
  const out = await loadResult(root, id, signal);
  if (!out) return;
  const r = out.result;
  let pages = [];
  if (route.query.node && (r.features || (r.roles && Object.values(r.roles).some((g) => g && g.features)))) {
    const feats = r.features || (r.roles[route.query.role] || {}).features || {};
    const d = feats[route.query.node];
    if (d) pages.push(featurePage(d, { role: route.query.role }));
  } else if (r.roles && typeof r.roles === "object" && !r.examples_quantiles) {
    const record = (v) => (v && typeof v.feature === "object" && v.feature !== null ? v.feature : v);
    pages = sortRoles(r.roles).map((role) => featurePage(record(r.roles[role]), { role }));
  } else {
    pages.push(featurePage(r.feature || r));
  }
  replace(root, resultHeader(out, { title: "Feature", sub: "What a transcoder feature responds to and what it writes." }),
    ...(pages.length ? pages : [notice("This result has no feature data.")]), manifestCard(out));
}
