// Any other kind's stored result: its header, manifest and the JSON (a kind without a view yet).

import { h, replace } from "../dom.js";
import { loadResult, manifestCard, resultHeader } from "./common.js";

export async function render({ root, route, signal }) {
  const id = route.parts[0];
  const out = await loadResult(root, id, signal);
  if (!out) return;
  const text = JSON.stringify(out.result, null, 2);
  replace(root, resultHeader(out, { sub: "This kind has no dedicated view yet; the stored result follows." }),
    h("section", { class: "card" }, h("h2", {}, "Result"),
      h("pre", { class: "mono", style: { maxHeight: "640px", overflow: "auto", fontSize: "12px" } },
        text.length > 200000 ? text.slice(0, 200000) + "\n… (truncated: open the JSON for the rest)" : text)),
    manifestCard(out));
}
