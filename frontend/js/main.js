// lnscope's web frontend: hash routes -> views. Plain ES modules, no build step.

import { ApiError, api, getToken, onApiError, setToken } from "./api.js";
import { h, replace } from "./dom.js";
import { purgeAll } from "./plots.js";
import { parseHash, redirect } from "./router.js";
import * as circuit from "./views/circuit.js";
import { jobFailure, notice } from "./views/common.js";
import * as confidence from "./views/confidence.js";
import * as dla from "./views/dla.js";
import * as feature from "./views/feature.js";
import * as generic from "./views/generic.js";
import * as historyView from "./views/history.js";
import * as home from "./views/home.js";
import * as intervene from "./views/intervene.js";
import * as job from "./views/job.js";
import * as lnstats from "./views/lnstats.js";
import * as patching from "./views/patching.js";

/** Route name -> view. A result's route is its kind: #/<kind>/<result id>. */
const VIEWS = {
  home: home.render,
  dla: dla.render,
  "attribution-patching": patching.render,
  "activation-patching": patching.render,
  "patching-fidelity": patching.render,
  patching: patching.render,
  "confidence-neurons": confidence.render,
  "ln-stats": lnstats.renderStats,
  loss: lnstats.renderLoss,
  circuit: circuit.render,
  "circuit-diff": circuit.render,
  feature: feature.render,
  intervene: intervene.render,
  history: historyView.render,
  job: job.render,
  result: resultRedirect,
};

const NAV_OF = { home: "home", history: "history", circuit: "circuit", "circuit-diff": "circuit", feature: "circuit" };

const root = document.getElementById("app");
let current = null; // {controller}

async function resultRedirect({ root, route, signal }) {
  const id = route.parts[0];
  const out = await api(`/jobs/${encodeURIComponent(id)}`, { signal });
  if (out.status === "done") redirect([out.kind, id]);
  else if (out.status === "failed" || out.status === "cancelled") replace(root, jobFailure(out));
  else redirect(["job", id]);
}

async function show() {
  if (current) current.controller.abort();
  const controller = new AbortController();
  current = { controller };
  const route = parseHash();
  for (const a of document.querySelectorAll("[data-nav]")) a.classList.toggle("active", a.dataset.nav === (NAV_OF[route.name] || ""));
  purgeAll(root);
  const view = VIEWS[route.name] || (route.parts.length ? generic.render : null);
  const page = h("div", { class: "view", dataset: { view: route.name } });
  replace(root, page);
  document.title = route.name === "home" ? "lnscope" : `${route.name} · lnscope`;
  if (!view) {
    page.append(notice(`No view called "${route.name}".`, { children: [" ", h("a", { href: "#/" }, "Home")] }));
    return;
  }
  page.append(h("p", { class: "muted loading-line" }, "Loading…"));
  try {
    await view({ root: page, route, signal: controller.signal });
    page.dataset.ready = "true";
  } catch (e) {
    if (e.name === "AbortError" || controller.signal.aborted) return;
    console.error(e);
    const msg = e instanceof ApiError && e.status === 404 ? `Not found: ${e.message}` : e.message || String(e);
    replace(page, notice(msg, { error: true, children: [" ", h("a", { href: "#/" }, "Home")] }));
    page.dataset.ready = "error";
  }
}

// -- server status in the top bar, API-token banner ---------------------------------------------
async function status() {
  const el = document.getElementById("server-status");
  try {
    const health = await api("/health");
    replace(el, h("span", {}, h("span", { class: "dot" }), `lnscope ${health.version}`), h("span", {}, `device ${health.device}`));
  } catch (e) {
    replace(el, h("span", {}, h("span", { class: "dot down" }), "server unreachable"));
  }
}

function tokenBanner() {
  const banner = document.getElementById("banner");
  const input = h("input", { type: "password", placeholder: "API token", value: getToken() });
  replace(banner, "This server needs an API token (Authorization: Bearer).", input,
    h("button", { type: "button", class: "small", onclick: () => { setToken(input.value.trim()); banner.hidden = true; show(); } }, "Use token"));
  banner.hidden = false;
}

onApiError((e) => { if (e.status === 401) tokenBanner(); });
window.addEventListener("hashchange", show);
status();
show();
