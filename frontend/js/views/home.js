// Home: pair picker (load state, device, load button), prompt entry with a live tokenization
// preview, task picker, and one card per available analysis kind with its options and a Run button.

import { ApiError, api, getKinds, submitAnalysis, tokenize } from "../api.js";
import { debounce, h, replace, segmented, tokenText } from "../dom.js";
import { clearErrors, field, showErrors } from "../fields.js";
import { followJob } from "../progress.js";
import { navigate } from "../router.js";
import { roleColor, roleLabel, sortRoles } from "../roles.js";
import { optionsForm } from "../schemaform.js";
import { kindTitle, notice } from "./common.js";

/** Built-in tasks whose templates and names are split into training and held-out sets. */
const TASKS_WITH_SPLIT = ["ioi", "greater_than"];

// The form survives navigation (module state), so "back" returns to what was typed.
const form = {
  pair: null,
  mode: "prompts",
  prompts: "When Mary and John went to the store, John gave a drink to",
  targetKind: "logit_diff",
  token: " Mary",
  other: " John",
  task: { name: "ioi", n_prompts: 16, seed: 0, split: "heldout" },
  pairs: [{
    clean: "When Mary and John went to the store, John gave a drink to",
    corrupt: "When Mary and John went to the store, Mary gave a drink to",
    correct: " Mary", wrong: " John",
  }],
  text: "",
  roles: null, // null: every role of the pair
};

const INPUT_NEEDS = {
  prompts_or_task: "prompts or a task",
  task: "a task (clean/corrupt pairs)",
  text: "free text (optional: the pair's evaluation text by default)",
  prompt: "one prompt (the first line)",
  none: "its options only",
};

const KIND_ORDER = ["dla", "attribution-patching", "activation-patching", "patching-fidelity", "confidence-neurons",
  "ln-stats", "loss", "circuit", "circuit-diff", "feature"];

let uid = 0;
const id = (name) => `home-${name}-${++uid}`;

