// Tiny DOM helpers: h() builds elements; no framework, no build step.

/**
 * h("div", {class: "card", onclick: fn, dataset: {x: 1}}, child, [children], "text")
 * Attributes: class, style (object or string), dataset, on<event> handlers, boolean props
 * (checked, disabled, selected, hidden, open, value) and any other attribute.
 */
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  if (attrs && (typeof attrs !== "object" || attrs instanceof Node || Array.isArray(attrs))) {
    children.unshift(attrs);
    attrs = null;
  }
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") el.className = Array.isArray(value) ? value.filter(Boolean).join(" ") : value;
    else if (key === "style" && typeof value === "object") Object.assign(el.style, value);
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key.startsWith("on") && typeof value === "function") el.addEventListener(key.slice(2).toLowerCase(), value);
    else if (["checked", "disabled", "selected", "hidden", "open", "value", "multiple", "readOnly"].includes(key)) el[key] = value;
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

export function clear(el) {
  while (el.firstChild) el.removeChild(el.firstChild);
  return el;
}

export function replace(el, ...children) {
  clear(el);
  return append(el, children);
}

export function debounce(fn, ms) {
  let timer = null;
  const wrapped = (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
  wrapped.cancel = () => clearTimeout(timer);
  return wrapped;
}

/** A segmented control: options [{value, label, title, disabled}], calls onChange(value). */
export function segmented(options, current, onChange, attrs = {}) {
  const el = h("div", { class: "segmented", role: "group", ...attrs });
  const render = (value) => {
    for (const btn of el.children) btn.classList.toggle("active", btn.dataset.value === value);
  };
  for (const o of options) {
    el.append(h("button", {
      type: "button", dataset: { value: o.value }, title: o.title || null, disabled: o.disabled,
      "aria-pressed": String(o.value === current),
      onclick: () => {
        render(o.value);
        for (const btn of el.children) btn.setAttribute("aria-pressed", String(btn.dataset.value === o.value));
        onChange(o.value);
      },
    }, o.label));
  }
  render(current);
  el.setValue = render;
  return el;
}

/** Visible text of a token: leading/trailing spaces shown as a middle dot, newlines as ⏎. */
export function tokenText(text) {
  return String(text).replace(/ /g, "·").replace(/\n/g, "⏎").replace(/\t/g, "⇥");
}

const REPLACEMENT = "\uFFFD";

/**
 * Display labels of `tokens` ([{text}], as POST /tokenize returns them) of `text`: byte-level tokens
 * that decode to "�" on their own show as their bytes ("<0xE2>") when each is one byte of the
 * character they form, else as that character with their part ("é 1/2").
 */
export function tokenLabels(text, tokens) {
  const labels = [];
  let at = 0;
  for (let i = 0; i < tokens.length;) {
    const t = tokens[i].text;
    if (!t.includes(REPLACEMENT)) {
      if (text.startsWith(t, at)) at += t.length;
      labels.push(tokenText(t));
      i += 1;
      continue;
    }
    let j = i;
    while (j < tokens.length && tokens[j].text.includes(REPLACEMENT)) j += 1;
    const next = j < tokens.length ? text.indexOf(tokens[j].text, at) : -1;
    const end = next >= 0 ? next : text.length;
    labels.push(...byteRunLabels(text.slice(at, end), tokens.slice(i, j).map((x) => x.text)));
    at = end;
    i = j;
  }
  return labels;
}

/** Labels of a run of tokens that only together form `span`. */
function byteRunLabels(span, texts) {
  const bytes = new TextEncoder().encode(span);
  if (texts.every((t) => t === REPLACEMENT) && bytes.length === texts.length) {
    return Array.from(bytes, (b) => `<0x${b.toString(16).toUpperCase().padStart(2, "0")}>`);
  }
  if (texts.length === 1) return [tokenText(span || texts[0])];
  return texts.map((_, k) => `${tokenText(span)} ${k + 1}/${texts.length}`);
}
