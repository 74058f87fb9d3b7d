// History: stored results, newest first, filterable by pair, kind and status; each row shows its
// inputs (what ran, roles, options) and links to its view.

import { api, getKinds, getResult } from "../api.js";
import { h, replace } from "../dom.js";
import { fmtDuration, fmtTime } from "../format.js";
import { buildHash, setQuery } from "../router.js";
import { inputsDigest, kindTitle, notice, roleBadge } from "./common.js";

const PAGE = 25;
const FETCHES = 4; // result look-ups in flight at once (the list does not carry the inputs)

export async function render({ root, route, signal }) {
  const q = { pair: route.query.pair || "", kind: route.query.kind || "", status: route.query.status || "", offset: Number(route.query.offset || 0) };
  const [models, kinds] = await Promise.all([api("/models", { signal }), getKinds().catch(() => [])]);
  const kindNames = [...new Set([...kinds.map((k) => k.name), q.kind].filter(Boolean))];
  const pairSel = h("select", { id: "history-pair", "aria-label": "pair" }, h("option", { value: "" }, "all pairs"),
    models.pairs.map((p) => h("option", { value: p.name, selected: p.name === q.pair }, p.name)));
  const kindSel = h("select", { id: "history-kind", "aria-label": "kind" }, h("option", { value: "" }, "all kinds"),
    kindNames.map((k) => h("option", { value: k, selected: k === q.kind }, k)));
  const statusSel = h("select", { id: "history-status", "aria-label": "status" }, h("option", { value: "" }, "any status"),
    ["done", "running", "queued", "failed", "cancelled"].map((s) => h("option", { value: s, selected: s === q.status }, s)));
  const table = h("div", { class: "table-wrap" });
  const pager = h("div", { class: "row", style: { marginTop: "10px", alignItems: "center" } });

  const load = async () => {
    replace(table, h("p", { class: "muted" }, "Loading…"));
    const page = await api("/results", { query: { pair: q.pair, kind: q.kind, status: q.status, limit: PAGE, offset: q.offset }, signal });
    if (!page.items.length) {
      replace(table, h("div", { class: "empty" }, "No stored results match. Run an analysis from ", h("a", { href: "#/" }, "the home page"), "."));
      replace(pager);
      return;
    }
    replace(table, h("table", { class: "data", id: "history-table" },
      h("thead", {}, h("tr", {}, ["created", "analysis", "pair", "inputs", "status", "time", ""].map((x) => h("th", {}, x)))),
      h("tbody", {}, page.items.map((it) => {
        const href = it.status === "done" ? buildHash([it.kind, it.id]) : buildHash(["job", it.id]);
        return h("tr", { class: "clickable", dataset: { id: it.id, kind: it.kind }, onclick: (e) => { if (e.target.tagName !== "A") location.hash = href; } },
          h("td", { class: "nowrap" }, fmtTime(it.created_at)),
          h("td", {}, h("a", { href }, kindTitle(it.kind)), h("div", { class: "small muted mono" }, it.kind)),
          h("td", {}, it.pair),
          h("td", { class: "history-inputs", dataset: { inputsFor: it.id } }, it.inputs ? inputsCell(it.inputs) : h("span", { class: "muted small" }, "…")),
          h("td", {}, h("span", { class: ["badge", it.status] }, it.status),
            it.status === "running" ? h("span", { class: "small muted" }, ` ${Math.round(it.progress * 100)}% ${it.stage}`) : null,
            it.error ? h("div", { class: "small", style: { color: "var(--bad)", maxWidth: "520px" } }, it.error) : null),
          h("td", { class: "num" }, fmtDuration(it.timings && it.timings.run_s)),
          h("td", {}, h("a", { href, class: "small" }, it.status === "done" ? "open →" : "job →")));
      }))));
    fillInputs(table, page.items.filter((it) => !it.inputs), signal);
    const last = Math.min(page.total, q.offset + page.items.length);
    replace(pager,
      h("span", { class: "small muted" }, `${q.offset + 1}–${last} of ${page.total}`),
      h("button", { type: "button", class: "small", disabled: q.offset === 0, onclick: () => { q.offset = Math.max(0, q.offset - PAGE); sync(); } }, "← newer"),
      h("button", { type: "button", class: "small", disabled: last >= page.total, onclick: () => { q.offset += PAGE; sync(); } }, "older →"));
  };
  const sync = () => {
    setQuery({ pair: q.pair || undefined, kind: q.kind || undefined, status: q.status || undefined, offset: q.offset || undefined });
    load().catch((e) => { if (e.name !== "AbortError") replace(table, notice(e.message, { error: true })); });
  };
  for (const [sel, key] of [[pairSel, "pair"], [kindSel, "kind"], [statusSel, "status"]]) {
    sel.addEventListener("change", () => { q[key] = sel.value; q.offset = 0; sync(); });
  }
  replace(root, 
    h("div", { class: "page-head" }, h("div", {}, h("h1", {}, "History"),
      h("div", { class: "sub" }, "Every analysis is stored with its inputs and manifest; each row reopens its view."))),
    h("section", { class: "card" },
      h("div", { class: "toolbar" }, h("span", { class: "label" }, "Filter"), pairSel, kindSel, statusSel,
        h("span", { class: "spacer" }), h("button", { type: "button", class: "small", onclick: () => sync() }, "Refresh")),
      table, pager));
  await load();
}

/** What a row ran on: prompts or task, the roles, and an options digest. */
function inputsCell(inputs) {
  const d = inputsDigest(inputs);
  return h("div", { class: "inputs-cell" },
    h("div", { class: "small" }, d.what),
    d.roles.length ? h("div", { class: "small role-badges" }, d.roles.map((r) => roleBadge(r))) : null,
    d.options ? h("div", { class: "small muted mono options-digest", title: JSON.stringify(inputs.options || {}, null, 1) }, d.options) : null);
}

/** Fill each row's inputs cell from its stored result, FETCHES at a time. */
async function fillInputs(table, items, signal) {
  const queue = [...items];
  const worker = async () => {
    for (let it = queue.shift(); it; it = queue.shift()) {
      const cell = table.querySelector(`[data-inputs-for="${CSS.escape(it.id)}"]`);
      try {
        const out = await getResult(it.id, signal);
        if (cell) replace(cell, inputsCell(out.inputs || {}));
      } catch (e) {
        if (e.name === "AbortError") return;
        if (cell) replace(cell, h("span", { class: "muted small" }, "–"));
      }
    }
  };
  await Promise.all(Array.from({ length: FETCHES }, worker));
}
