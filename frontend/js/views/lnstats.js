// LN statistics: LN-scale trajectories per token and layer (models with LN), the frozen
// constants of the LN-free model, residual-stream norms; and the trio's cross-entropy table.

import { tokenize } from "../api.js";
import { h, replace, segmented, tokenLabels } from "../dom.js";
import { fmt, fmtCI, fmtSigned, truncate } from "../format.js";
import { SEQUENTIAL, heatmapLayout, minMax, range, render } from "../plots.js";
import { setQuery } from "../router.js";
import { roleColor, roleLabel, sortRoles } from "../roles.js";
import { loadResult, manifestCard, notice, resultHeader, roleTitle } from "./common.js";

const SITE_LABEL = { ln1: "ln1 (before attention)", ln2: "ln2 (before the MLP)", ln_final: "ln_final (before the unembedding)" };

/** n colours from dark blue to yellow (viridis-like), for layer 0 .. n-1. */
function layerColors(n) {
  const stops = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [53, 183, 121], [122, 209, 81]];
  return range(n).map((i) => {
    const t = n === 1 ? 0 : i / (n - 1);
    const p = t * (stops.length - 1), k = Math.min(stops.length - 2, Math.floor(p)), f = p - k;
    const c = stops[k].map((v, j) => Math.round(v + f * (stops[k + 1][j] - v)));
    return `rgb(${c.join(",")})`;
  });
}

