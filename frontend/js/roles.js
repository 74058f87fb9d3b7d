// Role names, labels and colours: the same everywhere (plots, badges, tables).

export const ROLE_ORDER = ["original", "ln_free", "control"];

export const ROLE_LABEL = {
  original: "original",
  ln_free: "LN-free",
  control: "control (LN kept)",
};

export const ROLE_COLOR = {
  original: "#3b5bdb",
  ln_free: "#e8590c",
  control: "#2b8a3e",
};

export function roleLabel(role) {
  return ROLE_LABEL[role] || role;
}

export function roleColor(role, i = 0) {
  return ROLE_COLOR[role] || ["#7048e8", "#0b7285", "#a61e4d"][i % 3];
}

/** Roles of an object (result.roles) in the canonical order, unknown roles last. */
export function sortRoles(roles) {
  const list = Array.isArray(roles) ? [...roles] : Object.keys(roles || {});
  return list.sort((a, b) => rank(a) - rank(b) || a.localeCompare(b));
}

function rank(role) {
  const i = ROLE_ORDER.indexOf(role);
  return i < 0 ? 99 : i;
}
