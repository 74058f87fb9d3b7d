// Intervention results (#/intervene/<id>): per role side by side, for the chosen prompt, the clean and
// intervened next-token distributions, KL, entropy and the metric change; per edit its actual change
// against the linear (direct-path DLA) prediction; the greedy continuations; the roles' differences.

import { h, replace } from "../dom.js";
import { fmt, fmtSigned, signClass, truncate } from "../format.js";
import { maxAbs, range, render as plot } from "../plots.js";
import { setQuery } from "../router.js";
import { roleColor, roleLabel, sortRoles } from "../roles.js";
import { loadResult, manifestCard, notice, resultHeader, roleTitle } from "./common.js";

export async function render({ root, route, signal }) {
  const id = route.parts[0];
  const out = await loadResult(root, id, signal);
  if (!out) return;
  const result = out.result;
  const roles = sortRoles(result.roles);
  if (!roles.length) { replace(root, resultHeader(out), notice("This intervention has no roles.")); return; }
  const first = result.roles[roles[0]];
  const nPrompts = first.n_prompts;
  const edits = first.edits;
  const unit = unitOf(first.target);
  const state = { prompt: Number(route.query.prompt) >= 0 && Number(route.query.prompt) < nPrompts ? Number(route.query.prompt) : 0 };

  // -- prompt selector --------------------------------------------------------------------------
  const promptSel = h("select", { id: "intervene-prompt", "aria-label": "prompt" },
    range(nPrompts).map((i) => h("option", { value: i, selected: i === state.prompt, title: promptText(out, i) || null }, promptLabel(out, i))));
  promptSel.addEventListener("change", () => { state.prompt = Number(promptSel.value); setQuery({ prompt: state.prompt || undefined }); redraw(); });
  const promptShown = h("span", { class: "intervene-prompt-text mono small", id: "intervene-prompt-shown" });
  const toolbar = h("div", { class: "card toolbar", style: { position: "sticky", top: "60px", zIndex: 5 } },
    h("span", { class: "label" }, "Prompt"), promptSel, promptShown,
    h("span", { class: "spacer" }),
    h("span", { class: "small muted" }, `${edits.length} edit${edits.length === 1 ? "" : "s"}: `, h("span", { class: "mono" }, edits.map((e) => e.label).join(" + "))));

  // -- per-role summary, distributions, continuations -----------------------------------------
  const stats = h("div", { class: "stat-row intervene-stats", id: "intervene-stats" });
  const distPlots = Object.fromEntries(roles.map((r) => [r, h("div", { class: "plot", id: `intervene-dist-${r}`, dataset: { role: r } })]));
  const distCard = h("section", { class: "card", id: "intervene-distributions" },
    h("div", { class: "card-head" }, h("h2", {}, "Next-token distribution: clean vs intervened"),
      h("span", { class: "hint" }, "the clean and intervened top tokens at the metric's position; one probability axis for every role")),
    h("div", { class: "roles-grid" }, roles.map((r) => h("div", { class: "plot-cell" }, roleTitle(r), distPlots[r]))));
  const contBox = h("div", { class: "roles-grid" });
  const hasContinuation = roles.some((r) => result.roles[r].prompts.some((p) => p.continuation_clean !== null && p.continuation_clean !== undefined));
  const contCard = hasContinuation ? h("section", { class: "card", id: "intervene-continuations" },
    h("div", { class: "card-head" }, h("h2", {}, "Greedy continuation"), h("span", { class: "hint" }, "the clean run and the run with every edit applied")),
    contBox) : null;

  replace(root,
    resultHeader(out, { title: "Intervention", sub: "Components ablated, edited or steered in every role: what the next-token distribution and the metric do, against the linear prediction." }),
    toolbar, stats, distCard, predictionSection(result, roles, edits, unit), contCard, differencesSection(result, roles, unit),
    meansSection(result, roles, unit), manifestCard(out));

  function redraw() {
    const i = state.prompt;
    promptShown.textContent = promptText(out, i) ? JSON.stringify(truncate(promptText(out, i), 90, { tail: true })) : "";
    replace(stats, roles.map((role) => {
      const r = result.roles[role];
      const p = r.prompts[i];
      return h("div", { class: "stat intervene-stat", dataset: { role } },
        h("div", { class: "label" }, h("span", { class: "swatch", style: { background: roleColor(role) } }), `${roleLabel(role)}: ${unit}`),
        h("div", { class: "value" }, `${fmt(p.metric_clean, 4)} → ${fmt(p.metric_intervened, 4)}`),
        h("div", { class: ["ci", signClass(p.metric_change)] }, `change ${fmtSigned(p.metric_change, 4)}`),
        h("div", { class: "ci" }, `KL ${fmt(p.kl, 4)} nats · entropy ${fmt(p.entropy_clean, 3)} → ${fmt(p.entropy_intervened, 3)}`));
    }));
    const pmax = Math.max(1e-9, ...roles.flatMap((r) => [...r2p(r, i).clean_top, ...r2p(r, i).intervened_top].map((t) => t.prob)));
    for (const role of roles) drawDistribution(distPlots[role], role, r2p(role, i), pmax);
    if (contCard) {
      replace(contBox, roles.map((role) => {
        const p = r2p(role, i);
        return h("div", { class: "plot-cell intervene-continuation", dataset: { role } }, roleTitle(role),
          h("dl", { class: "kv" },
            h("dt", {}, "clean"), h("dd", { class: "mono" }, p.continuation_clean === null ? "–" : JSON.stringify(p.continuation_clean)),
            h("dt", {}, "intervened"), h("dd", { class: ["mono", p.continuation_intervened !== p.continuation_clean && "intervene-changed"] },
              p.continuation_intervened === null ? "–" : JSON.stringify(p.continuation_intervened))));
      }));
    }
  }
  const r2p = (role, i) => result.roles[role].prompts[i];

  redraw();
}

