// Confidence (entropy) neurons: rho vs W_out norm per role (hover: the neuron), total vs direct
// effect on the loss, and the LN-mediated fraction per role.

import { h, replace, segmented } from "../dom.js";
import { fmt, fmtPct } from "../format.js";
import { maxAbs, referenceLine, render as plot } from "../plots.js";
import { setQuery } from "../router.js";
import { roleColor, roleLabel, sortRoles } from "../roles.js";
import { loadResult, manifestCard, notice, resultHeader, roleTitle } from "./common.js";

export async function render({ root, route, signal }) {
  const id = route.parts[0];
  const out = await loadResult(root, id, signal);
  if (!out) return;
  const result = out.result;
  const roles = sortRoles(result.roles);
  if (!roles.length) { replace(root, notice("No roles in this result.")); return; }
  const state = { effect: route.query.effect === "entropy" ? "entropy" : "loss" };
  const first = result.roles[roles[0]];

  // -- rho vs norm -------------------------------------------------------------------------
  const scatterPlots = Object.fromEntries(roles.map((r) => [r, h("div", { class: "plot tall", id: `conf-scatter-${r}`, dataset: { role: r } })]));
  const scatterCard = h("section", { class: "card" },
    h("div", { class: "card-head" }, h("h2", {}, `Null-space fraction ρ vs ‖W_out‖ · layer ${result.layer}`),
      h("span", { class: "hint" }, `every neuron of the layer; ringed: candidates; ρ on a log scale; dashed: random-direction ρ = √(k/d_model)`)),
    h("div", { class: "roles-grid" }, roles.map((r) => h("div", { class: "plot-cell" }, roleTitle(r, `k = ${result.roles[r].k}`), scatterPlots[r]))));

  // -- effects -------------------------------------------------------------------------------
  const effectToggle = segmented([{ value: "loss", label: "loss" }, { value: "entropy", label: "entropy" }], state.effect,
    (v) => { state.effect = v; setQuery({ effect: v }); drawEffects(); }, { id: "effect-toggle", "aria-label": "effect on" });
  const effectPlots = Object.fromEntries(roles.map((r) => [r, h("div", { class: "plot", id: `conf-effects-${r}`, dataset: { role: r } })]));
  const effectsCard = h("section", { class: "card" },
    h("div", { class: "card-head" }, h("h2", {}, "Total vs direct effect of mean-ablating each candidate"),
      h("div", { class: "toolbar", style: { margin: 0 } }, h("span", { class: "label" }, "effect on"), effectToggle)),
    h("p", { class: "small muted", style: { marginTop: 0 } }, "Direct: the ln_final scale frozen at its clean value. "
      + "Total minus direct is what goes through the final LayerNorm (none without LN)."),
    h("div", { class: "roles-grid" }, roles.map((r) => h("div", { class: "plot-cell" }, roleTitle(r), effectPlots[r]))));

  const fractionPlot = h("div", { class: "plot", id: "conf-fraction" });
  const top = result.top_candidate;
  const fractionCard = h("section", { class: "card" },
    h("div", { class: "card-head" }, h("h2", {}, "LN-mediated fraction"),
      h("span", { class: "hint" }, top ? `neuron ${top.neuron}${top.flagged ? " (flagged entropy-neuron-like in " + roleLabel(top.from_role) + ")" : " (top of the ranking; none flagged)"}` : "")),
    top ? fractionPlot : h("p", { class: "muted" }, "No top candidate."),
    h("p", { class: "small muted" }, "1 − |ΔLoss_direct| / |ΔLoss_total|: the share of the neuron's effect that acts through the final LayerNorm scale."));

  const tableBox = h("div", { class: "roles-grid" }, roles.map((role) => neuronTable(result.roles[role], role)));
  const tableCard = h("section", { class: "card" }, h("div", { class: "card-head" }, h("h2", {}, "Candidates"),
    h("span", { class: "hint" }, `ranked by ${first.rank_by}; ✓ = entropy-neuron-like (high norm, high ρ, low LogitVar)`)), tableBox);

  replace(root, resultHeader(out, {
    sub: "Entropy neurons write into the (near) null space of the unembedding and act by changing the final LayerNorm scale. "
      + "Without LayerNorm that path does not exist.",
  }), h("div", { class: "stat-row", style: { marginBottom: "16px" } }, roles.map((role) => {
    const r = result.roles[role];
    return h("div", { class: "stat", dataset: { role } },
      h("div", { class: "label" }, h("span", { class: "swatch", style: { background: roleColor(role) } }), `${roleLabel(role)}: clean loss`),
      h("div", { class: "value" }, fmt(r.clean_loss, 4)),
      h("div", { class: "ci" }, `nats/token · entropy ${fmt(r.clean_entropy, 4)} · ${r.n_tokens} tokens`));
  })), scatterCard, effectsCard, h("div", { class: "grid grid-2" }, fractionCard, topCard(top, roles)), tableCard, manifestCard(out));

  // shared axes across roles
  const normMax = Math.max(...roles.map((r) => Math.max(...result.roles[r].weights.w_out_norm))) * 1.05;
  const rhoRange = logRange(roles.flatMap((r) => [...result.roles[r].weights.rho, result.roles[r].rho_random_baseline]));
  for (const [i, role] of roles.entries()) {
    const r = result.roles[role];
    const w = r.weights;
    const ids = w.w_out_norm.map((_, n) => `${r.layer}.${n}`);
    const cand = new Map(r.neurons.map((n) => [n.index, n]));
    const flagged = r.neurons.filter((n) => n.entropy_neuron_like);
    const traces = [
      {
        type: "scatter", mode: "markers", name: "neurons", x: w.w_out_norm, y: w.rho, text: ids,
        customdata: w.logit_var, marker: { color: "#adb5bd", size: 5, opacity: 0.65 },
        hovertemplate: "neuron %{text}<br>‖W_out‖ %{x:.3g}<br>ρ %{y:.3g}<br>LogitVar %{customdata:.3g}<extra></extra>",
      },
      {
        type: "scatter", mode: "markers", name: "candidates", x: [...cand.values()].map((n) => n.w_out_norm), y: [...cand.values()].map((n) => n.rho),
        text: [...cand.values()].map((n) => n.neuron), customdata: [...cand.values()].map((n) => n.rank),
        marker: { color: "rgba(0,0,0,0)", size: 10, line: { color: roleColor(role, i), width: 1.8 } },
        hovertemplate: "candidate %{text} (rank %{customdata})<br>‖W_out‖ %{x:.3g}<br>ρ %{y:.3g}<extra></extra>",
      },
    ];
    if (flagged.length) traces.push({
      type: "scatter", mode: "markers", name: "entropy-neuron-like", x: flagged.map((n) => n.w_out_norm), y: flagged.map((n) => n.rho),
      text: flagged.map((n) => n.neuron), marker: { color: roleColor(role, i), size: 9, symbol: "diamond" },
      hovertemplate: "flagged %{text}<br>‖W_out‖ %{x:.3g}<br>ρ %{y:.3g}<extra></extra>",
    });
    const baseline = referenceLine(r.rho_random_baseline, `random direction ρ = √(${r.k}/${r.d_model}) = ${fmt(r.rho_random_baseline, 3)}`, { log: true });
    plot(scatterPlots[role], traces, {
      title: `${roleLabel(role)} · layer ${r.layer} (${r.d_mlp} neurons)`, height: 380,
      xaxis: { title: { text: "‖W_out[n]‖ (L2)" }, range: [0, normMax], gridcolor: "#f1f3f5", zeroline: false },
      yaxis: { title: { text: "ρ: fraction in W_U's bottom-k space (log)" }, type: "log", range: rhoRange, exponentformat: "power", gridcolor: "#f1f3f5", zeroline: false },
      shapes: [baseline.shape], annotations: [baseline.annotation],
      legend: { orientation: "h", y: -0.2 },
    });
  }

  function drawEffects() {
    const e = state.effect;
    const key = (kind) => (e === "loss" ? `abs_dloss_${kind}` : `abs_dentropy_${kind}`);
    const ymax = maxAbs(roles.map((r) => result.roles[r].neurons.map((n) => [n[key("total")], n[key("direct")]]))) * 1.08;
    for (const [i, role] of roles.entries()) {
      const ns = result.roles[role].neurons.slice(0, 15);
      const x = ns.map((n) => n.neuron);
      plot(effectPlots[role], [
        { type: "bar", name: "total", x, y: ns.map((n) => n[key("total")]), marker: { color: roleColor(role, i) },
          hovertemplate: `%{x} total |Δ${e}| %{y:.4g}<extra></extra>` },
        { type: "bar", name: "direct (LN scale frozen)", x, y: ns.map((n) => n[key("direct")]), marker: { color: roleColor(role, i), opacity: 0.4 },
          hovertemplate: `%{x} direct |Δ${e}| %{y:.4g}<extra></extra>` },
      ], {
        title: `${roleLabel(role)} · mean |Δ${e}| per token`, barmode: "group", height: 320,
        yaxis: { title: { text: `|Δ ${e}| (nats)` }, range: [0, ymax], gridcolor: "#eef0f4" },
        xaxis: { title: { text: "neuron (layer.index)" }, type: "category", tickangle: -45 },
        legend: { orientation: "h", y: 1.02, yanchor: "bottom", x: 1, xanchor: "right" }, margin: { t: 56, b: 70 },
      });
    }
  }

  function drawFraction() {
    if (!top) return;
    const rs = roles.filter((r) => top.by_role[r]);
    plot(fractionPlot, [
      { type: "bar", name: "loss", x: rs.map(roleLabel), y: rs.map((r) => top.by_role[r].ln_mediated_fraction_loss),
        marker: { color: rs.map((r, i) => roleColor(r, i)) }, hovertemplate: "%{x}: %{y:.3f} of |ΔLoss|<extra>loss</extra>" },
      { type: "bar", name: "entropy", x: rs.map(roleLabel), y: rs.map((r) => top.by_role[r].ln_mediated_fraction_entropy),
        marker: { color: rs.map((r, i) => roleColor(r, i)), opacity: 0.45 }, hovertemplate: "%{x}: %{y:.3f} of |ΔEntropy|<extra>entropy</extra>" },
    ], {
      title: `Neuron ${top.neuron}: LN-mediated fraction (solid: loss, light: entropy)`, barmode: "group", height: 300, showlegend: false,
      yaxis: { title: { text: "fraction" }, zeroline: true, zerolinecolor: "#9aa3b5", gridcolor: "#eef0f4" },
    });
  }

  drawEffects();
  drawFraction();
}

