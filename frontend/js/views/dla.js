// DLA: per-head heatmaps per role (same colour range), differences to the original, per-layer
// totals, the DLA-vs-direct-effect error (NMAE with CI) and top neurons. The LN treatment
// toggle re-draws from the stored result (no new request).

import { h, replace, segmented } from "../dom.js";
import { fmt, fmtCI, signClass, truncate } from "../format.js";
import { divergingHeatmap, heatmapLayout, maxAbs, range, render as plot, tickAngle } from "../plots.js";
import { setQuery } from "../router.js";
import { roleColor, roleLabel, sortRoles } from "../roles.js";
import { loadResult, manifestCard, notice, resultHeader, roleTitle } from "./common.js";
import { baseOf, interventionBar } from "../intervene-actions.js";

export const TREATMENT_LABEL = {
  cached_scale: "cached scale",
  direct_effect: "direct effect",
  raw: "raw",
};

const TREATMENT_HELP = {
  cached_scale: "Standard DLA: each component centred and divided by the ln_final scale cached on the full forward pass.",
  direct_effect: "Ground truth: target(x) − target(x − c), with ln_final recomputed without the component.",
  raw: "No LayerNorm scale: the component dotted with the unembedding direction.",
};

export async function render({ root, route, signal }) {
  const id = route.parts[0];
  const out = await loadResult(root, id, signal);
  if (!out) return;
  const result = out.result;
  const roles = sortRoles(result.roles);
  if (!roles.length) { replace(root, notice("This DLA result has no roles.")); return; }
  const first = result.roles[roles[0]];
  const treatments = Object.keys(TREATMENT_LABEL).filter((t) => roles.every((r) => result.roles[r].treatments[t]));
  const state = {
    treatment: treatments.includes(route.query.treatment) ? route.query.treatment : treatments[0],
    prompt: route.query.prompt !== undefined && Number(route.query.prompt) < first.n_prompts ? Number(route.query.prompt) : "mean",
  };
  const unit = unitOf(first.target);
  const nLayers = first.n_layers;
  const nHeads = first.n_heads;
  const headX = range(nHeads).map((i) => `H${i}`);
  const layerY = range(nLayers).map((i) => `L${i}`);

  const heads = (role, treatment, prompt = state.prompt) => {
    const t = result.roles[role].treatments[treatment];
    return prompt === "mean" ? t.heads : t.heads_per_prompt[prompt];
  };

  // -- controls ---------------------------------------------------------------------------
  const helpLine = h("span", { class: "small muted" });
  const toggle = segmented(treatments.map((t) => ({ value: t, label: TREATMENT_LABEL[t], title: TREATMENT_HELP[t] })),
    state.treatment, (t) => { state.treatment = t; setQuery({ treatment: t }); redraw(); },
    { id: "treatment-toggle", "aria-label": "LayerNorm treatment" });
  const promptSelect = first.n_prompts > 1 ? h("select", { id: "dla-prompt", "aria-label": "prompt" },
    h("option", { value: "mean", selected: state.prompt === "mean" }, `mean over ${first.n_prompts} prompts`),
    range(first.n_prompts).map((i) => h("option", { value: i, selected: state.prompt === i, title: promptText(out, i) || null },
      promptLabel(out, i, targetsOf(result, roles, i))))) : null;
  if (promptSelect) promptSelect.addEventListener("change", () => {
    state.prompt = promptSelect.value === "mean" ? "mean" : Number(promptSelect.value);
    setQuery({ prompt: state.prompt === "mean" ? undefined : state.prompt });
    redraw();
  });
  const toolbar = h("div", { class: "card toolbar", style: { position: "sticky", top: "60px", zIndex: 5 } },
    h("span", { class: "label" }, "LayerNorm treatment"), toggle, helpLine,
    h("span", { class: "spacer" }),
    promptSelect ? h("span", { class: "label" }, "Prompt") : null, promptSelect);

  // -- target values ------------------------------------------------------------------------
  const stats = h("div", { class: "stat-row" }, roles.map((role) => {
    const r = result.roles[role];
    const v = mean(r.target_value);
    return h("div", { class: "stat", dataset: { role } },
      h("div", { class: "label" }, h("span", { class: "swatch", style: { background: roleColor(role) } }), `${roleLabel(role)}: target`),
      h("div", { class: "value" }, fmt(v, 4)),
      h("div", { class: "ci" }, `${unit}, ${r.has_ln ? "LN (" + r.final_scale + " scale)" : "no LN: DLA exact"}`));
  }));

  // -- heatmaps -----------------------------------------------------------------------------
  const headPlots = Object.fromEntries(roles.map((r) => [r, h("div", { class: "plot", id: `dla-heads-${r}`, dataset: { role: r } })]));
  const headsCard = h("section", { class: "card" },
    h("div", { class: "card-head" }, h("h2", {}, "Per-head direct logit attribution"),
      h("span", { class: "hint" }, `layer × head, ${unit}; one colour range for every role and treatment`)),
    h("div", { class: "roles-grid" }, roles.map((r) => h("div", { class: "plot-cell" }, roleTitle(r), headPlots[r]))));

  const diffKeys = diffPairs(result, roles);
  const diffPlots = Object.fromEntries(diffKeys.map(([key]) => [key, h("div", { class: "plot", id: `dla-diff-${slug(key)}`, dataset: { diff: key } })]));
  const diffCard = diffKeys.length ? h("section", { class: "card" },
    h("div", { class: "card-head" }, h("h2", {}, "Difference to the original"),
      h("span", { class: "hint" }, `per head, ${unit}; blue: larger than in the original`)),
    h("div", { class: "roles-grid" }, diffKeys.map(([key, a, b]) => h("div", { class: "plot-cell" },
      h("div", { class: "role-title" }, h("span", { class: "swatch", style: { background: roleColor(a) } }), `${roleLabel(a)} − ${roleLabel(b)}`),
      diffPlots[key])))) : null;

  const layersPlot = h("div", { class: "plot tall", id: "dla-layers" });
  const layersCard = h("section", { class: "card" },
    h("div", { class: "card-head" }, h("h2", {}, "Attribution by component"),
      h("span", { class: "hint" }, "embeddings, then each layer's attention (heads + b_O) and MLP output")),
    layersPlot);

  const errorsCard = errorSection(result, roles, unit);
  const neuronsBox = h("div", { class: "roles-grid" });
  const neuronsCard = h("section", { class: "card" },
    h("div", { class: "card-head" }, h("h2", {}, "Top neurons"), h("span", { class: "hint" }, `by |mean attribution|, ${unit}`)), neuronsBox);

  // ablate / steer the head clicked in a heatmap or the neuron clicked in a top-neurons table
  const bar = interventionBar({ id: "dla-intervene", base: baseOf(out), hint: "click a head in a heatmap or a neuron in the top-neurons tables", signal });
  headsCard.append(bar.el);
  neuronsBox.classList.add("intervene-pick");
  neuronsBox.addEventListener("click", (ev) => {
    const m = /^L(\d+)N(\d+)$/.exec((ev.target.closest("tr")?.querySelector("td.mono")?.textContent || "").trim());
    if (m) bar.set({ kind: "neuron", layer: Number(m[1]), index: Number(m[2]) });
  });

  replace(root, resultHeader(out, {
    sub: `What each head, MLP and neuron writes towards the target ${first.target.kind === "task_metric" ? `(${first.target.task || "task"} metric)` : ""} at the last token, `
      + "under three treatments of the final LayerNorm, and how far standard DLA is from the true direct effect.",
  }), toolbar, stats, headsCard, diffCard, h("div", { class: "grid grid-2" }, layersCard, errorsCard.card), neuronsCard, manifestCard(out));

  // The shared colour range: every role, every treatment (so a toggle changes colours, not the scale).
  const headRange = maxAbs(roles.map((r) => treatments.map((t) => heads(r, t))));
  const diffRange = () => maxAbs(diffKeys.map(([key, a, b]) => treatments.map((t) => diffOf(key, a, b, t))));
  function diffOf(key, a, b, t) {
    if (state.prompt === "mean" && result.head_diffs && result.head_diffs[key] && result.head_diffs[key][t]) return result.head_diffs[key][t];
    return sub2(heads(a, t), heads(b, t));
  }

  function redraw() {
    const t = state.treatment;
    helpLine.textContent = TREATMENT_HELP[t];
    const zmax = state.prompt === "mean" ? headRange : maxAbs(roles.map((r) => treatments.map((tt) => heads(r, tt))));
    for (const role of roles) {
      const r = result.roles[role];
      const z = heads(role, t);
      const err = r.errors[t] ? r.errors[t].heads_abs_error : null;
      plot(headPlots[role], [divergingHeatmap({
        z, x: headX, y: layerY, zmax, colorbarTitle: unit,
        customdata: err || undefined,
        hovertemplate: `${roleLabel(role)} %{y}%{x}<br>DLA %{z:.4g} ${unit}` + (err ? "<br>|DLA − DE| %{customdata:.3g}" : "") + "<extra></extra>",
      })], heatmapLayout({
        title: `${TREATMENT_LABEL[t]}${state.prompt === "mean" ? " · mean over prompts" : ` · prompt ${state.prompt + 1}`}`, xTitle: "head",
        height: heatmapHeight(nLayers),
      }));
    }
    const dmax = diffRange();
    for (const [key, a, b] of diffKeys) {
      plot(diffPlots[key], [divergingHeatmap({
        z: diffOf(key, a, b, t), x: headX, y: layerY, zmax: dmax, colorbarTitle: `Δ ${unit}`,
        hovertemplate: `%{y}%{x}<br>${roleLabel(a)} − ${roleLabel(b)}: %{z:.4g}<extra></extra>`,
      })], heatmapLayout({ title: `${TREATMENT_LABEL[t]}${state.prompt === "mean" ? " · mean over prompts" : ` · prompt ${state.prompt + 1}`}`, xTitle: "head", height: heatmapHeight(nLayers) }));
    }
    drawLayers(t);
    drawNeurons(t);
  }

  function drawLayers(t) {
    const cats = ["embed", "pos_embed", ...range(nLayers).flatMap((l) => [`L${l} attn`, `L${l} MLP`])];
    const traces = roles.map((role) => {
      const tr = result.roles[role].treatments[t];
      const pick = state.prompt === "mean" ? null : state.prompt;
      const labels = result.roles[role].labels;
      const comp = (label) => {
        const i = labels.indexOf(label);
        if (i < 0) return null;
        return pick === null ? tr.mean[i] : tr.per_prompt[pick][i];
      };
      const y = [comp("embed"), comp("pos_embed")];
      for (let l = 0; l < nLayers; l++) {
        const headsL = pick === null ? tr.heads[l] : tr.heads_per_prompt[pick][l];
        const bias = comp(`L${l}b_O`) || 0;
        y.push(pick === null ? tr.attn_layer_totals[l] : headsL.reduce((s, v) => s + v, 0) + bias);
        y.push(pick === null ? tr.mlp_layer_totals[l] : comp(`L${l}MLP`));
      }
      return {
        type: "bar", name: roleLabel(role), x: cats, y, marker: { color: roleColor(role) },
        hovertemplate: `${roleLabel(role)} %{x}: %{y:.4g} ${unit}<extra></extra>`,
      };
    });
    plot(layersPlot, traces, {
      title: `Attribution per component · ${TREATMENT_LABEL[t]}`, barmode: "group", height: 380,
      yaxis: { title: { text: unit }, zeroline: true, zerolinecolor: "#9aa3b5", gridcolor: "#eef0f4" },
      xaxis: { type: "category", tickangle: tickAngle(cats.length, 9, layersPlot.clientWidth || 420), tickfont: { size: 11 }, automargin: true },
      legend: { orientation: "h", y: 1.02, yanchor: "bottom", x: 1, xanchor: "right" },
      margin: { t: 56, b: 70 },
    });
  }

  function drawNeurons(t) {
    replace(neuronsBox, roles.map((role) => {
      const list = result.roles[role].treatments[t].top_neurons || [];
      const pick = state.prompt;
      const rows = list.slice(0, 12).map((n, i) => {
        const v = pick === "mean" ? n.attribution : n.per_prompt[pick];
        return h("tr", {}, h("td", { class: "num" }, String(i + 1)), h("td", { class: "mono" }, n.label),
          h("td", { class: ["num", signClass(v)] }, fmt(v, 4)));
      });
      return h("div", { class: "plot-cell", dataset: { role } }, roleTitle(role),
        rows.length ? h("div", { class: "table-wrap" }, h("table", { class: "data compact", id: `dla-neurons-${role}` },
          h("thead", {}, h("tr", {}, h("th", { class: "num" }, "#"), h("th", {}, "neuron"), h("th", { class: "num" }, unit))),
          h("tbody", {}, rows))) : h("p", { class: "muted small" }, "No neurons (top_k_neurons = 0)."));
    }));
  }

  redraw();
  errorsCard.draw();
  for (const el of Object.values(headPlots)) {
    el.on("plotly_click", (ev) => {
      const p = ev.points && ev.points[0];
      if (p) bar.set({ kind: "head", layer: Number(String(p.y).slice(1)), index: Number(String(p.x).slice(1)) });
    });
  }
}

