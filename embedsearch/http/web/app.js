// embedsearch page: pick or drop an image and see two models' nearest images side by side (any model
// in either column), add it to the library or not, generate from the decoders, browse the library and
// a 2-D map of each model's vectors. The URL holds the search, so a result can be shared or bookmarked.
import {
  $, api, clampInt, confirmButton, el, fillSelect, modelOf, retryPending, setStatus, setToken, showError,
  hitButton, showNotice, state, textLine, withToken,
} from "./util.js";
import { explainColumn, resetExplain } from "./explain.js";
import { initGenerate, queryChanged, setB } from "./generate.js";
import { initLibrary, libraryChanged, showLibrary, showMap } from "./library.js";

const SLOTS = ["a", "b"];
const VIEWS = ["search", "library", "map"];
const shown = { a: [], b: [] }; // each column's current results

// -- models, labels, counts -----------------------------------------------------------------------

async function loadLibrary() {
  const [{ models }, stats, { labels }] = await Promise.all([api("/api/models"), api("/api/stats"), api("/api/labels")]);
  state.models = models;
  state.labels = labels;
  state.summary = `${stats.images.toLocaleString()} image${stats.images === 1 ? "" : "s"} · `
    + `${models.length} model${models.length === 1 ? "" : "s"}`;
  setStatus("");
  const select = $("#filter-label");
  const chosen = select.value;
  select.replaceChildren(el("option", { value: "" }, "any label"),
    ...labels.filter((l) => l.label !== null).map((l) => el("option", { value: l.label }, `${l.label} (${l.count})`)));
  select.value = labels.some((l) => l.label === chosen) ? chosen : "";
  for (const slot of SLOTS) showFacts(slot);
}

// After an upload or a deletion: the header's counts, the model facts, the labels, the browser.
async function refreshCounts() {
  try { await loadLibrary(); } catch (err) { showError(err.message); }
  libraryChanged();
}

function fillModels() {
  const { models } = state;
  const first = (kind) => models.find((m) => m.kind === kind);
  const a = first("ae") || models[0];
  const b = first("vae") || models.find((m) => m !== a) || a;
  fillSelect($("#model-a"), models, a);
  fillSelect($("#model-b"), models, b);
  if (!models.length) showError("The library has no models yet: train one with 'embedsearch train'.");
}

function showFacts(slot) {
  const model = modelOf($(`#model-${slot}`).value);
  $(`#column-${slot} .model-facts`).textContent = model
    ? `${model.kind.toUpperCase()} · ${model.dim}-d · ${model.vectors.toLocaleString()} vectors` : "";
  const explain = $(`#explain-${slot}`);
  explain.disabled = !model || !(model.kind === "ae" || model.kind === "vae");
  if (explain.disabled) explain.checked = false;
}

// -- the URL --------------------------------------------------------------------------------------

function currentView() { return VIEWS.find((v) => !$(`#view-${v}`).hidden) || "search"; }

function writeUrl(push = false) {
  const p = new URLSearchParams();
  if (state.query && state.query.id !== undefined) p.set("q", state.query.id);
  for (const slot of SLOTS) if ($(`#model-${slot}`).value) p.set(slot, $(`#model-${slot}`).value);
  p.set("k", clampInt($("#k"), 1, 50, 8));
  if ($("#filter-label").value) p.set("label", $("#filter-label").value);
  if ($("#filter-under").value.trim()) p.set("under", $("#filter-under").value.trim());
  if (currentView() !== "search") p.set("view", currentView());
  const url = `${location.pathname}?${p}`;
  if (url !== location.pathname + location.search) history[push ? "pushState" : "replaceState"](null, "", url);
}

