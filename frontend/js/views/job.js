// A job's page (#/job/<id>): progress bar and stage until it finishes, then its result view.

import { api } from "../api.js";
import { h, replace } from "../dom.js";
import { followJob } from "../progress.js";
import { redirect } from "../router.js";
import { jobFailure, kindTitle } from "./common.js";

export async function render({ root, route, signal }) {
  const id = route.parts[0];
  const info = await api(`/jobs/${encodeURIComponent(id)}`, { signal });
  if (info.status === "done") { redirect([info.kind, id]); return; }
  if (info.status === "failed" || info.status === "cancelled") { replace(root, jobFailure(info)); return; }
  const card = h("section", { class: "card", id: "job-card" },
    h("div", { class: "card-head" }, h("h2", {}, `${kindTitle(info.kind)} on ${info.pair}`), h("span", { class: "badge mono" }, id)),
    h("p", { class: "small muted" }, "The result opens here when the job finishes; this page's URL can be shared meanwhile."));
  replace(root, h("div", { class: "page-head" }, h("h1", {}, "Running")), card);
  const job = await followJob(id, card, { signal });
  if (job.status === "done") redirect([job.kind, id]);
  else replace(root, jobFailure(job));
}