/** Grouped bars: the union of the clean and intervened top tokens, clean faded, intervened in the role's colour. */
function drawDistribution(el, role, p, pmax) {
  const probs = (list) => new Map(list.map((t) => [t.token, t.prob]));
  const clean = probs(p.clean_top), after = probs(p.intervened_top);
  const tokens = [...new Set([...p.clean_top.map((t) => t.token), ...p.intervened_top.map((t) => t.token)])]
    .sort((a, b) => Math.max(clean.get(b) || 0, after.get(b) || 0) - Math.max(clean.get(a) || 0, after.get(a) || 0));
  const x = tokens.map((t) => JSON.stringify(t));
  const color = roleColor(role);
  plot(el, [
    { type: "bar", name: "clean", x, y: tokens.map((t) => clean.get(t) ?? null), marker: { color, opacity: 0.35, line: { color, width: 1 } },
      hovertemplate: `${roleLabel(role)} clean %{x}: %{y:.4f}<extra></extra>` },
    { type: "bar", name: "intervened", x, y: tokens.map((t) => after.get(t) ?? null), marker: { color },
      hovertemplate: `${roleLabel(role)} intervened %{x}: %{y:.4f}<extra></extra>` },
  ], {
    barmode: "group", height: 300, margin: { t: 16, b: 80 },
    yaxis: { title: { text: "probability" }, range: [0, pmax * 1.05], gridcolor: "#eef0f4" },
    xaxis: { type: "category", tickangle: -40, tickfont: { size: 10.5 }, automargin: true },
    legend: { orientation: "h", y: 1.02, yanchor: "bottom", x: 1, xanchor: "right" },
  });
}

