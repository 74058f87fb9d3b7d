// Form fields that can show the server's message next to the input that caused it.

import { labelled } from "./format.js";
import { h } from "./dom.js";

/** A labelled field; `path` is the API location it answers for ("options.target.token", "prompts"). */
export function field({ label, path, input, help, cls }) {
  return h("div", { class: ["field", cls], dataset: { field: path } },
    label ? h("label", { for: input && input.id ? input.id : null }, label) : null,
    input,
    help ? h("div", { class: "help" }, help) : null,
    h("div", { class: "field-error", dataset: { errorFor: path }, role: "alert" }));
}

export function clearErrors(root) {
  for (const el of root.querySelectorAll(".field.has-error")) {
    el.classList.remove("has-error");
    const err = el.querySelector(":scope > .field-error");
    if (err) err.textContent = "";
  }
}

/** The field answering for `path` (the longest registered prefix), searched in `roots` in order. */
export function findField(roots, path) {
  const parts = path.split(".");
  for (let n = parts.length; n > 0; n--) {
    const p = parts.slice(0, n).join(".");
    for (const root of roots) {
      if (!root) continue;
      const el = root.querySelector(`.field[data-field="${CSS.escape(p)}"]`);
      if (el) return { el, matched: p, rest: parts.slice(n) };
    }
  }
  return null;
}

/**
 * Show 422 field errors next to their fields. Returns the messages no field took
 * (to show in a general error box). A list index the field does not take is named in the message.
 */
export function showErrors(roots, fields) {
  const leftover = [];
  let first = null;
  for (const f of fields) {
    const hit = f.path ? findField(roots, f.path) : null;
    if (!hit) {
      leftover.push(f.path ? `${f.path}: ${f.msg}` : f.msg);
      continue;
    }
    const idx = hit.rest.length && /^\d+$/.test(hit.rest[0]) ? Number(hit.rest[0]) : null;
    const what = hit.matched === "prompts" && idx !== null ? `prompt ${idx + 1}: `
      : idx !== null ? `item ${idx + 1}: ` : hit.rest.length ? `${hit.rest.join(".")}: ` : "";
    hit.el.classList.add("has-error");
    const err = hit.el.querySelector(":scope > .field-error");
    const msg = labelled(f.msg, what);
    err.textContent = err.textContent ? `${err.textContent}; ${msg}` : msg;
    if (!first) first = hit.el;
  }
  if (first) {
    const input = first.querySelector("input, textarea, select");
    first.scrollIntoView({ block: "center", behavior: "smooth" });
    if (input) input.focus({ preventScroll: true });
  }
  return leftover;
}
