// The lnscope REST API (/api/v1): fetch wrapper, errors with their fields, job polling.

export const API = "/api/v1";
const TOKEN_KEY = "lnscope.apiToken";

/** An API error: `status`, `message`, and `fields` [{path, loc, msg}] for 422 validation errors. */
export class ApiError extends Error {
  constructor(status, detail, url) {
    super(messageOf(detail, status));
    this.name = "ApiError";
    this.status = status;
    this.detail = detail;
    this.url = url;
    this.fields = Array.isArray(detail) ? detail.map(fieldOf) : [];
  }
}

/** "options.target.token" from ["body", "options", "target", "token"]. */
export function locPath(loc) {
  return (loc || []).filter((p, i) => !(i === 0 && (p === "body" || p === "query" || p === "path"))).join(".");
}

function fieldOf(err) {
  const msg = String(err.msg || err.message || "invalid").replace(/^Value error, /, "");
  return { loc: err.loc || [], path: locPath(err.loc), msg };
}

function messageOf(detail, status) {
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) return detail.map((e) => {
    const f = fieldOf(e);
    return f.path ? `${f.path}: ${f.msg}` : f.msg;
  }).join("; ");
  if (detail && typeof detail === "object") return JSON.stringify(detail);
  return `HTTP ${status}`;
}

export function getToken() {
  try { return localStorage.getItem(TOKEN_KEY) || ""; } catch { return ""; }
}

export function setToken(token) {
  try {
    if (token) localStorage.setItem(TOKEN_KEY, token);
    else localStorage.removeItem(TOKEN_KEY);
  } catch { /* storage disabled */ }
  // The API docs (/docs, /redoc) are opened by navigation, which sends no header: they accept this cookie.
  document.cookie = token ? `lnscope_token=${encodeURIComponent(token)}; path=/; SameSite=Strict`
    : "lnscope_token=; path=/; max-age=0; SameSite=Strict";
}

const listeners = new Set();
/** Called with every ApiError (the shell shows a banner for 401). */
export function onApiError(fn) { listeners.add(fn); }

/** fetch JSON from the API: api("/models"), api("/analyses/dla", {method: "POST", body}). */
export async function api(path, { method = "GET", body, query, signal, raw = false } = {}) {
  let url = path.startsWith("/api/") ? path : API + path;
  if (query) {
    const qs = new URLSearchParams();
    for (const [k, v] of Object.entries(query)) if (v !== undefined && v !== null && v !== "") qs.set(k, v);
    const s = qs.toString();
    if (s) url += (url.includes("?") ? "&" : "?") + s;
  }
  const headers = { Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const token = getToken();
  if (token) headers.Authorization = `Bearer ${token}`;
  let response;
  try {
    response = await fetch(url, { method, headers, body: body === undefined ? undefined : JSON.stringify(body), signal });
  } catch (exc) {
    if (exc.name === "AbortError") throw exc;
    const err = new ApiError(0, `the server did not answer (${exc.message})`, url);
    listeners.forEach((fn) => fn(err));
    throw err;
  }
  let data = null;
  const text = await response.text();
  if (text) {
    try { data = JSON.parse(text); } catch { data = text; }
  }
  if (!response.ok) {
    const err = new ApiError(response.status, data && typeof data === "object" && "detail" in data ? data.detail : data, url);
    listeners.forEach((fn) => fn(err));
    throw err;
  }
  return raw ? { status: response.status, data } : data;
}

// -- cached look-ups ------------------------------------------------------------------------
let kindsPromise = null;
/** GET /kinds once per page load: [{name, description, inputs, options_schema}]. */
export function getKinds({ refresh = false } = {}) {
  if (!kindsPromise || refresh) kindsPromise = api("/kinds").catch((e) => { kindsPromise = null; throw e; });
  return kindsPromise;
}

export async function kindAvailable(name) {
  const kinds = await getKinds();
  return kinds.some((k) => k.name === name);
}

const tokenCache = new Map();
/** POST /tokenize, cached per (pair, text, bos). */
export async function tokenize(pair, text, prependBos = true, signal) {
  const key = JSON.stringify([pair, text, prependBos]);
  if (tokenCache.has(key)) return tokenCache.get(key);
  const out = await api("/tokenize", { method: "POST", body: { pair, text, prepend_bos: prependBos }, signal });
  if (tokenCache.size > 500) tokenCache.clear();
  tokenCache.set(key, out);
  return out;
}

// -- jobs -------------------------------------------------------------------------------------
/**
 * Poll GET /jobs/{id} until it is done, failed or cancelled. onUpdate(job) after each poll.
 * Resolves with the final job; `signal` stops polling (rejects with AbortError).
 */
export async function pollJob(id, onUpdate, { signal } = {}) {
  let delay = 300;
  for (;;) {
    if (signal && signal.aborted) throw new DOMException("aborted", "AbortError");
    const job = await api(`/jobs/${encodeURIComponent(id)}`, { signal });
    onUpdate && onUpdate(job);
    if (["done", "failed", "cancelled"].includes(job.status)) return job;
    await sleep(delay, signal);
    delay = Math.min(1500, delay * 1.25);
  }
}

export function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    const t = setTimeout(resolve, ms);
    if (signal) signal.addEventListener("abort", () => { clearTimeout(t); reject(new DOMException("aborted", "AbortError")); }, { once: true });
  });
}

/** POST /analyses/{kind}: {status: 200, data: ResultOut} (cached or inline) or {status: 202, data: JobInfo}. */
export function submitAnalysis(kind, body) {
  return api(`/analyses/${encodeURIComponent(kind)}`, { method: "POST", body, raw: true });
}

export function getResult(id, signal) {
  return api(`/results/${encodeURIComponent(id)}`, { signal });
}
