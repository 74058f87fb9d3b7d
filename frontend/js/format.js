// Number formatting shared by every view.

export function fmt(x, digits = 3) {
  if (x === null || x === undefined || Number.isNaN(x)) return "–";
  if (typeof x !== "number") return String(x);
  if (x === 0) return "0";
  const a = Math.abs(x);
  if (a >= 1e4 || a < 1e-3) return x.toExponential(Math.max(1, digits - 1));
  return Number(x.toPrecision(digits)).toString();
}

export function fmtSigned(x, digits = 3) {
  if (x === null || x === undefined || Number.isNaN(x)) return "–";
  return (x > 0 ? "+" : "") + fmt(x, digits);
}

export function fmtPct(x, digits = 3) {
  if (x === null || x === undefined) return "–";
  return `${fmt(x, digits)}%`;
}

export function fmtCI(lo, hi, digits = 3) {
  if (lo === null || lo === undefined || hi === null || hi === undefined) return "";
  return `[${fmt(lo, digits)}, ${fmt(hi, digits)}]`;
}

export function fmtTime(iso) {
  if (!iso) return "–";
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return iso;
  return d.toLocaleString(undefined, { year: "numeric", month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

export function fmtDuration(s) {
  if (s === null || s === undefined) return "–";
  if (s < 1) return `${Math.round(s * 1000)} ms`;
  if (s < 120) return `${s.toFixed(1)} s`;
  return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
}

export function signClass(x) {
  return x > 0 ? "pos" : x < 0 ? "neg" : "";
}

/** `s` cut to `n` characters with an ellipsis (from the end when `tail`, to keep a prompt's last words). */
export function truncate(s, n, { tail = false } = {}) {
  const t = String(s ?? "");
  if (t.length <= n) return t;
  return tail ? `…${t.slice(t.length - n + 1)}` : `${t.slice(0, n - 1)}…`;
}

/** `message` behind `prefix` ("prompt 2: "), unless the message already names it: server messages number
 * prompts and pairs from 1, as the page does. */
export function labelled(message, prefix = "") {
  const text = String(message ?? "");
  const named = prefix.replace(/:\s*$/, "");
  return named && text.toLowerCase().includes(named.toLowerCase()) ? text : prefix + text;
}

/** Options as "key=value · key=value" (nested objects flattened), for one-line summaries. */
export function optionsDigest(options, maxLength = 90) {
  const parts = [];
  // a list of objects (e.g. intervention edits) as their values, "ablate_head 3 1"
  const item = (v) => (v && typeof v === "object" ? Object.values(v).filter((x) => typeof x !== "object").join(" ") : v);
  const walk = (obj, prefix) => {
    for (const [k, v] of Object.entries(obj || {})) {
      if (v === null || v === undefined) continue;
      if (typeof v === "object" && !Array.isArray(v)) walk(v, `${prefix}${k}.`);
      else parts.push(`${prefix}${k}=${Array.isArray(v) ? v.map(item).join(",") : typeof v === "string" ? JSON.stringify(v) : v}`);
    }
  };
  walk(options, "");
  return truncate(parts.join(" · "), maxLength);
}