export async function render({ root, signal }) {
  replace(root, h("p", { class: "muted loading-line" }, "Loading models and analyses…"));
  let models, kinds, tasks;
  try {
    [models, kinds, tasks] = await Promise.all([api("/models", { signal }), getKinds(), api("/tasks", { signal }).catch(() => [])]);
  } catch (e) {
    if (e.name === "AbortError") return;
    replace(root, notice(`Could not reach the lnscope API: ${e.message}`, { error: true }));
    return;
  }
  if (!form.pair || !models.pairs.some((p) => p.name === form.pair)) form.pair = models.default_pair;

  const ui = {}; // live elements
  const formRoot = h("div", { class: "home-form" });

  // -- pair ---------------------------------------------------------------------------
  const pairSelect = h("select", { id: id("pair"), "aria-label": "pair" },
    models.pairs.map((p) => h("option", { value: p.name, selected: p.name === form.pair }, p.name + (p.default ? " (default)" : ""))));
  const pairInfo = h("div", {});
  const workersBox = h("div", { class: "workers", id: "workers" });
  const loadBtn = h("button", { type: "button", class: "small", dataset: { action: "load" } }, "Load models");
  const pairCard = h("section", { class: "card", id: "pair-card" },
    h("div", { class: "card-head" }, h("h2", {}, "Models"),
      h("span", { class: "hint" }, `device `, h("b", {}, models.device), ` · dtype `, h("b", {}, models.dtype))),
    field({ label: "Pair", path: "pair", input: pairSelect }),
    pairInfo,
    h("div", { class: "row", style: { alignItems: "center" } }, loadBtn,
      h("span", { class: "small muted" }, "Models load on first use; loading now makes the first analysis fast.")),
    workersBox);

  // The model workers (this process's models, or one Ray actor per pair and role), refreshed while shown.
  const renderWorkers = (out) => {
    if (!out.workers.length) {
      replace(workersBox, h("p", { class: "small muted" }, `No model worker yet (executor: ${out.executor}).`));
      return;
    }
    const mib = (b) => `${(b / 2 ** 20).toFixed(b < 2 ** 24 ? 1 : 0)} MiB`;
    replace(workersBox, h("table", { class: "workers-table small" },
      h("caption", {}, `Model workers · executor ${out.executor}`),
      h("thead", {}, h("tr", {}, ["pair", "role", "node", "device", "memory", "state", "queue", "jobs done"]
        .map((c) => h("th", {}, c)))),
      h("tbody", {}, out.workers.map((w) => h("tr", { dataset: { role: w.role, pair: w.pair } },
        h("td", {}, w.pair),
        h("td", {}, h("span", { class: "swatch", style: { background: roleColor(w.role) } }), " ", roleLabel(w.role)),
        h("td", { class: "mono", title: w.node }, w.node.length > 14 ? w.node.slice(0, 12) + "…" : w.node),
        h("td", { class: "mono" }, w.device), h("td", {}, mib(w.memory_bytes)),
        h("td", {}, h("span", { class: ["badge", w.state], dataset: { state: w.state } }, w.state)),
        h("td", {}, String(w.queue_length)), h("td", {}, String(w.jobs_done)))))));
  };
  const refreshWorkers = async () => {
    try { renderWorkers(await api("/workers")); } catch { /* keep the last state */ }
  };
  const workersTimer = setInterval(() => {
    if (!document.body.contains(workersBox)) clearInterval(workersTimer);
    else if (!document.hidden) refreshWorkers();
  }, 5000);
  refreshWorkers();

  const renderPair = () => {
    const pair = models.pairs.find((p) => p.name === form.pair);
    if (!pair) return;
    replace(pairInfo,
      pair.description ? h("p", { class: "small muted", style: { margin: "0 0 6px" } }, pair.description) : null,
      h("div", { class: "roles-list" }, sortRoles(pair.roles.map((r) => r.role)).map((role) => {
        const r = pair.roles.find((x) => x.role === role);
        const src = r.hub_id ? `${r.hub_id}${r.revision ? "@" + r.revision : ""}` : r.path || "";
        const state = r.state.replace("_", " ");
        return h("div", { class: "role-row", dataset: { role } },
          h("span", { class: "swatch", style: { background: roleColor(role) } }),
          h("b", {}, roleLabel(role)),
          h("span", { class: "src", title: src }, src, r.available_locally ? "" : " · not downloaded"),
          h("span", { class: ["badge", r.state], dataset: { state: r.state } }, state),
          r.error ? h("div", { class: "err" }, r.error) : null);
      })));
    loadBtn.disabled = pair.roles.every((r) => r.state === "loaded");
    renderRoles();
  };

  const refreshModels = async () => {
    try {
      models = await api("/models");
      renderPair();
      refreshWorkers();
    } catch { /* keep the last state */ }
  };

  loadBtn.addEventListener("click", async () => {
    const pair = form.pair;
    loadBtn.disabled = true;
    loadBtn.textContent = "Loading…";
    clearErrors(pairCard);
    const poll = setInterval(refreshModels, 1000);
    try {
      await api(`/models/${encodeURIComponent(pair)}/load`, { method: "POST" });
    } catch (e) {
      showErrors([pairCard], [{ path: "pair", msg: e.message }]);
    } finally {
      clearInterval(poll);
      loadBtn.textContent = "Load models";
      await refreshModels();
    }
  });
  pairSelect.addEventListener("change", () => {
    form.pair = pairSelect.value;
    form.roles = null;
    renderPair();
    preview();
  });

  // -- inputs ---------------------------------------------------------------------------
  const promptsBox = h("textarea", { id: id("prompts"), rows: 4, spellcheck: "false", placeholder: "One prompt per line" }, form.prompts);
  promptsBox.value = form.prompts;
  const tokensOut = h("div", { class: "token-preview", "aria-live": "polite" });
  const targetKind = h("select", { id: id("target-kind") },
    h("option", { value: "logit_diff", selected: form.targetKind === "logit_diff" }, "logit difference"),
    h("option", { value: "logit", selected: form.targetKind === "logit" }, "one logit"),
    h("option", { value: "top", selected: form.targetKind === "top" }, "top logits (circuits; DLA needs a token)"));
  const tokenInput = h("input", { type: "text", id: id("token"), value: form.token, spellcheck: "false", autocomplete: "off" });
  const otherInput = h("input", { type: "text", id: id("other"), value: form.other, spellcheck: "false", autocomplete: "off" });
  const tokenHint = h("div", { class: "tok-meta" });
  const otherHint = h("div", { class: "tok-meta" });
  const otherField = field({ label: "minus token", path: "options.target.other", input: otherInput });
  otherField.append(otherHint);
  const tokenField = field({ label: "target token", path: "options.target.token", input: tokenInput });
  tokenField.append(tokenHint);
  const promptsPanel = h("div", { dataset: { panel: "prompts" } },
    field({ label: "Prompts (one per line)", path: "prompts", input: promptsBox }),
    tokensOut,
    h("div", { class: "field", dataset: { field: "options.target" } },
      h("div", { class: "field-label" }, "Target (read at each prompt's last token; for DLA and circuits)"),
      h("div", { class: "row top" }, field({ label: "kind", path: "options.target.kind", input: targetKind, cls: "narrow" }), tokenField, otherField),
      h("div", { class: "field-error", dataset: { errorFor: "options.target" } })));

  const taskSelect = h("select", { id: id("task") });
  const taskNames = (tasks.length ? tasks.map((t) => t.name) : ["ioi", "greater_than", "induction", "custom"]);
  for (const name of taskNames) taskSelect.append(h("option", { value: name, selected: name === form.task.name }, taskLabel(name)));
  const taskSummary = h("div", { class: "help" });
  const nPrompts = h("input", { type: "number", id: id("n"), min: 1, step: 1, value: form.task.n_prompts });
  const taskSeed = h("input", { type: "number", id: id("seed"), min: 0, step: 1, value: form.task.seed });
  const split = h("select", { id: id("split") }, ["heldout", "train", "all"].map((s) => h("option", { value: s, selected: s === form.task.split }, s)));
  const builtinRow = h("div", { class: "row top" },
    field({ label: "prompts", path: "task.n_prompts", input: nPrompts, cls: "narrow" }),
    field({ label: "seed", path: "task.seed", input: taskSeed, cls: "narrow" }),
    field({ label: "split", path: "task.split", input: split, cls: "narrow" }));
  const splitField = builtinRow.lastElementChild;
  const pairsBox = h("div", { class: "custom-pairs" });
  const pairsField = field({ label: "Clean / corrupt pairs", path: "task.pairs", input: pairsBox });
  const taskField = field({ label: "Task", path: "task", input: taskSelect });
  taskField.insertBefore(taskSummary, taskField.querySelector(".field-error"));
  const taskPanel = h("div", { dataset: { panel: "task" } }, taskField, builtinRow, pairsField);

  const renderPairs = () => {
    replace(pairsBox, form.pairs.map((p, i) => {
      const input = (key, placeholder, mono = true) => {
        const el = h("input", { type: "text", value: p[key], placeholder, spellcheck: "false", class: mono ? "mono" : null });
        el.addEventListener("input", () => { p[key] = el.value; });
        return field({ label: key, path: `task.pairs.${i}.${key}`, input: el });
      };
      return h("div", { class: "card", style: { padding: "10px 12px", marginBottom: "8px", boxShadow: "none" }, dataset: { pairIndex: i } },
        h("div", { class: "card-head", style: { marginBottom: "4px" } }, h("span", { class: "small muted" }, `pair ${i + 1}`),
          form.pairs.length > 1 ? h("button", { type: "button", class: "small link danger", onclick: () => { form.pairs.splice(i, 1); renderPairs(); } }, "remove") : null),
        input("clean", "clean prompt"), input("corrupt", "corrupted prompt"),
        h("div", { class: "row top" }, input("correct", "correct answer token"), input("wrong", "wrong answer token")));
    }), h("button", {
      type: "button", class: "small", onclick: () => {
        const last = form.pairs[form.pairs.length - 1] || {};
        form.pairs.push({ clean: last.clean || "", corrupt: last.corrupt || "", correct: last.wrong || "", wrong: last.correct || "" });
        renderPairs();
      },
    }, "+ add pair"));
  };
  const renderTask = () => {
    const t = tasks.find((x) => x.name === form.task.name);
    taskSummary.textContent = t ? `${t.summary}${t.metric ? ` — metric: ${t.metric}` : ""}` : "";
    const custom = form.task.name === "custom";
    builtinRow.hidden = custom;
    splitField.hidden = !TASKS_WITH_SPLIT.includes(form.task.name);  // induction has no held-out split
    pairsField.hidden = !custom;
    if (custom) renderPairs();
  };
  taskSelect.addEventListener("change", () => { form.task.name = taskSelect.value; renderTask(); renderKinds(); });
  nPrompts.addEventListener("input", () => { form.task.n_prompts = Number(nPrompts.value); });
  taskSeed.addEventListener("input", () => { form.task.seed = Number(taskSeed.value); });
  split.addEventListener("change", () => { form.task.split = split.value; });

  const textBox = h("textarea", { id: id("text"), rows: 3, placeholder: "Leave empty to use the pair's held-out evaluation text" });
  textBox.value = form.text;
  textBox.addEventListener("input", () => { form.text = textBox.value; });

  const modeSwitch = segmented([
    { value: "prompts", label: "Prompts" },
    { value: "task", label: "Task" },
  ], form.mode, (v) => { form.mode = v; renderMode(); renderKinds(); }, { "aria-label": "input mode", id: "input-mode" });
  const renderMode = () => {
    promptsPanel.hidden = form.mode !== "prompts";
    taskPanel.hidden = form.mode !== "task";
  };

  const rolesBox = h("div", { class: "choice-group" });
  const rolesField = field({ label: "Roles", path: "roles", input: rolesBox, help: "Every checked model is analysed with the same inputs." });
  function renderRoles() {
    const pair = models.pairs.find((p) => p.name === form.pair);
    const roles = sortRoles(pair ? pair.roles.map((r) => r.role) : []);
    replace(rolesBox, roles.map((role) => {
      const box = h("input", { type: "checkbox", value: role, checked: !form.roles || form.roles.includes(role) });
      box.addEventListener("change", () => {
        const chosen = [...rolesBox.querySelectorAll("input:checked")].map((b) => b.value);
        form.roles = chosen.length === roles.length ? null : chosen;
      });
      return h("label", {}, box, h("span", { class: "swatch", style: { background: roleColor(role) } }), roleLabel(role));
    }));
  }

  const inputCard = h("section", { class: "card", id: "inputs-card" },
    h("div", { class: "card-head" }, h("h2", {}, "Inputs"), modeSwitch),
    promptsPanel, taskPanel,
    field({ label: "Free text (loss, confidence neurons)", path: "text", input: textBox }),
    rolesField);

  // -- tokenization preview ----------------------------------------------------------------
  let previewSeq = 0;
  const preview = debounce(async () => {
    const seq = ++previewSeq;
    const lines = promptsBox.value.split("\n").map((l) => l.replace(/\s+$/, "")).filter((l) => l.trim());
    const pair = form.pair;
    if (!lines.length) { replace(tokensOut); return; }
    try {
      const outs = await Promise.all(lines.slice(0, 8).map((l) => tokenize(pair, l, true)));
      if (seq !== previewSeq) return;
      replace(tokensOut, outs.map((o, i) => h("div", { class: "tok-line" },
        lines.length > 1 ? h("div", { class: "tok-line-label" }, `prompt ${i + 1}`) : null,
        h("div", { class: "tokens", dataset: { prompt: i } }, o.tokens.map((t, j) => h("span", {
          class: ["tok", j === 0 && t.text === "<|endoftext|>" && "special"], title: `position ${j} · id ${t.id}`,
        }, tokenText(t.text)))),
        h("div", { class: ["tok-meta", o.n_tokens > o.n_ctx && "bad"] }, `${o.n_tokens} tokens (context ${o.n_ctx})`))),
        lines.length > 8 ? h("div", { class: "tok-meta" }, `… and ${lines.length - 8} more prompts`) : null);
    } catch (e) {
      if (seq !== previewSeq) return;
      replace(tokensOut, h("div", { class: "tok-meta bad" }, `tokenizer: ${e.message}`));
    }
  }, 250);
  const checkToken = async (input, hint) => {
    const text = input.value;
    if (!text) { hint.textContent = ""; return; }
    try {
      const o = await tokenize(form.pair, text, false);
      if (input.value !== text) return;
      hint.className = ["tok-meta", o.n_tokens !== 1 && "bad"].filter(Boolean).join(" ");
      hint.textContent = o.n_tokens === 1 ? `one token (id ${o.tokens[0].id})`
        : `${o.n_tokens} tokens: ${o.tokens.map((t) => JSON.stringify(t.text)).join(" ")} — a target must be a single token`;
    } catch (e) {
      hint.textContent = "";
    }
  };
  const checkTokens = debounce(() => { checkToken(tokenInput, tokenHint); if (form.targetKind === "logit_diff") checkToken(otherInput, otherHint); }, 250);
  promptsBox.addEventListener("input", () => { form.prompts = promptsBox.value; preview(); });
  tokenInput.addEventListener("input", () => { form.token = tokenInput.value; checkTokens(); });
  otherInput.addEventListener("input", () => { form.other = otherInput.value; checkTokens(); });
  const renderTargetKind = () => { otherField.hidden = form.targetKind !== "logit_diff"; otherHint.hidden = otherField.hidden; };
  targetKind.addEventListener("change", () => { form.targetKind = targetKind.value; renderTargetKind(); checkTokens(); });

  // -- analyses -----------------------------------------------------------------------------
  const kindList = h("div", { class: "kind-list" });
  const sortedKinds = [...kinds].sort((a, b) => order(a.name) - order(b.name));
  const cards = new Map();
  for (const kind of sortedKinds) {
    const schema = kind.options_schema || {};
    const opts = optionsForm(schema, { skip: ["target"] });
    const runBtn = h("button", { type: "button", class: "primary", dataset: { kind: kind.name }, "aria-label": `Run ${kind.name}` }, "Run");
    const needs = h("div", { class: "needs" });
    const err = h("div", { class: "card-error", role: "alert", hidden: true });
    const progressBox = h("div", { class: "card-progress" });
    const card = h("div", { class: "kind-card", dataset: { kind: kind.name } },
      h("h3", {}, kindTitle(kind.name), h("span", { class: "badge mono" }, kind.name)),
      h("div", { class: "desc" }, kind.description),
      needs,
      opts.count ? h("details", {}, h("summary", {}, `Options (${opts.count})`), opts.el) : null,
      err, progressBox,
      h("div", { class: "run-row" }, runBtn));
    runBtn.addEventListener("click", () => run(kind, card, opts, runBtn, err, progressBox));
    cards.set(kind.name, { card, runBtn, needs, kind });
    kindList.append(card);
  }
  function renderKinds() {
    for (const { runBtn, needs, kind } of cards.values()) {
      let problem = null;
      if (kind.inputs === "task" && form.mode !== "task") problem = "needs a task: switch the input to Task";
      if (kind.inputs === "prompt" && form.mode !== "prompts") problem = "needs a prompt: switch the input to Prompts";
      if (kind.name === "feature") problem = "opens from a node of a circuit";
      runBtn.disabled = !!problem;
      needs.textContent = problem ? `Input: ${INPUT_NEEDS[kind.inputs] || kind.inputs} — ${problem}` : `Input: ${INPUT_NEEDS[kind.inputs] || kind.inputs}`;
    }
  }

  const promptLines = () => form.prompts.split("\n").map((l) => l.replace(/\s+$/, "")).filter((l) => l.trim());
  /** The target of the form ("top logits" is a circuit default: DLA, which needs a token, reads it as one logit). */
  function formTarget() {
    const t = { kind: form.targetKind === "top" ? "logit" : form.targetKind, token: form.token };
    if (form.targetKind === "logit_diff") t.other = form.other;
    return t;
  }

  function body(kind, opts) {
    const b = { pair: form.pair, options: opts.values() };
    if (form.roles) b.roles = form.roles;
    const schema = kind.options_schema || {};
    const takesTarget = !!(schema.properties && schema.properties.target);
    if (kind.inputs === "prompts_or_task" || kind.inputs === "task") {
      if (form.mode === "prompts" && kind.inputs === "prompts_or_task") {
        b.prompts = promptLines();
        if (!b.prompts.length) b.prompts = [""]; // the server names the empty prompt box
        if (takesTarget) b.options.target = formTarget();
      } else {
        b.task = form.task.name === "custom"
          ? { name: "custom", pairs: form.pairs.map((p) => ({ ...p })) }
          : { name: form.task.name, n_prompts: form.task.n_prompts, seed: form.task.seed,
              ...(TASKS_WITH_SPLIT.includes(form.task.name) ? { split: form.task.split } : {}) };
      }
    }
    if (kind.inputs === "prompt") {
      b.prompts = [promptLines()[0] || ""];
      if (takesTarget && form.targetKind !== "top") b.options.target = formTarget();
    }
    if (kind.inputs === "text" && form.text.trim()) b.text = [form.text];
    return b;
  }

  async function run(kind, card, opts, runBtn, err, progressBox) {
    clearErrors(formRoot);
    err.hidden = true;
    replace(progressBox);
    runBtn.disabled = true;
    runBtn.textContent = "Submitting…";
    try {
      const { status, data } = await submitAnalysis(kind.name, body(kind, opts));
      if (status === 200) {
        navigate([kind.name, data.id], data.cached ? { cached: 1 } : undefined);  // the page marks a cached rerun
        return;
      }
      runBtn.textContent = "Running…";
      const job = await followJob(data.id, progressBox, { signal });
      if (job.status === "done") navigate([kind.name, job.id]);
      else {
        err.textContent = `${job.status}: ${job.error || "no result"}`;
        err.hidden = false;
      }
    } catch (e) {
      if (e.name === "AbortError") return;
      const fields = e instanceof ApiError && e.fields.length ? e.fields
        : e instanceof ApiError && e.status === 409 ? [{ path: "pair", msg: e.message }] : [];
      const leftover = fields.length ? showErrors([card, formRoot], fields.map(refine)) : [e.message];
      if (leftover.length) {
        err.textContent = leftover.join("; ");
        err.hidden = false;
      }
    } finally {
      runBtn.textContent = "Run";
      renderKinds();
    }
  }

  const analysesCard = h("section", { class: "card", id: "analyses-card" },
    h("div", { class: "card-head" }, h("h2", {}, "Analyses"),
      h("span", { class: "hint" }, "Each runs on every checked role; results are stored and get a permanent link.")),
    kindList);

  formRoot.append(h("div", { class: "home-grid" }, h("div", {}, pairCard, inputCard), h("div", {}, analysesCard)));
  replace(root, 
    h("div", { class: "page-head" }, h("div", {},
      h("h1", {}, "Compare a model with its LayerNorm-free twin"),
      h("div", { class: "sub" }, "Pick a pair, enter prompts or choose a task, and run an analysis. Every view shows the original, "
        + "the LN-free model and the LN-kept control side by side on the same colour scale."))),
    formRoot);
  renderPair();
  renderMode();
  renderTask();
  renderTargetKind();
  renderKinds();
  preview();
  checkTokens();
}

/** A task error that names a custom pair's field ("pair 0: 'correct' ...") goes to that field. */
function refine(f) {
  const m = f.path === "task" && /^pair (\d+): '(clean|corrupt|correct|wrong)'/.exec(f.msg);
  return m ? { ...f, path: `task.pairs.${m[1]}.${m[2]}` } : f;
}

function order(name) {
  const i = KIND_ORDER.indexOf(name);
  return i < 0 ? 50 : i;
}

function taskLabel(name) {
  return { ioi: "IOI (indirect object identification)", greater_than: "Greater-than", induction: "Induction", custom: "Custom clean/corrupt pairs" }[name] || name;
}