/** A log10 axis range covering the positive values (zeros cannot be drawn on a log axis), padded. */
function logRange(values) {
  const pos = values.filter((v) => typeof v === "number" && v > 0);
  if (!pos.length) return [-3, 0];
  const lo = Math.log10(Math.min(...pos)), hi = Math.log10(Math.max(...pos));
  const pad = Math.max(0.15, (hi - lo) * 0.06);
  return [lo - pad, hi + pad];
}

function topCard(top, roles) {
  if (!top) return h("section", { class: "card" }, h("h2", {}, "Top candidate"), h("p", { class: "muted" }, "none"));
  const rs = roles.filter((r) => top.by_role[r]);
  return h("section", { class: "card" },
    h("div", { class: "card-head" }, h("h2", {}, `Neuron ${top.neuron} in every model`),
      h("span", { class: "hint" }, top.flagged ? `flagged in ${roleLabel(top.from_role)}` : `top of ${roleLabel(top.from_role)}'s ranking`)),
    h("div", { class: "table-wrap" }, h("table", { class: "data compact", id: "conf-top" },
      h("thead", {}, h("tr", {}, ["model", "|ΔL| total", "|ΔL| direct", "LN-med. loss", "LN-med. entropy", ""].map((x, i) => h("th", { class: i && i < 5 ? "num" : null }, x)))),
      h("tbody", {}, rs.map((r) => {
        const c = top.by_role[r];
        const pct = (v) => (v === null || v === undefined ? "–" : fmtPct(100 * v, 3));
        return h("tr", { dataset: { role: r } }, h("td", {}, roleTitle(r)), h("td", { class: "num" }, fmt(c.abs_dloss_total, 3)),
          h("td", { class: "num" }, fmt(c.abs_dloss_direct, 3)), h("td", { class: "num" }, pct(c.ln_mediated_fraction_loss)),
          h("td", { class: "num" }, pct(c.ln_mediated_fraction_entropy)), h("td", {}, c.entropy_neuron_like ? "✓" : ""));
      })))),
    h("p", { class: "small muted" }, "Without a final LayerNorm scale the direct effect is the total effect: the LN-mediated fraction is 0."));
}

function neuronTable(r, role) {
  const rows = r.neurons.slice(0, 10).map((n) => h("tr", {},
    h("td", { class: "num" }, String(n.rank)), h("td", { class: "mono" }, n.neuron),
    h("td", { class: "num" }, fmt(n.w_out_norm, 3)), h("td", { class: "num" }, fmt(n.rho, 3)),
    h("td", { class: "num" }, fmt(n.abs_dloss_total, 3)), h("td", { class: "num" }, fmt(n.abs_dloss_direct, 3)),
    h("td", { class: "num" }, n.ln_mediated_fraction_loss === null ? "–" : fmtPct(100 * n.ln_mediated_fraction_loss, 3)),
    h("td", {}, n.entropy_neuron_like ? "✓" : "")));
  return h("div", { class: "plot-cell", dataset: { role } }, roleTitle(role),
    h("div", { class: "table-wrap" }, h("table", { class: "data compact", id: `conf-table-${role}` },
      h("thead", {}, h("tr", {}, ["#", "neuron", "‖W_out‖", "ρ", "|ΔL| tot", "|ΔL| dir", "LN-med.", ""].map((x, i) => h("th", { class: i > 1 && i < 7 ? "num" : null }, x)))),
      h("tbody", {}, rows))));
}
