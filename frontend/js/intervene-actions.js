// "ablate" / "steer" launchers: a component picked in a stored result (a DLA head, a patching cell, a
// circuit node, a feature page) is edited by the `intervene` kind on every role of the same inputs, and
// the page opens the intervention's result (#/intervene/<id>), following its job when it is queued.

import { ApiError, api, getResult, submitAnalysis } from "./api.js";
import { h, replace } from "./dom.js";
import { followJob } from "./progress.js";
import { navigate } from "./router.js";
import { ROLE_ORDER } from "./roles.js";

export const ALPHA_MIN = -20;
export const ALPHA_MAX = 20;
const CONTINUATION_TOKENS = 8;
const TOP_K = 10;
const lastAlpha = new Map(); // bar id -> the strength last set there: a panel re-rendered keeps it

/** Which ablations a component kind takes (mean / resample where the edit has a `how`), and whether it has a direction to steer. */
const KINDS = {
  head: { hows: ["zero", "mean", "resample"], steer: false },
  neuron: { hows: ["zero", "mean", "resample"], steer: true },
  mlp: { hows: ["zero", "mean", "resample"], steer: false },
  resid: { hows: ["zero", "mean", "resample"], steer: false },
  feature: { hows: ["zero"], steer: true },
};

/** "L1H2", "L0N5", "L1 MLP", "L0 resid_pre", "L1F7" of a component {kind, layer, index}. */
export function componentLabel(c) {
  if (!c) return "";
  if (c.kind === "head") return `L${c.layer}H${c.index}`;
  if (c.kind === "neuron") return `L${c.layer}N${c.index}`;
  if (c.kind === "mlp") return `L${c.layer} MLP`;
  if (c.kind === "resid") return `L${c.layer} resid_pre`;
  return `L${c.layer}F${c.index}`;
}

/** The one edit of an action: "ablate" (how) or "steer" (alpha along the neuron's W_out row or the feature's decoder row). */
export function editOf(c, action, { how = "zero", alpha = 0, positions = "all" } = {}) {
  if (action === "steer") {
    const direction = c.kind === "neuron" ? { neuron: [c.layer, c.index] } : { feature: [c.layer, c.index] };
    // both write into the residual stream leaving their block
    return { type: "steer", layer: c.layer, alpha, direction, site: "resid_post", positions };
  }
  if (c.kind === "head") return { type: "ablate_head", layer: c.layer, head: c.index, how, positions };
  if (c.kind === "neuron") return { type: "ablate_neuron", layer: c.layer, neuron: c.index, how, positions };
  if (c.kind === "mlp") return { type: "ablate_mlp", layer: c.layer, how, positions };
  if (c.kind === "resid") return { type: "ablate_resid", layer: c.layer, how, positions };
  return { type: "feature", layer: c.layer, feature: c.index, set: 0, positions };
}

/** The inputs of a stored result an intervention reuses: pair, roles, prompts or task, and its target. */
export function baseOf(out) {
  const inputs = out.inputs || {};
  const base = { pair: out.pair };
  if (Array.isArray(inputs.roles) && inputs.roles.length) base.roles = [...inputs.roles];
  if (inputs.task) base.task = inputs.task;
  else if (Array.isArray(inputs.prompts) && inputs.prompts.length) base.prompts = [...inputs.prompts];
  const t = inputs.options && inputs.options.target;
  if (t && (t.kind === "logit" || t.kind === "logit_diff")) base.target = t;
  return base;
}

/**
 * The roles to run a transcoder feature of `role` on: the lead role (the first requested in ROLE_ORDER)
 * reads the feature index, the others edit their decoder-cosine match. So the feature's role leads: roles
 * ranked before it are dropped unless `matches` names their own matched feature (then that one leads).
 * Returns {roles, component} (the component re-indexed to the lead's feature where a match leads).
 */
