// Hash routing: "#/dla/<id>?treatment=raw" -> {name: "dla", parts: ["<id>"], query: {treatment: "raw"}}.

export function parseHash(hash = location.hash) {
  let h = hash.replace(/^#/, "");
  if (!h.startsWith("/")) h = "/" + h;
  const [path, qs = ""] = h.split("?");
  const segments = path.split("/").filter(Boolean).map(decodeURIComponent);
  const query = Object.fromEntries(new URLSearchParams(qs));
  return { name: segments[0] || "home", parts: segments.slice(1), query, path };
}

export function buildHash(segments, query = {}) {
  const path = "#/" + segments.filter((s) => s !== undefined && s !== null && s !== "").map(encodeURIComponent).join("/");
  const qs = new URLSearchParams();
  for (const [k, v] of Object.entries(query)) if (v !== undefined && v !== null && v !== "") qs.set(k, v);
  const s = qs.toString();
  return s ? `${path}?${s}` : path;
}

/** Go to a route (a new history entry). */
export function navigate(segments, query) {
  location.hash = buildHash(segments, query);
}

/** Change the current URL's query without re-rendering the view (e.g. a toggle's state). */
export function setQuery(patch) {
  const cur = parseHash();
  const query = { ...cur.query, ...patch };
  const hash = buildHash([cur.name, ...cur.parts], query);
  history.replaceState(null, "", hash);
}

/** Replace the current route (no new history entry) and re-render. */
export function redirect(segments, query) {
  const hash = buildHash(segments, query);
  history.replaceState(null, "", hash);
  window.dispatchEvent(new HashChangeEvent("hashchange"));
}

/** The route of a stored result of `kind`. */
export function resultHash(kind, id, query) {
  return buildHash([kind, id], query);
}