/** Per edit: each role's mean actual change, its direct-path prediction and the gap; a per-prompt scatter. */
function predictionSection(result, roles, edits, unit) {
  const cards = edits.map((edit) => {
    const rows = roles.map((role) => {
      const r = result.roles[role];
      const e = r.edits.find((x) => x.index === edit.index);
      if (!e) return null;
      const exact = !r.has_ln;
      const where = e.feature !== null && e.feature !== undefined ? `feature ${e.feature}${typeof e.match_cos === "number" ? ` (cos ${fmt(e.match_cos, 3)})` : ""}` : "";
      return h("tr", { dataset: { role, exact: exact ? "true" : "false" }, class: exact ? "intervene-exact" : null },
        h("td", {}, h("span", { class: "swatch", style: { background: roleColor(role) } }), roleLabel(role)),
        h("td", { class: "small muted" }, e.applied ? where || "applied" : `not applied${where ? ` (${where})` : " (no matched feature)"}`),
        h("td", { class: ["num", signClass(e.mean_actual)] }, fmt(e.mean_actual, 4)),
        h("td", { class: ["num", signClass(e.mean_predicted)] }, fmt(e.mean_predicted, 4)),
        h("td", { class: ["num", signClass(e.mean_gap)] }, fmt(e.mean_gap, 4)),
        h("td", { class: "small" }, exact ? h("span", { class: "badge intervene-exact-badge", title: "no LayerNorm: the direct path's change is exactly dw · d; the gap is what flows through later layers" }, "direct path exact (no LN)")
          : h("span", { class: "muted" }, "cached ln_final scale")));
    }).filter(Boolean);
    const scatter = h("div", { class: "plot intervene-scatter", id: `intervene-pva-${edit.index}` });
    requestAnimationFrame(() => drawPredicted(scatter, result, roles, edit.index, unit));
    return h("div", { class: "intervene-edit", dataset: { edit: edit.index } },
      h("h3", { class: "mono", style: { margin: "8px 0 6px" } }, edit.label),
      h("div", { class: "grid grid-2" },
        h("div", { class: "table-wrap" }, h("table", { class: "data compact intervene-pva intervene-table", id: `intervene-pva-table-${edit.index}` },
          h("thead", {}, h("tr", {}, ["role", "edit", `actual Δ ${unit}`, "predicted", "gap", ""].map((x, k) => h("th", { class: k >= 2 && k <= 4 ? "num" : null }, x)))),
          h("tbody", {}, rows))),
        scatter));
  });
  return h("section", { class: "card", id: "intervene-predicted" },
    h("div", { class: "card-head" }, h("h2", {}, "Predicted vs actual, each edit alone"),
      h("span", { class: "hint" }, `mean over prompts; predicted: the DLA of the edit's change of its direct write (${unit})`)),
    cards,
    h("p", { class: "small muted" }, "Without LayerNorm the prediction is the exact direct-path change (no scale to freeze), so its gap is only "
      + "the effect through later layers; with LayerNorm the frozen ln_final scale adds its own error."));
}

/** Actual against predicted per prompt, one colour per role, on the y = x diagonal. */
function drawPredicted(el, result, roles, index, unit) {
  const traces = [];
  const all = [];
  for (const role of roles) {
    const e = result.roles[role].edits.find((x) => x.index === index);
    if (!e) continue;
    all.push(e.predicted, e.actual);
    traces.push({
      type: "scatter", mode: "markers", name: roleLabel(role), x: e.predicted, y: e.actual,
      marker: { color: roleColor(role), size: 9, opacity: 0.85, symbol: result.roles[role].has_ln ? "circle" : "diamond" },
      customdata: e.prediction_gap.map((g, i) => [i + 1, g]),
      hovertemplate: `${roleLabel(role)} prompt %{customdata[0]}<br>predicted %{x:.4g}<br>actual %{y:.4g}<br>gap %{customdata[1]:.3g}<extra></extra>`,
    });
  }
  const m = maxAbs(all) * 1.1;
  traces.push({ type: "scatter", mode: "lines", x: [-m, m], y: [-m, m], name: "actual = predicted", line: { color: "#adb5bd", dash: "dash", width: 1 }, hoverinfo: "skip" });
  plot(el, traces, {
    height: 280, margin: { t: 16 },
    xaxis: { title: { text: `predicted Δ ${unit}` }, range: [-m, m], zerolinecolor: "#ced4da", gridcolor: "#f1f3f5" },
    yaxis: { title: { text: `actual Δ ${unit}` }, range: [-m, m], zerolinecolor: "#ced4da", gridcolor: "#f1f3f5" },
    legend: { orientation: "h", y: 1.02, yanchor: "bottom", x: 1, xanchor: "right" },
  });
}