export async function renderStats({ root, route, signal }) {
  const id = route.parts[0];
  const out = await loadResult(root, id, signal);
  if (!out) return;
  const result = out.result;
  const roles = sortRoles(result.roles);
  const withLN = roles.filter((r) => result.roles[r].has_ln);
  const first = result.roles[roles[0]];
  const nPrompts = first.n_prompts;
  const sites = ["ln1", "ln2", "ln_final"].filter((s) => withLN.some((r) => result.roles[r][`${s}_scale_mean`]));
  const state = {
    site: sites.includes(route.query.site) ? route.query.site : sites[0] || "ln1",
    prompt: route.query.prompt !== undefined && Number(route.query.prompt) < nPrompts ? Number(route.query.prompt) : "mean",
  };
  const prompts = (out.inputs && out.inputs.prompts) || [];
  const tokensOf = promptTokens(out, signal);
  let posLabels = await tokensOf(state.prompt === "mean" ? (nPrompts === 1 ? 0 : null) : state.prompt);

  const siteToggle = segmented(sites.map((s) => ({ value: s, label: s, title: SITE_LABEL[s] })), state.site,
    (s) => { state.site = s; setQuery({ site: s }); drawScales(); }, { id: "site-toggle", "aria-label": "LayerNorm" });
  const hasPer = withLN.some((r) => result.roles[r].ln1_scale);
  const promptSel = nPrompts > 1 && hasPer ? h("select", { id: "ln-prompt", "aria-label": "prompt" },
    h("option", { value: "mean", selected: state.prompt === "mean" }, `mean over ${nPrompts} prompts`),
    range(nPrompts).map((i) => h("option", { value: i, selected: state.prompt === i, title: prompts[i] || null },
      prompts[i] ? `${i + 1}: "${truncate(prompts[i], 40, { tail: true })}"` : `prompt ${i + 1}`))) : null;
  if (promptSel) promptSel.addEventListener("change", async () => {
    state.prompt = promptSel.value === "mean" ? "mean" : Number(promptSel.value);
    setQuery({ prompt: state.prompt === "mean" ? undefined : state.prompt });
    posLabels = await tokensOf(state.prompt === "mean" ? null : state.prompt);
    drawScales();
    drawNormMaps();
  });

  const scalePlots = Object.fromEntries(withLN.map((r) => [r, h("div", { class: "plot tall", id: `ln-scale-${r}`, dataset: { role: r } })]));
  const frozenBoxes = roles.filter((r) => !result.roles[r].has_ln).map((r) => frozenCard(result.roles[r], r));
  const scalesCard = h("section", { class: "card" },
    h("div", { class: "card-head" }, h("h2", {}, "LayerNorm scale per token"),
      h("div", { class: "toolbar", style: { margin: 0 } }, h("span", { class: "label" }, "LN"), siteToggle, promptSel)),
    h("p", { class: "small muted", style: { marginTop: 0 } }, "The scale σ = √(var(x) + ε) each LayerNorm divides by, at every position; one line per layer. "
      + "The LN-free model divides by frozen constants instead."),
    withLN.length ? h("div", { class: "roles-grid" }, withLN.map((r) => h("div", { class: "plot-cell" }, roleTitle(r), scalePlots[r]))) : notice("No role of this result has LayerNorm."),
    frozenBoxes.length ? h("div", { class: "roles-grid", style: { marginTop: "12px" } }, frozenBoxes) : null);

  const normPlot = h("div", { class: "plot", id: "ln-resid-norms" });
  const normMaps = Object.fromEntries(roles.map((r) => [r, h("div", { class: "plot", id: `ln-norm-map-${r}`, dataset: { role: r } })]));
  const normsCard = h("section", { class: "card" },
    h("div", { class: "card-head" }, h("h2", {}, "Residual-stream norms"), h("span", { class: "hint" }, "‖resid_pre‖ entering each layer, then the final residual")),
    normPlot,
    h("div", { class: "roles-grid", style: { marginTop: "8px" } }, roles.map((r) => h("div", { class: "plot-cell" }, roleTitle(r), normMaps[r]))));

  replace(root, resultHeader(out, { sub: "How strongly each LayerNorm rescales the residual stream, per token and layer, and how large the residual stream grows." }),
    scalesCard, normsCard, layerTable(result, roles), manifestCard(out));

  function series(r, key) {
    if (state.prompt === "mean") return r[`${key}_mean`];
    const per = r[key];
    return per ? per[state.prompt] : r[`${key}_mean`];
  }
  function xLabels(n) {
    return range(n).map((i) => (posLabels && posLabels[i] !== undefined ? `${i} ${posLabels[i]}` : String(i)));
  }

  function drawScales() {
    const site = state.site;
    const all = [];
    const traces = {};
    for (const role of withLN) {
      const r = result.roles[role];
      const data = series(r, `${site}_scale`);
      if (!data) { traces[role] = []; continue; }
      if (site === "ln_final") {
        traces[role] = [{ type: "scatter", mode: "lines+markers", name: "ln_final", y: data, x: xLabels(data.length),
          line: { color: roleColor(role), width: 2 }, marker: { size: 4 }, hovertemplate: "pos %{x}<br>σ %{y:.4g}<extra>ln_final</extra>" }];
        all.push(data);
      } else {
        const colors = layerColors(data.length);
        traces[role] = data.map((row, l) => ({
          type: "scatter", mode: "lines+markers", name: `L${l}`, y: row, x: xLabels(row.length),
          line: { color: colors[l], width: 1.8 }, marker: { size: 3.5 }, connectgaps: false,
          hovertemplate: `L${l} ${site} · pos %{x}<br>σ %{y:.4g}<extra></extra>`,
        }));
        all.push(data);
      }
    }
    const [lo, hi] = minMax(all);
    for (const role of withLN) {
      render(scalePlots[role], traces[role], {
        title: `${roleLabel(role)} · ${SITE_LABEL[site]}`, height: 380,
        xaxis: { title: { text: "position" }, type: "category", tickangle: -50, tickfont: { size: 10 }, gridcolor: "#f1f3f5" },
        yaxis: { title: { text: "LN scale σ (residual units)" }, range: [Math.max(0, lo - (hi - lo) * 0.05), hi + (hi - lo) * 0.05], gridcolor: "#eef0f4" },
        legend: { orientation: "v", x: 1.02, y: 1, title: { text: "layer" } }, margin: { r: 60, b: 80 },
      });
    }
  }

  function drawNormMaps() {
    const data = Object.fromEntries(roles.map((r) => [r, series(result.roles[r], "resid_norm")]));
    const [, hi] = minMax(Object.values(data));
    for (const role of roles) {
      const z = data[role];
      if (!z) continue;
      const n = z.length;
      render(normMaps[role], [{
        type: "heatmap", z, x: xLabels(z[0].length), y: range(n).map((l) => (l === n - 1 ? "final" : `L${l}`)),
        zmin: 0, zmax: hi, colorscale: SEQUENTIAL, xgap: 1, ygap: 1, hoverongaps: false,
        colorbar: { title: { text: "‖x‖", side: "right" }, thickness: 11, outlinewidth: 0 },
        hovertemplate: "%{y} pos %{x}<br>‖resid‖ %{z:.4g}<extra></extra>",
      }], heatmapLayout({ title: `${roleLabel(role)} · ‖resid‖ per token`, xTitle: "position", height: Math.max(220, 90 + n * 24),
        extra: { xaxis: { type: "category", tickangle: -50, tickfont: { size: 10 } }, margin: { b: 80 } } }));
    }
  }

  render(normPlot, roles.map((role, i) => {
    const y = result.roles[role].resid_norm_layer_mean;
    return { type: "scatter", mode: "lines+markers", name: roleLabel(role), y, x: y.map((_, l) => (l === y.length - 1 ? "final" : `L${l}`)),
      line: { color: roleColor(role, i), width: 2.2 }, marker: { size: 6 }, hovertemplate: `${roleLabel(role)} %{x}: %{y:.4g}<extra></extra>` };
  }), {
    title: "Mean residual norm per layer (every real token)", height: 300,
    yaxis: { title: { text: "‖resid‖ (L2)" }, type: "log", gridcolor: "#eef0f4" }, xaxis: { title: { text: "residual stream entering" } },
    legend: { orientation: "h", y: 1.02, yanchor: "bottom", x: 1, xanchor: "right" }, margin: { t: 56 },
  });
  drawScales();
  drawNormMaps();
}

