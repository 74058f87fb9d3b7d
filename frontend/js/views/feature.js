// A transcoder feature's page: top activating contexts, activation histogram, promoted and
// suppressed tokens. Reads circuit-tracer's feature JSON (examples_quantiles, top_logits,
// bottom_logits, histogram, act_min/act_max) and close variants. `?match=role:layer:feature[:cos],…`
// adds the matched features of the other roles side by side (GET /features/{pair}/{role}/{layer}/{f}).

import { api, getResult, submitAnalysis } from "../api.js";
import { h, replace } from "../dom.js";
import { fmt } from "../format.js";
import { render as plot } from "../plots.js";
import { followJob } from "../progress.js";
import { navigate } from "../router.js";
import { roleLabel, sortRoles } from "../roles.js";
import { loadResult, manifestCard, notice, resultHeader, roleTitle } from "./common.js";
import { featurePageBar } from "../intervene-actions.js";

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
export function featurePage(data, { role = null, heading = null, idSuffix = "", compact = false } = {}) {
  const f = normalizeFeature(data);
  if (!f) return notice("No feature data.");
  const histEl = h("div", { class: "plot short", id: `feature-histogram${idSuffix}` });
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
  const el = h("section", { class: ["card", "feature-card"], id: `feature-page${idSuffix}`, dataset: { role: role || "" } },
    h("div", { class: "card-head" }, h("h2", {}, heading || f.title), role ? roleTitle(role) : null),
    stats.length ? h("dl", { class: "kv", style: { marginBottom: "12px" } }, stats.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, typeof v === "number" ? fmt(v, 4) : String(v))])) : null,
    h("div", { class: compact ? "feature-stack" : "grid grid-2" },
      h("div", {}, h("h3", { style: { marginBottom: "6px" } }, "Activation histogram"),
        f.hist ? histEl : h("p", { class: "muted small" }, "no histogram"),
        h("div", { class: "grid", style: { gridTemplateColumns: "1fr 1fr", marginTop: "10px" } },
          h("div", {}, h("h3", { style: { marginBottom: "6px" } }, "Promoted tokens"), list(f.promoted, "up")),
          h("div", {}, h("h3", { style: { marginBottom: "6px" } }, "Suppressed tokens"), list(f.suppressed, "down")))),
      h("div", {}, h("h3", { style: { marginBottom: "6px" } }, "Top activating contexts"),
        contexts.length ? h("div", { id: `feature-contexts${idSuffix}`, class: "feature-contexts" }, contexts) : h("p", { class: "muted small" }, "no contexts"))));
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

/** "ln_free:1:23:0.91,…" from [{role, layer, feature, cos}] (the matched features of other roles). */
export function encodeMatches(matches) {
  return (matches || []).map((m) => [m.role, m.layer, m.feature, ...(typeof m.cos === "number" ? [m.cos.toFixed(3)] : [])].join(":")).join(",");
}

/** [{role, layer, feature, cos}] from encodeMatches' form; malformed entries are skipped. */
export function decodeMatches(text) {
  return String(text || "").split(",").map((e) => e.split(":")).filter((p) => p.length >= 3 && /^\d+$/.test(p[1]) && /^\d+$/.test(p[2]))
    .map(([role, layer, feature, cos]) => ({ role, layer: Number(layer), feature: Number(feature), cos: cos === undefined ? null : Number(cos) }));
}

/**
 * Compute (or reuse) the `feature` result of one role's feature and open its page, with its matched
 * features of the other roles (`matches`) in the URL; progress goes to `box`.
 */
export async function openFeaturePage({ pair, role, layer, feature, matches = [], circuit = null, box, signal }) {
  const body = { pair: pair || undefined, roles: role && role !== "graph" ? [role] : undefined, options: { layer, feature } };
  const query = { match: encodeMatches(matches) || undefined, circuit: circuit || undefined };
  try {
    const { status, data } = await submitAnalysis("feature", body);
    if (status === 200) { navigate(["feature", data.id], query); return; }
    const job = await followJob(data.id, box, { signal });
    if (job.status === "done") navigate(["feature", job.id], query);
    else box.append(notice(job.error || job.status, { error: true }));
  } catch (e) {
    if (e.name !== "AbortError") box.append(notice(e.message, { error: true }));
  }
}

