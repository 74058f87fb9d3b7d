// Pieces every result view shares: loading a stored result (following its job if needed),
// the page header with the inputs and the manifest, role titles.

import { API, getResult } from "../api.js";
import { h, replace } from "../dom.js";
import { fmtDuration, optionsDigest, truncate } from "../format.js";
import { followJob } from "../progress.js";
import { parseHash } from "../router.js";
import { roleColor, roleLabel } from "../roles.js";

export const KIND_TITLE = {
  dla: "Direct logit attribution",
  "ln-stats": "LayerNorm statistics",
  loss: "Cross-entropy of the trio",
  "confidence-neurons": "Confidence neurons",
  "attribution-patching": "Attribution patching (AtP, AtP*)",
  "activation-patching": "Activation patching",
  "patching-fidelity": "Patching fidelity: AtP vs activation patching",
  circuit: "Attribution graph",
  "circuit-diff": "Circuit diff",
  feature: "Feature",
  intervene: "Intervention: ablate and steer",
};

export function kindTitle(kind) {
  return KIND_TITLE[kind] || kind;
}

/** A loading line for a view. */
export function loading(text = "Loading…") {
  return h("p", { class: "muted loading-line" }, text);
}

export function notice(text, { error = false, children = [] } = {}) {
  return h("div", { class: ["notice", error && "error"] }, text, ...children);
}

/**
 * GET /results/{id}; while its job is still queued or running, show its progress in `root`
 * and wait. Returns the ResultOut (status done) or null after rendering why there is none.
 */
export async function loadResult(root, id, signal) {
  let out = await getResult(id, signal);
  if (out.status === "queued" || out.status === "running") {
    replace(root, h("div", { class: "card" }, h("h2", {}, `${kindTitle(out.kind)}: running`),
      h("p", { class: "muted small" }, "This result is still being computed. The page fills in when the job finishes.")));
    const job = await followJob(id, root.firstChild, { signal });
    if (job.status !== "done") {
      replace(root, jobFailure(job));
      return null;
    }
    out = await getResult(id, signal);
  }
  if (out.status !== "done" || !out.result) {
    replace(root, jobFailure(out));
    return null;
  }
  return out;
}

export function jobFailure(job) {
  return h("div", { class: "card" },
    h("h2", {}, `${kindTitle(job.kind)}: ${job.status}`),
    notice(job.error ? job.error : `the job is ${job.status}`, { error: job.status === "failed" }),
    h("p", { class: "small" }, h("a", { href: "#/" }, "← back to the analyses"), " · ",
      h("a", { href: `#/history?kind=${encodeURIComponent(job.kind || "")}` }, "history")));
}

/** One line saying what was analysed: prompts, task or text. */
export function inputsSummary(inputs = {}) {
  const parts = [];
  if (inputs.task) {
    const t = inputs.task;
    if (t.name === "custom") parts.push(h("span", {}, h("b", {}, "task "), `custom (${(t.pairs || []).length} pairs)`));
    else parts.push(h("span", {}, h("b", {}, "task "), `${t.name}, ${t.n_prompts} prompts, seed ${t.seed}, ${t.split}`));
  }
  if (inputs.prompts) parts.push(h("span", {}, h("b", {}, "prompts "), String(inputs.prompts.length)));
  if (inputs.text) parts.push(h("span", {}, h("b", {}, "text "), `${inputs.text.length} × custom`));
  if (!inputs.task && !inputs.prompts && !inputs.text) parts.push(h("span", {}, h("b", {}, "input "), "the pair's default"));
  return parts;
}

/** Plain-text digest of a result's inputs for lists: what ran on what, which roles, which options. */
export function inputsDigest(inputs = {}) {
  const t = inputs.task;
  const what = t ? (t.name === "custom" ? `custom task, ${(t.pairs || []).length} pairs: "${truncate((t.pairs || [])[0] ? t.pairs[0].clean : "", 40, { tail: true })}"`
    : `${t.name} task, ${t.n_prompts ?? "?"} prompts, seed ${t.seed ?? 0}`)
    : inputs.prompts && inputs.prompts.length ? `${inputs.prompts.length} prompt${inputs.prompts.length === 1 ? "" : "s"}: "${truncate(inputs.prompts[0], 40, { tail: true })}"`
      : inputs.text ? `${inputs.text.length} custom text${inputs.text.length === 1 ? "" : "s"}` : "the pair's default text";
  return { what, roles: inputs.roles || [], options: optionsDigest(inputs.options || {}) };
}

const CACHED_KEY = "lnscope.cached.";

