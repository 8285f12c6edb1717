// "Explain" in a column: what the model kept of each image. The query's reconstruction by the
// column's AE or VAE beside each hit's reconstruction (and, for a VAE, the decoded midpoint between
// the query's code and the hit's), from /api/explain.
import { $, api, el } from "./util.js";

const asked = { a: 0, b: 0 }; // bumps per request so that a late answer for old results is dropped

export function resetExplain(slot) {
  asked[slot] += 1;
  const box = $(`#column-${slot} .explain-query`);
  box.hidden = true;
  box.replaceChildren();
  for (const node of document.querySelectorAll(`#column-${slot} .result .explain`)) {
    node.hidden = true;
    node.replaceChildren();
  }
}

const picture = (src, alt, caption) => el("figure", { class: "recon", title: alt },
  el("img", { class: "pixelated", src, alt }), el("figcaption", {}, caption));

export async function explainColumn(slot, query, model, results) {
  resetExplain(slot);
  const mine = asked[slot];
  const box = $(`#column-${slot} .explain-query`);
  box.hidden = false;
  box.textContent = "Explaining…";
  const hits = results.map((r) => r.id).join(",");
  try {
    let out;
    if (query.id !== undefined) {
      out = await api(`/api/explain?${new URLSearchParams({ image_id: query.id, model, hits })}`);
    } else {
      const form = new FormData();
      form.append("file", query.file, query.name);
      form.append("model", model);
      form.append("hits", hits);
      out = await api("/api/explain", { method: "POST", body: form });
    }
    if (mine !== asked[slot]) return;
    box.replaceChildren(el("span", { class: "explain-title" }, `What ${model} keeps of the query:`),
      picture(out.query.reconstruction, `${model}'s reconstruction of the query`, "query, recon."));
    for (const hit of out.hits) {
      const node = document.querySelector(`#column-${slot} .result[data-id="${hit.id}"] .explain`);
      if (!node) continue;
      const pictures = [picture(hit.reconstruction, `${model}'s reconstruction of #${hit.id}`, "recon.")];
      if (hit.midpoint) {
        pictures.push(picture(hit.midpoint, `decoded midpoint between the query's code and #${hit.id}'s`, "midpoint"));
      }
      node.replaceChildren(...pictures);
      node.hidden = false;
    }
  } catch (err) {
    if (mine !== asked[slot]) return;
    box.textContent = err.status === 404 && /not found/i.test(err.message)
      ? "This service cannot explain results yet." : `Cannot explain: ${err.message}`;
  }
}