function errorSection(result, roles, unit) {
  const errPlot = h("div", { class: "plot", id: "dla-errors" });
  const statRows = roles.map((role) => {
    const r = result.roles[role];
    const e = r.errors.cached_scale;
    const n = e ? e.nmae : null;
    return h("div", { class: "stat", dataset: { role, nmae: n && n.value !== null ? n.value : "" } },
      h("div", { class: "label" }, h("span", { class: "swatch", style: { background: roleColor(role) } }), `${roleLabel(role)}: NMAE (cached scale)`),
      h("div", { class: "value", title: n && n.value !== null ? `${n.value}%` : null }, n && n.value !== null ? (n.value < 1e-6 ? "≈ 0%" : `${fmt(n.value, 3)}%`) : "–"),
      h("div", { class: "ci" }, !n ? "no error (one treatment)" : n.value !== null && n.value < 1e-6
        ? `exact up to rounding (${fmt(n.value, 2)}%) · ${n.n_prompts} prompts` : `95% CI ${fmtCI(n.ci_low, n.ci_high)} · ${n.n_prompts} prompts`));
  });
  const card = h("section", { class: "card" },
    h("div", { class: "card-head" }, h("h2", {}, "DLA vs the true direct effect"),
      h("span", { class: "hint" }, "NMAE = mean|DLA − DE| / mean|DE| × 100 over components × prompts")),
    h("div", { class: "stat-row" }, statRows), errPlot,
    h("p", { class: "small muted" }, "Error bars: 95% bootstrap CI over prompts. Without LayerNorm the treatments coincide and the error is 0 up to rounding."));
  const draw = () => {
    const ts = ["cached_scale", "raw"];
    const traces = ts.filter((t) => roles.some((r) => result.roles[r].errors[t])).map((t, i) => {
      const ys = roles.map((r) => (result.roles[r].errors[t] ? result.roles[r].errors[t].nmae : null));
      return {
        type: "bar", name: TREATMENT_LABEL[t], x: roles.map(roleLabel), y: ys.map((n) => (n ? n.value : null)),
        marker: { color: i === 0 ? "#495057" : "#adb5bd" },
        error_y: {
          type: "data", symmetric: false, color: "#1d2330", thickness: 1.2, width: 5,
          array: ys.map((n) => (n && n.ci_high !== null ? n.ci_high - n.value : 0)),
          arrayminus: ys.map((n) => (n && n.ci_low !== null ? n.value - n.ci_low : 0)),
        },
        hovertemplate: `%{x} · ${TREATMENT_LABEL[t]}<br>NMAE %{y:.3g}%<extra></extra>`,
      };
    });
    plot(errPlot, traces, {
      title: "NMAE of DLA against the direct effect (%)", barmode: "group", height: 300,
      yaxis: { title: { text: "NMAE (%)" }, rangemode: "tozero", gridcolor: "#eef0f4" },
      legend: { orientation: "h", y: 1.02, yanchor: "bottom", x: 1, xanchor: "right" }, margin: { t: 56 },
    });
  };
  return { card, draw };
}