// Restore what a shared or bookmarked URL names: models, k, filters, view, and the query image.
async function readUrl() {
  const p = new URLSearchParams(location.search);
  for (const slot of SLOTS) if (modelOf(p.get(slot))) $(`#model-${slot}`).value = p.get(slot);
  for (const slot of SLOTS) showFacts(slot);
  if (p.get("k")) $("#k").value = p.get("k");
  const label = p.get("label") || "";
  if (label && ![...$("#filter-label").options].some((o) => o.value === label)) {
    $("#filter-label").append(el("option", { value: label }, label));
  }
  $("#filter-label").value = label;
  $("#filter-under").value = p.get("under") || "";
  showView(VIEWS.includes(p.get("view")) ? p.get("view") : "search", false);
  const id = Number.parseInt(p.get("q"), 10);
  if (Number.isFinite(id) && id >= 0) await searchById(id, { push: false });
  else if (state.query && state.query.id !== undefined) clearQuery();
}

// -- views ------------------------------------------------------------------------------------------

function showView(view, write = true) {
  for (const v of VIEWS) {
    $(`#view-${v}`).hidden = v !== view;
    $(`#tab-${v}`).setAttribute("aria-selected", String(v === view));
    $(`#tab-${v}`).tabIndex = v === view ? 0 : -1;
  }
  if (view === "library") showLibrary();
  if (view === "map") showMap();
  if (write) writeUrl(false);
}

// -- the query ----------------------------------------------------------------------------------------

// A file from the picker or a drop: searched by its bytes (POST /api/search), which stores nothing.
function useFile(file) {
  if (!file) return;
  showError("");
  setQuery({ file, url: URL.createObjectURL(file), name: file.name }, { push: true });
}

async function searchById(id, { push = true } = {}) {
  showError("");
  try {
    const image = await api(`/api/images/${id}`);
    setQuery({ id, url: `/api/images/${id}/thumb`, name: image.name || `image #${id}`, label: image.label }, { push });
  } catch (err) {
    showError(`Image #${id}: ${err.message}`);
  }
}

function setQuery(query, { push = true } = {}) {
  state.query = query;
  const preview = $("#preview");
  preview.src = query.url;
  preview.alt = `query: ${query.name || "image"}`;
  preview.hidden = false;
  $("#drop").classList.add("has-image");
  $("#drop-text").textContent = "Choose another image";
  showQueryInfo();
  queryChanged();
  if (currentView() !== "search") showView("search", false);
  writeUrl(push);
  searchBoth();
}

function clearQuery() {
  state.query = null;
  state.run += 1;
  $("#preview").hidden = true;
  $("#drop").classList.remove("has-image");
  $("#drop-text").innerHTML = "Choose an image<br>or drop it here";
  showQueryInfo();
  queryChanged();
  for (const slot of SLOTS) {
    shown[slot] = [];
    $(`#column-${slot} .results`).replaceChildren(el("li", { class: "empty" }, "Pick an image to search."));
    $(`#column-${slot} .ood`).hidden = true;
    resetExplain(slot);
  }
  $("#agree-legend").hidden = true;
}

function showQueryInfo() {
  const q = state.query;
  const actions = $("#query-actions");
  actions.replaceChildren();
  if (!q) { $("#query-info").textContent = ""; return; }
  if (q.id !== undefined) {
    $("#query-info").replaceChildren(textLine("name", q.name || "query"),
      ` — image #${q.id}${q.label ? `, label ${q.label}` : ""}, in the library`);
    actions.append(confirmButton("Delete from library", "Press again to delete",
      { id: "delete-query", class: "danger" }, () => deleteImage(q.id)));
  } else {
    $("#query-info").replaceChildren(textLine("name", q.name || "query"), " — not stored: searched by its bytes");
    actions.append(el("label", { class: "visually-hidden", for: "add-label" }, "Label for the library"),
      el("input", { id: "add-label", type: "text", placeholder: "label (optional)", maxlength: "200" }),
      el("button", { id: "add-btn", type: "button", onclick: addQuery }, "Add to library"));
  }
}