export function featureRoles(allRoles, role, component, matches = []) {
  const rank = (r) => (ROLE_ORDER.indexOf(r) < 0 ? 99 : ROLE_ORDER.indexOf(r));
  const ordered = [...allRoles].sort((a, b) => rank(a) - rank(b));
  if (!role || !ordered.includes(role)) return { roles: ordered, component };
  const first = ordered[0];
  const m = matches.find((x) => x.role === first && Number.isFinite(x.layer) && Number.isFinite(x.feature));
  if (first !== role && m && m.layer === component.layer) return { roles: ordered, component: { ...component, index: m.feature } };
  return { roles: ordered.filter((r) => rank(r) >= rank(role)), component };
}

/** POST the intervention and open its result; progress and errors go to `box`. */
export async function launch(body, box, { signal } = {}) {
  replace(box);
  try {
    const { status, data } = await submitAnalysis("intervene", body);
    if (status === 200) { navigate(["intervene", data.id], data.cached ? { cached: 1 } : undefined); return; }
    const job = await followJob(data.id, box, { signal, title: "intervention" });
    if (job.status === "done") navigate(["intervene", job.id]);
    else box.append(h("div", { class: "card-error intervene-error", role: "alert" }, `${job.status}: ${job.error || "no result"}`));
  } catch (e) {
    if (e.name === "AbortError") return;
    const msg = e instanceof ApiError && e.fields.length ? e.fields.map((f) => (f.path ? `${f.path}: ${f.msg}` : f.msg)).join("; ") : e.message;
    box.append(h("div", { class: "card-error intervene-error", role: "alert" }, msg));
  }
}

/**
 * The action bar: the picked component, ablate (zero / mean / resample where it applies) and steer
 * (an alpha slider, for neuron and feature directions), the positions, a prompt or target field when
 * the stored inputs lack one. `base` from baseOf(); `component` {kind, layer, index, position?, roles?}.
 * Returns {el, set(component)}; `id` names the bar (ids of its controls derive from it).
 */
