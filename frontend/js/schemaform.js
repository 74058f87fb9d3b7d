// A small form from a kind's options JSON schema (GET /kinds): numbers, booleans, enums, lists.

import { h } from "./dom.js";
import { field } from "./fields.js";

function resolve(schema, root) {
  if (schema && schema.$ref) {
    const name = schema.$ref.split("/").pop();
    return (root.$defs || root.definitions || {})[name] || {};
  }
  return schema || {};
}

/** {type, nullable, enum, items} of a property, looking through anyOf [X, null]. */
function describe(prop, root) {
  let s = resolve(prop, root);
  let nullable = false;
  if (s.anyOf) {
    const options = s.anyOf.map((x) => resolve(x, root));
    nullable = options.some((x) => x.type === "null");
    const real = options.filter((x) => x.type !== "null");
    if (real.length === 1) s = { ...real[0], ...Object.fromEntries(Object.entries(s).filter(([k]) => k !== "anyOf")) };
    else return { type: "unsupported" };
  }
  if (s.const !== undefined) return { type: "unsupported" };
  const items = s.items ? resolve(s.items, root) : null;
  return { type: s.type, nullable, enum: s.enum, items, schema: s };
}

let uid = 0;

/**
 * Build fields for the simple options of `schema` (skipping names in `skip`).
 * Returns {el, values()} where values() holds only what differs from the defaults.
 */
export function optionsForm(schema, { skip = [], pathPrefix = "options" } = {}) {
  const props = (schema && schema.properties) || {};
  const getters = [];
  const fields = [];
  for (const [name, prop] of Object.entries(props)) {
    if (skip.includes(name)) continue;
    const d = describe(prop, schema);
    const def = prop.default;
    const id = `opt-${++uid}-${name}`;
    const label = name.replace(/_/g, " ");
    const help = prop.description || (d.schema && d.schema.description);
    const path = `${pathPrefix}.${name}`;
    let input, get;
    if (d.type === "boolean") {
      input = h("input", { type: "checkbox", id, checked: !!def });
      get = () => (input.checked === !!def ? undefined : input.checked);
      fields.push(field({ path, input: h("label", { class: "check" }, input, label), help }));
      getters.push([name, get]);
      continue;
    } else if (d.enum) {
      input = h("select", { id }, d.enum.map((v) => h("option", { value: v, selected: v === def }, String(v))));
      get = () => (input.value === def ? undefined : input.value);
    } else if (d.type === "integer" || d.type === "number") {
      const s = d.schema;
      input = h("input", {
        type: "number", id, value: def ?? "", placeholder: def === null || def === undefined ? "default" : "",
        step: d.type === "integer" ? 1 : "any",
        min: s.minimum ?? (s.exclusiveMinimum !== undefined ? s.exclusiveMinimum : null), max: s.maximum ?? null,
      });
      get = () => {
        if (input.value === "") return undefined;
        const v = Number(input.value);
        return v === def ? undefined : v;
      };
    } else if (d.type === "array" && d.items && d.items.enum) {
      const chosen = new Set(def || []);
      const boxes = d.items.enum.map((v) => h("input", { type: "checkbox", value: v, checked: chosen.has(v) }));
      input = h("div", { class: "choice-group", id }, boxes.map((b) => h("label", {}, b, String(b.value))));
      get = () => {
        const v = boxes.filter((b) => b.checked).map((b) => b.value);
        return JSON.stringify(v) === JSON.stringify(def || []) ? undefined : v;
      };
    } else if (d.type === "array" && d.items && (d.items.type === "string" || d.items.type === "integer")) {
      input = h("input", { type: "text", id, placeholder: (prop.examples && prop.examples[0] ? prop.examples[0].join(", ") : "comma-separated") });
      get = () => {
        const v = input.value.split(",").map((x) => x.trim()).filter(Boolean);
        if (!v.length) return undefined;
        return d.items.type === "integer" ? v.map(Number) : v;
      };
    } else if (d.type === "string") {
      input = h("input", { type: "text", id, value: def ?? "" });
      get = () => (input.value === "" || input.value === def ? undefined : input.value);
    } else {
      continue; // objects (e.g. the DLA target) have their own inputs
    }
    fields.push(field({ label, path, input, help, cls: "narrowish" }));
    getters.push([name, get]);
  }
  const el = h("div", { class: "opts" }, fields.length ? fields : h("div", { class: "muted small" }, "No options."));
  return {
    el,
    count: fields.length,
    values() {
      const out = {};
      for (const [name, get] of getters) {
        const v = get();
        if (v !== undefined) out[name] = v;
      }
      return out;
    },
  };
}