/** The feature record of a `feature` result for `role` (FeaturePage or circuit-tracer's record). */
function roleRecord(result, role) {
  const v = result && result.roles ? result.roles[role] : null;
  return v && typeof v.feature === "object" && v.feature !== null ? v.feature : v;
}

/** One matched feature's page, loaded into `slot` (GET /features/…; its job followed when queued). */
async function loadMatch(slot, pair, m, signal) {
  const heading = `Match in ${roleLabel(m.role)}: L${m.layer} #${m.feature}${typeof m.cos === "number" ? ` (decoder cos ${fmt(m.cos, 3)})` : ""}`;
  const suffix = `-${m.role}`;
  try {
    let { status, data } = await api(`/features/${encodeURIComponent(pair)}/${encodeURIComponent(m.role)}/${m.layer}/${m.feature}`,
      { signal, raw: true });
    if (status === 202) {
      const job = await followJob(data.id, slot, { signal });
      if (job.status !== "done") throw new Error(job.error || job.status);
      data = await getResult(job.id, signal);
    }
    replace(slot, featurePage(roleRecord(data.result, m.role), { role: m.role, heading, idSuffix: suffix, compact: true }),
      h("div", { class: "small" }, h("a", { href: `#/feature/${data.id}` }, "this feature's own page")));
  } catch (e) {
    if (e.name !== "AbortError") replace(slot, h("section", { class: "card", id: `feature-page${suffix}` }, h("h2", {}, heading), notice(e.message, { error: true })));
  }
}

/** #/feature/<result id>: a stored `feature` result (one record, or one per role), and its matches. */
export async function render({ root, route, signal }) {
  const id = route.parts[0];
  if (!id) {
    replace(root, notice("Feature pages open from a node of an attribution graph (", { children: [h("a", { href: "#/circuit" }, "Circuits"), ")."] }));
    return;
  }
  const out = await loadResult(root, id, signal);
  if (!out) return;
  const r = out.result;
  const matches = decodeMatches(route.query.match);
  const compact = matches.length > 0 || (r.roles && Object.keys(r.roles).length > 1);
  let pages = [];
  let shownRoles = [];
  if (route.query.node && (r.features || (r.roles && Object.values(r.roles).some((g) => g && g.features)))) {
    const feats = r.features || (r.roles[route.query.role] || {}).features || {};
    const d = feats[route.query.node];
    if (d) pages.push(featurePage(d, { role: route.query.role }));
  } else if (r.roles && typeof r.roles === "object" && !r.examples_quantiles) {
    shownRoles = sortRoles(r.roles);
    pages = shownRoles.map((role, i) => featurePage(roleRecord(r, role), { role, idSuffix: i ? `-${role}` : "", compact }));
  } else {
    pages.push(featurePage(r.feature || r));
  }
  const slots = matches.filter((m) => !shownRoles.includes(m.role) || shownRoles.length === 0).map((m) =>
    h("div", { class: "feature-match", dataset: { role: m.role } }, h("section", { class: "card", id: `feature-page-${m.role}` },
      h("h2", {}, `Match in ${roleLabel(m.role)}: L${m.layer} #${m.feature}`), h("p", { class: "muted small" }, "Loading…"))));
  const back = route.query.circuit ? h("a", { class: "btn small", id: "feature-back", href: `#/circuit/${encodeURIComponent(route.query.circuit)}` }, "Back to the circuit") : null;
  const note = !matches.length && shownRoles.length === 1
    ? h("p", { class: "muted small", id: "feature-no-match" }, "Open this feature from a circuit diff's feature lists to see its decoder-cosine match in the other role beside it.")
    : null;
  const all = [...pages, ...slots];
  replace(root, resultHeader(out, { title: "Feature", sub: "What a transcoder feature responds to and what it writes.", extra: back ? [back] : [] }),
    note,
    all.length ? h("div", { class: ["feature-across", `feature-across-${Math.min(3, all.length)}`], id: "feature-across" }, all)
      : notice("This result has no feature data."),
    out.kind === "feature" ? featurePageBar({ out, record: shownRoles.length ? roleRecord(r, shownRoles[0]) : r.feature || r, matches, circuit: route.query.circuit, signal }) : null,
    manifestCard(out));
  for (const [i, m] of matches.filter((x) => !shownRoles.includes(x.role) || shownRoles.length === 0).entries()) loadMatch(slots[i], out.pair, m, signal);
}