async function addQuery() {
  const query = state.query;
  if (!query || !query.file) return;
  const form = new FormData();
  form.append("files", query.file, query.name);
  const label = ($("#add-label") && $("#add-label").value.trim()) || "";
  if (label) form.append("label", label);
  setStatus("Adding your image…");
  try {
    const out = await withToken("Adding an image", () => api("/api/images", { method: "POST", body: form }), addQuery);
    if (!out) return;
    const added = out.images[0];
    showNotice(added.created ? `Added as image #${added.id}.` : `Already in the library as image #${added.id}.`);
    // The preview stays the browser's own copy; the file is kept so that a deletion can undo the add.
    setQuery({ ...query, id: added.id, label: label || undefined }, { push: true });
    refreshCounts();
  } catch (err) {
    showError(err.message);
  } finally {
    setStatus("");
  }
}

async function deleteImage(id) {
  const out = await withToken("Deleting an image", () => api(`/api/images/${id}`, { method: "DELETE" }),
    () => deleteImage(id))
    .catch((err) => { showError(err.message); return undefined; });
  if (!out) return;
  showNotice(`Image #${id} deleted from the library.`);
  if (state.b && state.b.id === id) setB(null);
  const q = state.query;
  if (q && q.id === id) {
    if (q.file) setQuery({ file: q.file, url: q.url, name: q.name }, { push: true }); // unstored again
    else { clearQuery(); writeUrl(true); }
  } else {
    searchBoth();
  }
  refreshCounts();
}

// -- the two columns --------------------------------------------------------------------------------

function filters() {
  const out = {};
  if ($("#filter-label").value) out.label = $("#filter-label").value;
  if ($("#filter-under").value.trim()) out.under = $("#filter-under").value.trim();
  return out;
}

// body[data-searched] names the query once every column asked for has its answer (tests wait for it).
async function search(slots) {
  if (!state.query) return;
  const run = slots.length === SLOTS.length ? ++state.run : state.run;
  const key = state.query.id !== undefined ? String(state.query.id) : "file";
  delete document.body.dataset.searched;
  setStatus("Searching…");
  await Promise.allSettled(slots.map((slot) => searchColumn(slot, run)));
  if (run === state.run) document.body.dataset.searched = key;
  setStatus("");
}

const searchBoth = () => search(SLOTS);

async function searchColumn(slot, run = state.run) {
  const query = state.query;
  const model = $(`#model-${slot}`).value;
  const k = clampInt($("#k"), 1, 50, 8);
  const list = $(`#column-${slot} .results`);
  if (!query || !model) return;
  list.classList.add("loading");
  try {
    let out;
    if (query.id !== undefined) {
      const params = new URLSearchParams({ image_id: query.id, model, k: k + 1, ...filters() });
      out = await api(`/api/search?${params}`);
      out.results = out.results.filter((r) => r.id !== query.id).slice(0, k);
    } else {
      const form = new FormData();
      form.append("file", query.file, query.name);
      form.append("model", model);
      form.append("k", k);
      for (const [key, value] of Object.entries(filters())) form.append(key, value);
      out = await api("/api/search", { method: "POST", body: form });
    }
    if (run !== state.run) return;
    shown[slot] = out.results;
    showOod(slot, out);
    renderResults(slot, out.results);
    markAgreement();
    if ($(`#explain-${slot}`).checked) explainColumn(slot, query, model, out.results);
  } catch (err) {
    if (run === state.run) {
      shown[slot] = [];
      list.replaceChildren(el("li", { class: "empty" }, err.message));
      markAgreement();
    }
  } finally {
    list.classList.remove("loading");
  }
}

// How unusual the query is for an AE or VAE (its reconstruction error as a percentile of the
// library's), with the service's warning when it is above the 99th percentile.
function showOod(slot, out) {
  const box = $(`#column-${slot} .ood`);
  const pct = out.ood_percentile;
  if (pct === undefined || pct === null) { box.hidden = true; return; }
  const warning = out.warning ? el("strong", { class: "warning" }, `⚠ ${out.warning}`) : null;
  const p = Number(pct).toFixed(1);
  box.replaceChildren(el("span", { class: "pct",
    title: "the query's reconstruction error (VAE: negative ELBO) as a percentile of the indexed images' values" },
  `OOD percentile ${p}: less typical for this model than ${p} % of the library's images`), ...(warning ? [warning] : []));
  box.classList.toggle("warn", Boolean(out.warning));
  box.hidden = false;
}