export function interventionBar({ id, base, component = null, hint = "Pick a component to ablate or steer it.", askPrompt = false, signal }) {
  let comp = component;
  const what = h("span", { class: "intervene-what mono", id: `${id}-what` });
  const howSel = h("select", { class: "intervene-how", id: `${id}-how`, "aria-label": "ablation" });
  const posSel = h("select", { class: "intervene-positions", id: `${id}-positions`, "aria-label": "positions" });
  const alpha = h("input", { type: "range", class: "intervene-alpha", id: `${id}-alpha`, min: ALPHA_MIN, max: ALPHA_MAX, step: 0.5, value: lastAlpha.get(id) ?? 5, "aria-label": "steering strength alpha" });
  const alphaOut = h("output", { class: "intervene-alpha-value mono", for: `${id}-alpha` }, alpha.value);
  alpha.addEventListener("input", () => { alphaOut.textContent = alpha.value; lastAlpha.set(id, alpha.value); });
  const ablateBtn = h("button", { type: "button", class: "small primary intervene-ablate", id: `${id}-ablate`, onclick: () => go("ablate") }, "Ablate");
  const steerBtn = h("button", { type: "button", class: "small intervene-steer", id: `${id}-steer`, onclick: () => go("steer") }, "Steer");
  const steerBox = h("span", { class: "intervene-steer-box" }, h("span", { class: "label" }, "α"), alpha, alphaOut, steerBtn);
  // a feature page stores no prompt; prompts without a stored target need one to measure
  const promptIn = askPrompt ? h("input", { type: "text", class: "intervene-prompt", id: `${id}-prompt`, placeholder: "prompt", spellcheck: "false", value: (base.prompts || [])[0] || "" }) : null;
  const needsTarget = !base.task && !base.target;
  const targetIn = needsTarget ? h("input", { type: "text", class: "intervene-target mono", id: `${id}-target`, placeholder: "target token, e.g. \" Mary\"", spellcheck: "false", value: base.defaultToken || "" }) : null;
  const box = h("div", { class: "intervene-progress", id: `${id}-progress` });
  const controls = h("span", { class: "intervene-controls" },
    h("span", { class: "label" }, "positions"), posSel, howSel, ablateBtn, steerBox);
  const el = h("div", { class: "intervene-bar", id, dataset: { component: "" } },
    h("div", { class: "intervene-row" }, h("span", { class: "label" }, "Intervene"), what, controls),
    promptIn || targetIn ? h("div", { class: "intervene-row" },
      promptIn ? [h("span", { class: "label" }, "prompt"), promptIn] : null,
      targetIn ? [h("span", { class: "label" }, "target"), targetIn] : null) : null,
    h("div", { class: "small muted intervene-note" }, "Runs on every role of these inputs and opens the result (each role's edit is the same head or neuron; a feature's match by decoder cosine)."),
    box);

  function set(c) {
    comp = c;
    el.dataset.component = c ? componentLabel(c) : "";
    what.textContent = c ? `${componentLabel(c)}${c.note ? ` · ${c.note}` : ""}` : hint;
    controls.hidden = !c;
    if (!c) return;
    const spec = KINDS[c.kind];
    const hows = spec.hows.filter((x) => x !== "resample" || base.task);
    replace(howSel, hows.map((x) => h("option", { value: x }, x === "zero" ? "zero" : x === "mean" ? "mean (eval text)" : "resample (corrupt)")));
    howSel.hidden = hows.length < 2;
    const pos = [h("option", { value: "all" }, "all"), h("option", { value: "-1" }, "metric position")];
    if (Number.isInteger(c.position) && c.position >= 0) pos.push(h("option", { value: String(c.position), selected: true }, `position ${c.position}`));
    replace(posSel, pos);
    steerBox.hidden = !spec.steer;
  }

  function go(action) {
    if (!comp) return;
    const positions = posSel.value === "all" ? "all" : Number(posSel.value);
    const edit = editOf(comp, action, { how: howSel.value || "zero", alpha: Number(alpha.value), positions });
    const body = { pair: base.pair, options: { edits: [edit], top_k: TOP_K, continuation_tokens: CONTINUATION_TOKENS } };
    const roles = comp.roles || base.roles;
    if (roles) body.roles = roles;
    if (base.task) body.task = base.task;
    else body.prompts = promptIn ? [promptIn.value] : base.prompts || [""];
    if (base.target) body.options.target = base.target;
    else if (targetIn) body.options.target = { kind: "logit", token: targetIn.value };
    launch(body, box, { signal });
  }

  set(comp);
  return { el, set };
}

const storedInputs = new Map(); // result id -> its ResultOut (for its inputs), fetched once per page load

async function storedResult(id, signal) {
  if (!storedInputs.has(id)) storedInputs.set(id, getResult(id, signal).catch((e) => { storedInputs.delete(id); throw e; }));
  return storedInputs.get(id);
}