function diffPairs(result, roles) {
  const out = [];
  const keys = result.head_diffs ? Object.keys(result.head_diffs) : [];
  for (const role of roles) {
    if (role === "original" || !roles.includes("original")) continue;
    const key = `${role} - original`;
    if (keys.includes(key) || result.roles[role]) out.push([key, role, "original"]);
  }
  return out;
}

function unitOf(target) {
  if (!target) return "logit";
  return target.kind === "logit" ? "logit" : "logit diff";
}

function heatmapHeight(nLayers) {
  return Math.max(230, Math.min(520, 90 + nLayers * 26));
}

function mean(xs) {
  return xs && xs.length ? xs.reduce((s, v) => s + v, 0) / xs.length : null;
}

function sub2(a, b) {
  return a.map((row, i) => row.map((v, j) => v - b[i][j]));
}

function slug(s) {
  return s.replace(/[^a-z0-9]+/gi, "-").replace(/^-|-$/g, "");
}

/** The text of prompt i where the result's inputs hold it (prompts, or a custom task's clean prompts). */
function promptText(out, i) {
  const inputs = out.inputs || {};
  if (inputs.prompts) return inputs.prompts[i] || null;
  if (inputs.task && inputs.task.name === "custom" && inputs.task.pairs && inputs.task.pairs[i]) return inputs.task.pairs[i].clean;
  return null;
}

/** Each role's target value on prompt i: "original 10.97 · LN-free 2.94". */
function targetsOf(result, roles, i) {
  return roles.map((r) => `${roleLabel(r)} ${fmt((result.roles[r].target_value || [])[i], 3)}`).join(" · ");
}

/** An option of the prompt selector: number, the prompt's last words, and the roles' target values. */
function promptLabel(out, i, targets) {
  const p = promptText(out, i);
  const task = out.inputs && out.inputs.task;
  const what = p ? `"${truncate(p, 40, { tail: true })}"` : task ? `${task.name} prompt ${i + 1}` : "";
  return `${i + 1}: ${what}${targets ? ` — ${targets}` : ""}`;
}