function frozenCard(r, role) {
  const rows = (r.frozen || []).map((f) => h("tr", {},
    h("td", {}, f.layer === null ? f.site : `${f.site} L${f.layer}`),
    h("td", { class: "num" }, fmt(f.sigma, 4)), h("td", { class: "num" }, fmt(f.gain_mean, 4)), h("td", { class: "num" }, fmt(f.gamma_mean, 4))));
  return h("div", { class: "plot-cell", dataset: { role } }, roleTitle(role, "no normalisation: frozen constants"),
    rows.length ? h("div", { class: "table-wrap" }, h("table", { class: "data", id: `ln-frozen-${role}` },
      h("thead", {}, h("tr", {}, h("th", {}, "LN"), h("th", { class: "num" }, "frozen σ"), h("th", { class: "num" }, "mean γ/σ"), h("th", { class: "num" }, "mean γ"))),
      h("tbody", {}, rows))) : h("p", { class: "muted small" }, "No constants reported."),
    (r.notes || []).map((n) => h("p", { class: "small muted", style: { margin: "6px 0 0" } }, n)));
}

function layerTable(result, roles) {
  const rows = (result.layer_table || []).map((row) => h("tr", {},
    h("td", {}, row.layer === null ? row.site : `${row.site} L${row.layer}`),
    roles.map((r) => h("td", { class: "num", title: row.kinds[r] || "" }, row.values[r] === null || row.values[r] === undefined ? "–" : fmt(row.values[r], 4),
      row.kinds[r] === "frozen_sigma" ? h("span", { class: "muted small" }, " (frozen)") : null))));
  return h("section", { class: "card" }, h("div", { class: "card-head" }, h("h2", {}, "Mean LN scale per layer"),
    h("span", { class: "hint" }, "models with LN: mean σ over every real token; LN-free: its frozen σ (– when unknown)")),
  h("div", { class: "table-wrap" }, h("table", { class: "data", id: "ln-layer-table" },
    h("thead", {}, h("tr", {}, h("th", {}, "LayerNorm"), roles.map((r) => h("th", { class: "num" }, roleLabel(r))))),
    h("tbody", {}, rows))));
}