/** The target token a circuit explained: its top logit node's text (`Output " Mary" (p=0.123)`). */
function topLogitToken(graph) {
  const logits = (graph && graph.nodes || []).filter((n) => /logit/i.test(String(n.feature_type || "")));
  for (const n of logits) {
    const m = /^Output "(.*)" \(p=/.exec(n.clerp || "");
    if (m) return m[1];
  }
  return "";
}

/**
 * A circuit node panel's bar: the feature node of `role` ablated (set to 0) or steered along its decoder
 * row, on the circuit's prompt and every role it ran on (the node's role leading, or its match in the first).
 */
export function circuitFeatureBar({ resultId, pair, role, node, layer, feature, roles, matches, graph, signal }) {
  const slot = h("div", { class: "intervene-slot", id: "node-intervene-slot" });
  const fill = async () => {
    let base = { pair, prompts: [] };
    if (resultId) {
      try { base = baseOf(await storedResult(resultId, signal)); } catch (e) { if (e.name === "AbortError") return; }
    }
    if (!base.target && !base.task) base.defaultToken = topLogitToken(graph);
    const picked = featureRoles(roles.filter((r) => r !== "graph"), role, { kind: "feature", layer, index: feature }, matches);
    const position = Number.parseInt(node.ctx_idx, 10);
    const comp = { ...picked.component, position: Number.isFinite(position) ? position : undefined, roles: picked.roles };
    const bar = interventionBar({ id: "node-intervene", base, component: comp, askPrompt: !base.prompts && !base.task, signal });
    replace(slot, bar.el);
  };
  fill();
  return slot;
}

/**
 * A feature page's bar: its feature ablated or steered on the prompt of the circuit it was opened from
 * (`circuit` in the URL), else on a prompt typed here; every role of the pair (see featureRoles).
 */
export function featurePageBar({ out, record, matches = [], circuit = null, signal }) {
  const slot = h("section", { class: "card intervene-card", id: "feature-intervene" }, h("p", { class: "muted small" }, "Loading the intervention controls…"));
  const fill = async () => {
    const options = (out.inputs && out.inputs.options) || {};
    const role = ((out.inputs && out.inputs.roles) || [])[0] || null;
    if (!Number.isInteger(options.layer) || !Number.isInteger(options.feature)) { slot.remove(); return; }
    let base = { pair: out.pair };
    let allRoles = role ? [role] : [];
    try {
      const models = await api("/models", { signal });
      const pair = (models.pairs || []).find((p) => p.name === out.pair);
      if (pair) allRoles = pair.roles.map((r) => r.role);
      if (circuit) base = { ...baseOf(await storedResult(circuit, signal)), roles: undefined };
    } catch (e) {
      if (e.name === "AbortError") return;
    }
    if (!base.task && !base.prompts) {
      const ctx = (record && (record.examples_quantiles || [])[0] && record.examples_quantiles[0].examples[0]) || null;
      base.prompts = ctx && Array.isArray(ctx.tokens) ? [ctx.tokens.map((t) => (typeof t === "string" ? t : t.token || "")).join("")] : [""];
    }
    if (!base.target && !base.task) {
      const top = record && (record.top_logits || [])[0];
      base.defaultToken = top ? (typeof top === "string" ? top : top.token || "") : "";
    }
    const picked = featureRoles(allRoles, role, { kind: "feature", layer: options.layer, index: options.feature }, matches);
    const bar = interventionBar({ id: "feature-intervene-bar", base, component: { ...picked.component, roles: picked.roles }, askPrompt: !base.task, signal });
    replace(slot, h("div", { class: "card-head" }, h("h2", {}, "Ablate or steer this feature"),
      h("span", { class: "hint" }, `on ${picked.roles.length} role${picked.roles.length === 1 ? "" : "s"}; other roles edit their decoder-cosine match`)), bar.el);
  };
  fill();
  return slot;
}

/**
 * The component of a clicked patching-map cell: `point` is Plotly's click point on a map of `nodeType`
 * (rows "L1" or "L1H3" / "L0N5", columns positions, heads "H2" or neurons "N5"); null for other maps.
 */
export function patchingComponent(nodeType, point) {
  if (!point) return null;
  const y = /^L(\d+)(?:([HN])(\d+))?$/.exec(String(point.y));
  if (!y) return null;
  const layer = Number(y[1]);
  const col = Array.isArray(point.pointNumber) ? point.pointNumber[1] : null;
  const x = /^([HN])(\d+)$/.exec(String(point.x));
  const head = /^head(_[qkv])?(_pos)?$/.exec(nodeType);
  const note = head && head[1] ? "the head's output (patched: its " + { _q: "queries", _k: "keys", _v: "values" }[head[1]] + ")" : null;
  if (nodeType === "resid_pre") return { kind: "resid", layer, position: col };
  if (nodeType === "mlp") return { kind: "mlp", layer, position: col };
  if (head && !head[2] && x) return { kind: "head", layer, index: Number(x[2]), note };
  if (head && head[2] && y[2] === "H") return { kind: "head", layer, index: Number(y[3]), position: col, note };
  if (nodeType === "neuron" && x) return { kind: "neuron", layer, index: Number(x[2]) };
  if (nodeType === "neuron_pos" && y[2] === "N") return { kind: "neuron", layer, index: Number(y[3]), position: col };
  return null;
}
