// A job's progress bar with its stage, polled from GET /jobs/{id}; cancel with DELETE.

import { api, pollJob } from "./api.js";
import { h } from "./dom.js";
import { fmtDuration } from "./format.js";

export function progressBar(label = "queued") {
  const bar = h("div", { class: "progress-bar", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": 100, "aria-valuenow": 0 });
  const stage = h("span", { class: "progress-stage" }, label);
  const pct = h("span", { class: "progress-pct nowrap" }, "");
  const el = h("div", { class: "progress indeterminate", dataset: { status: "queued" } },
    h("div", { class: "progress-track" }, bar), h("div", { class: "progress-meta" }, stage, pct));
  const started = Date.now();
  return {
    el,
    update(job) {
      const p = Math.max(0, Math.min(1, job.progress || 0));
      el.dataset.status = job.status;
      el.classList.toggle("indeterminate", job.status === "queued" || (job.status === "running" && p === 0));
      bar.style.width = `${(p * 100).toFixed(1)}%`;
      bar.setAttribute("aria-valuenow", String(Math.round(p * 100)));
      const what = job.status === "queued" ? "queued" : job.stage || job.status;
      stage.textContent = what;
      stage.title = what;
      pct.textContent = job.status === "running"
        ? `${Math.round(p * 100)}% · ${fmtDuration((Date.now() - started) / 1000)}` : job.status;
    },
  };
}

/**
 * Follow job `id` inside `container`: a progress bar, the stage, a cancel button.
 * Resolves with the final job (done / failed / cancelled). `signal` stops following.
 */
export async function followJob(id, container, { signal, title } = {}) {
  const bar = progressBar();
  const cancel = h("button", {
    type: "button", class: "small danger", onclick: async () => {
      cancel.disabled = true;
      try { await api(`/jobs/${encodeURIComponent(id)}`, { method: "DELETE" }); } catch (e) { cancel.title = e.message; }
    },
  }, "Cancel");
  const link = h("a", { href: `#/job/${encodeURIComponent(id)}`, class: "small" }, "job page");
  const box = h("div", { class: "job-progress", dataset: { jobId: id } },
    title ? h("div", { class: "small muted" }, title) : null, bar.el,
    h("div", { class: "row small", style: { marginTop: "6px", alignItems: "center" } }, cancel, link));
  container.append(box);
  try {
    const job = await pollJob(id, (j) => bar.update(j), { signal });
    cancel.remove();
    return job;
  } finally {
    if (!signal || !signal.aborted) { /* keep the final state visible until the caller replaces it */ }
  }
}