/** Remember that the POST for result `id` answered from the cache (cached: true), for its page's badge. */
export function markCached(id) {
  try { sessionStorage.setItem(CACHED_KEY + id, "1"); } catch { /* storage disabled */ }
}

/** Whether this result page shows a result the server returned from its cache. */
export function openedFromCache(out) {
  if (out.cached || parseHash().query.cached === "1") return true;
  try { return sessionStorage.getItem(CACHED_KEY + out.id) === "1"; } catch { return false; }
}

function targetSummary(inputs) {
  const t = inputs.options && inputs.options.target;
  if (!t) return null;
  const tok = (s) => JSON.stringify(s);
  return h("span", {}, h("b", {}, "target "), t.kind === "logit_diff" ? `logit(${tok(t.token)}) − logit(${tok(t.other)})` : `logit(${tok(t.token)})`);
}

/** The page header of a result: title, what was run on what, links. */
export function resultHeader(out, { title, sub, extra = [] } = {}) {
  const inputs = out.inputs || {};
  const roles = inputs.roles || [];
  const total = out.timings ? (out.timings.run_s ?? null) : null;
  const raw = h("a", { class: "btn small", href: `${API}/results/${encodeURIComponent(out.id)}`, target: "_blank", rel: "noopener" }, "JSON");
  const copy = h("button", {
    type: "button", class: "small", title: "copy this view's URL",
    onclick: async () => {
      try { await navigator.clipboard.writeText(location.href); copy.textContent = "Copied"; } catch { copy.textContent = location.href; }
      setTimeout(() => { copy.textContent = "Copy link"; }, 1500);
    },
  }, "Copy link");
  return h("div", { class: "page-head" },
    h("div", {},
      h("h1", {}, title || kindTitle(out.kind)),
      sub ? h("div", { class: "sub" }, sub) : null,
      h("div", { class: "meta-line" },
        h("span", {}, h("b", {}, "pair "), out.pair),
        h("span", { class: "role-badges" }, roles.map((r) => roleBadge(r))),
        inputsSummary(inputs), targetSummary(inputs),
        total !== null ? h("span", { title: `result ${out.id}` }, h("b", {}, "computed in "), fmtDuration(total)) : null,
        openedFromCache(out) ? h("span", { class: "badge cached", id: "cached-badge", title: "an identical earlier request's stored result: nothing was recomputed" }, "cached") : null,
        ...extra),
      inputs.prompts && inputs.prompts.length ? h("ol", { class: "prompt-list" }, inputs.prompts.slice(0, 20).map((p) => h("li", {}, p))) : null,
      inputs.options && Object.keys(inputs.options).length ? h("div", { class: "options-digest small muted mono", title: JSON.stringify(inputs.options, null, 1) }, optionsDigest(inputs.options, 160)) : null),
    h("div", { class: "actions" }, copy, raw,
      h("a", { class: "btn small", href: `#/history?pair=${encodeURIComponent(out.pair)}&kind=${encodeURIComponent(out.kind)}` }, "History")));
}

export function roleBadge(role) {
  return h("span", { class: "role-badge", style: { color: roleColor(role), marginRight: "8px" } },
    h("span", { class: "swatch", style: { background: roleColor(role) } }), roleLabel(role));
}

export function roleTitle(role, extra) {
  return h("div", { class: "role-title", dataset: { role } },
    h("span", { class: "swatch", style: { background: roleColor(role) } }), roleLabel(role), extra ? h("span", { class: "muted small" }, extra) : null);
}

/** The manifest (model sources, weight processing, LN treatment, dtype, versions) folded away. */
export function manifestCard(out) {
  const m = out.manifest;
  if (!m) return null;
  const rows = [];
  for (const [role, r] of Object.entries(m.roles || {})) {
    const src = r.source || {};
    rows.push(h("tr", {},
      h("td", {}, roleBadge(role)),
      h("td", { class: "mono" }, src.hub_id ? `${src.hub_id}${src.revision ? "@" + src.revision : ""}` : src.path || "–"),
      h("td", {}, r.ln_treatment || "–"),
      h("td", {}, r.dtype || "–"),
      h("td", {}, r.device || "–")));
  }
  return h("details", { class: "manifest card" },
    h("summary", {}, "Reproducibility manifest (models, LN treatment, dtype, seed, versions)"),
    rows.length ? h("div", { class: "table-wrap", style: { marginTop: "10px" } }, h("table", { class: "data" },
      h("thead", {}, h("tr", {}, ["role", "source", "LN", "dtype", "device"].map((x) => h("th", {}, x)))),
      h("tbody", {}, rows))) : null,
    h("pre", {}, JSON.stringify(m, null, 2)));
}
