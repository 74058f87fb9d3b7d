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