/** tokens(i): display labels of prompt i's tokens (null for null or a prompt the inputs do not hold). */
function promptTokens(out, signal) {
  const prompts = (out.inputs && out.inputs.prompts) || [];
  return async (i) => {
    if (i === null || !prompts[i]) return null;
    try {
      const t = await tokenize(out.pair, prompts[i], true, signal);
      return tokenLabels(prompts[i], t.tokens);
    } catch (e) {
      if (e.name === "AbortError") throw e;
      return null;
    }
  };
}

// -- loss ---------------------------------------------------------------------------------------
export async function renderLoss({ root, route, signal }) {
  const id = route.parts[0];
  const out = await loadResult(root, id, signal);
  if (!out) return;
  const result = out.result;
  const table = result.table || [];
  const roles = table.map((r) => r.role);
  const barPlot = h("div", { class: "plot", id: "loss-bars" });
  const posPlot = h("div", { class: "plot", id: "loss-positions" });
  const first = result.roles[roles[0]] || {};
  replace(root, resultHeader(out, { sub: "Held-out cross-entropy of every model on the same tokens, with bootstrap CIs: the paper's table." }),
    h("div", { class: "grid grid-2" },
      h("section", { class: "card" }, h("div", { class: "card-head" }, h("h2", {}, "Cross-entropy"),
        h("span", { class: "hint" }, `nats per predicted token · context ${first.context ?? "–"} · ${first.n_sequences ?? "–"} sequences`)),
      h("div", { class: "table-wrap" }, h("table", { class: "data", id: "loss-table" },
        h("thead", {}, h("tr", {}, ["model", "CE (nats)", "95% CI", "gap vs original", "tokens"].map((x, i) => h("th", { class: i ? "num" : null }, x)))),
        h("tbody", {}, table.map((row) => h("tr", { dataset: { role: row.role } },
          h("td", {}, roleTitle(row.role)), h("td", { class: "num" }, fmt(row.ce, 5)), h("td", { class: "num" }, fmtCI(row.ci_low, row.ci_high, 5)),
          h("td", { class: "num" }, row.role === "original" ? "—" : fmtSigned(row.gap_vs_original, 4)), h("td", { class: "num" }, String(row.n_tokens))))))),
      barPlot),
      h("section", { class: "card" }, h("h2", {}, "Loss by position"), posPlot)),
    manifestCard(out));
  const [lo, hi] = minMax(table.map((r) => [r.ci_low ?? r.ce, r.ci_high ?? r.ce]));
  render(barPlot, [{
    type: "bar", x: roles.map(roleLabel), y: table.map((r) => r.ce), marker: { color: roles.map((r, i) => roleColor(r, i)) },
    error_y: { type: "data", symmetric: false, color: "#1d2330", thickness: 1.2, width: 6,
      array: table.map((r) => (r.ci_high !== null ? r.ci_high - r.ce : 0)), arrayminus: table.map((r) => (r.ci_low !== null ? r.ce - r.ci_low : 0)) },
    hovertemplate: "%{x}: %{y:.4f} nats<extra></extra>",
  }], {
    title: "Cross-entropy with 95% CI", height: 280, showlegend: false,
    yaxis: { title: { text: "CE (nats / token)" }, range: [Math.max(0, lo - (hi - lo) * 1.5 - 0.01), hi + (hi - lo) * 0.5 + 0.01], gridcolor: "#eef0f4" },
  });
  render(posPlot, roles.map((role, i) => {
    const y = (result.roles[role] || {}).per_position_mean || [];
    return { type: "scatter", mode: "lines", name: roleLabel(role), y, x: y.map((_, j) => j + 1), line: { color: roleColor(role, i), width: 1.8 },
      hovertemplate: `${roleLabel(role)} · predicting token %{x}: %{y:.4g} nats<extra></extra>` };
  }), {
    title: "Mean loss per position", height: 320,
    xaxis: { title: { text: "position of the predicted token" }, gridcolor: "#f1f3f5" }, yaxis: { title: { text: "loss (nats)" }, gridcolor: "#eef0f4" },
    legend: { orientation: "h", y: 1.02, yanchor: "bottom", x: 1, xanchor: "right" }, margin: { t: 56 },
  });
  if (!table.length) replace(root, notice("This loss result has no table."));
}