/** Each role against the reference role: mean metric change, KL and each edit's actual change and gap. */
function differencesSection(result, roles, unit) {
  const entries = Object.entries(result.differences || {});
  if (!entries.length) return null;
  const editLabels = result.roles[roles[0]].edits.map((e) => [e.index, e.label]);
  const cell = (v) => h("td", { class: ["num", signClass(v)] }, fmtSigned(v, 4));
  return h("section", { class: "card", id: "intervene-differences" },
    h("div", { class: "card-head" }, h("h2", {}, "Differences between the roles"), h("span", { class: "hint" }, `means over prompts, ${unit}`)),
    h("div", { class: "table-wrap" }, h("table", { class: "data compact intervene-table" },
      h("thead", {}, h("tr", {}, h("th", {}, "roles"), h("th", { class: "num" }, "metric change"), h("th", { class: "num" }, "KL"),
        editLabels.flatMap(([, label]) => [h("th", { class: "num mono" }, `${label}: actual`), h("th", { class: "num" }, "gap")]))),
      h("tbody", {}, entries.map(([key, d]) => {
        const [a, b] = key.split(" - ");
        const byIndex = new Map(d.edits.map((e) => [e.index, e]));
        return h("tr", { dataset: { diff: key } },
          h("td", {}, `${roleLabel(a)} − ${roleLabel(b)}`), cell(d.metric_change), cell(d.kl),
          editLabels.flatMap(([i]) => (byIndex.has(i) ? [cell(byIndex.get(i).actual), cell(byIndex.get(i).prediction_gap)] : [h("td", {}, "–"), h("td", {}, "–")])));
      })))));
}

/** Means over every prompt per role: metric clean / intervened / change and KL. */
function meansSection(result, roles, unit) {
  return h("section", { class: "card", id: "intervene-means" },
    h("div", { class: "card-head" }, h("h2", {}, "Over all prompts"), h("span", { class: "hint" }, `every edit applied together, ${unit}`)),
    h("div", { class: "table-wrap" }, h("table", { class: "data compact intervene-table" },
      h("thead", {}, h("tr", {}, ["role", "prompts", "metric clean", "intervened", "change", "KL (nats)"].map((x, k) => h("th", { class: k ? "num" : null }, x)))),
      h("tbody", {}, roles.map((role) => {
        const r = result.roles[role];
        return h("tr", { dataset: { role } },
          h("td", {}, h("span", { class: "swatch", style: { background: roleColor(role) } }), roleLabel(role)),
          h("td", { class: "num" }, String(r.n_prompts)), h("td", { class: "num" }, fmt(r.mean_metric_clean, 4)),
          h("td", { class: "num" }, fmt(r.mean_metric_intervened, 4)),
          h("td", { class: ["num", signClass(r.mean_metric_change)] }, fmtSigned(r.mean_metric_change, 4)),
          h("td", { class: "num" }, fmt(r.mean_kl, 4)));
      })))));
}

function unitOf(target) {
  if (!target) return "metric";
  return target.kind === "logit" ? "logit" : "logit diff";
}

/** Prompt i's text where the result's inputs hold it (prompts, or a custom task's clean prompts). */
function promptText(out, i) {
  const inputs = out.inputs || {};
  if (inputs.prompts) return inputs.prompts[i] || null;
  if (inputs.task && inputs.task.name === "custom" && inputs.task.pairs && inputs.task.pairs[i]) return inputs.task.pairs[i].clean;
  return null;
}

function promptLabel(out, i) {
  const p = promptText(out, i);
  const task = out.inputs && out.inputs.task;
  return `${i + 1}: ${p ? `"${truncate(p, 48, { tail: true })}"` : task ? `${task.name} prompt ${i + 1}` : ""}`;
}