function renderResults(slot, results) {
  const list = $(`#column-${slot} .results`);
  resetExplain(slot);
  if (!results.length) {
    list.replaceChildren(el("li", { class: "empty" }, "No results (the index is empty, or nothing passes the filters)."));
    return;
  }
  // Positions among the other images: a search by id finds the query itself first, and it is left out.
  const { metric } = modelOf($(`#model-${slot}`).value) || {};
  list.replaceChildren(...results.map((hit, i) => resultTile(hit, i + 1, metric)));
}

function resultTile(hit, rank, metric) {
  return el("li", { class: "result", "data-id": hit.id },
    el("span", { class: "rank" }, String(rank)),
    el("span", { class: "agree", title: "found by both models", "aria-label": "found by both models" }, "★"),
    hitButton(hit, searchById, "", metric),
    el("div", { class: "tile-actions" },
      el("button", { type: "button", class: "as-b", title: `use #${hit.id} as image B for “between”`,
        "aria-label": `As B: #${hit.id} as the second image of “between”`,
        onclick: () => setB({ id: hit.id, thumb: hit.thumb, name: hit.name || `#${hit.id}` }) }, "As B"),
      confirmButton("✕", "Sure?", { class: "del danger", title: `delete #${hit.id} from the library`,
        "aria-label": `delete #${hit.id} from the library` }, () => deleteImage(hit.id))),
    el("div", { class: "explain", hidden: true }));
}

// Results found by both columns get a star (and a legend says how many).
function markAgreement() {
  const ids = SLOTS.map((slot) => new Set(shown[slot].map((h) => h.id)));
  const common = new Set([...ids[0]].filter((id) => ids[1].has(id)));
  for (const li of document.querySelectorAll(".columns .result")) {
    li.classList.toggle("agreed", common.has(Number(li.dataset.id)));
  }
  const legend = $("#agree-legend");
  legend.hidden = !(shown.a.length && shown.b.length);
  $("#agree-count").textContent = `${common.size} of the results are found by both models`;
}

// -- wiring ---------------------------------------------------------------------------------------------

function wire() {
  $("#file").addEventListener("change", (e) => { useFile(e.target.files[0]); e.target.value = ""; });
  const drop = $("#drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); useFile(e.dataTransfer.files[0]); });
  for (const slot of SLOTS) {
    $(`#model-${slot}`).addEventListener("change", () => { showFacts(slot); writeUrl(); search([slot]); });
    $(`#explain-${slot}`).addEventListener("change", (e) => {
      if (e.target.checked && state.query && shown[slot].length) {
        explainColumn(slot, state.query, $(`#model-${slot}`).value, shown[slot]);
      } else resetExplain(slot);
    });
  }
  for (const id of ["#k", "#filter-label", "#filter-under"]) {
    $(id).addEventListener("change", () => { writeUrl(); searchBoth(); });
  }
  for (const v of VIEWS) $(`#tab-${v}`).addEventListener("click", () => showView(v));
  $(".tabs").addEventListener("keydown", (e) => { // arrow keys move between the tabs
    const step = { ArrowRight: 1, ArrowLeft: -1 }[e.key];
    if (!step) return;
    const next = VIEWS[(VIEWS.indexOf(currentView()) + step + VIEWS.length) % VIEWS.length];
    showView(next);
    $(`#tab-${next}`).focus();
  });
  const token = $("#token");
  token.value = state.token;
  if (state.token) $("#token-row").hidden = false;
  token.addEventListener("change", () => { setToken(token.value); retryPending(); });
  window.addEventListener("popstate", () => readUrl());
}

async function main() {
  wire();
  try {
    await loadLibrary();
    fillModels();
    initGenerate({ onPick: (id) => searchById(id) });
    initLibrary({ onPick: (id) => searchById(id) });
    await readUrl();
  } catch (err) {
    if (err.status === 401) $("#token-row").hidden = false;
    showError(`Cannot load the library: ${err.message}`);
  }
  document.body.dataset.ready = "true";
}

main();
