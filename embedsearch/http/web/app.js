// embedsearch page: pick or drop an image, see two models' nearest images side by side, and ask a
// VAE for new images near it. Plain JS against the JSON API; no build step, no dependencies.
"use strict";

const $ = (sel) => document.querySelector(sel);
const TOKEN_KEY = "embedsearch-token";
const SEARCH_NEIGHBOURS = 3; // real images shown under each generated candidate

const state = {
  models: [],       // from /api/models
  query: null,      // {id, url, name} of an indexed image, or {file, url, name} when it could not be added
  token: sessionStorage.getItem(TOKEN_KEY) || "",
  run: 0,           // bumps on each new query so that late answers of an old one are dropped
  summary: "",      // "N images · M models"
};

// -- small helpers ---------------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (value !== null && value !== undefined) node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (state.token) headers.set("Authorization", `Bearer ${state.token}`);
  const response = await fetch(path, { ...options, headers });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new ApiError(response.status, body.error || `${response.status} ${response.statusText}`);
  return body;
}

function showError(message) {
  const box = $("#error");
  box.textContent = message || "";
  box.hidden = !message;
}

// The header shows what the page is doing, else what the library holds.
function setStatus(text) { $("#status").textContent = text || state.summary; }

// Tiles show /api/images/{id}/thumb (256 px WebP, or the image itself when it is that small), never
// the original: 16 photo tiles are a few hundred kB, not tens of MB.
function thumb(url, alt) {
  const img = el("img", { src: url, alt: alt || "", loading: "lazy", decoding: "async" });
  img.addEventListener("load", () => img.classList.toggle("pixelated", img.naturalWidth <= 96));
  return img;
}

const clampInt = (input, lo, hi, fallback) => {
  const v = Number.parseInt(input.value, 10);
  return Number.isFinite(v) ? Math.min(hi, Math.max(lo, v)) : fallback;
};

// -- models ---------------------------------------------------------------------------------

async function loadModels() {
  const [{ models }, stats] = await Promise.all([api("/api/models"), api("/api/stats")]);
  state.models = models;
  const first = (kind) => models.find((m) => m.kind === kind);
  const a = first("ae") || models[0];
  const b = first("vae") || models.find((m) => m !== a) || a;
  fillSelect($("#model-a"), models, a);
  fillSelect($("#model-b"), models, b);
  const decoders = models.filter((m) => m.kind === "vae");
  fillSelect($("#gen-model"), decoders, decoders[0]);
  if (!decoders.length) $("#gen-info").textContent = "The library has no VAE model to generate with.";
  for (const slot of ["a", "b"]) showFacts(slot);
  state.summary = `${stats.images.toLocaleString()} images · ${models.length} models`;
  setStatus("");
  if (!models.length) showError("The library has no models yet: train one with 'embedsearch train'.");
}

function fillSelect(select, models, chosen) {
  select.replaceChildren(...models.map((m) => el("option", { value: m.name }, m.name === m.kind ? m.name : `${m.name} (${m.kind})`)));
  if (chosen) select.value = chosen.name;
}

function showFacts(slot) {
  const model = state.models.find((m) => m.name === $(`#model-${slot}`).value);
  const facts = $(`#column-${slot} .model-facts`);
  facts.textContent = model ? `${model.kind.toUpperCase()} · ${model.dim}-d · ${model.vectors.toLocaleString()} vectors` : "";
}

// -- the query ------------------------------------------------------------------------------

async function useFile(file) {
  if (!file) return;
  showError("");
  const localUrl = URL.createObjectURL(file);
  const form = new FormData();
  form.append("files", file, file.name);
  setStatus("Adding your image…");
  try {
    const { images } = await api("/api/images", { method: "POST", body: form });
    const added = images[0];
    // The preview is the browser's own copy of the file: nothing is downloaded again.
    setQuery({ id: added.id, url: localUrl, name: file.name, created: added.created });
  } catch (err) {
    if (err.status !== 401) { setStatus(""); showError(err.message); return; }
    $("#token-row").hidden = false; // reads are open: search by the bytes, without storing them
    setQuery({ file, url: localUrl, name: file.name });
  }
}

function setQuery(query) {
  state.query = query;
  state.run += 1;
  const preview = $("#preview");
  preview.src = query.url;
  preview.alt = query.name || "query image";
  preview.hidden = false;
  $("#drop").classList.add("has-image");
  $("#drop-text").textContent = "Choose another image";
  const where = query.id !== undefined ? `image #${query.id}${query.created === false ? " (already in the library)" : ""}`
    : "not stored (a token is needed to add images)";
  $("#query-info").textContent = `${query.name || "query"} — ${where}`;
  $("#gen-go").disabled = query.id === undefined || !$("#gen-model").value;
  $("#candidates").replaceChildren();
  searchBoth();
}

function searchBoth() {
  if (!state.query) return;
  setStatus("Searching…");
  Promise.allSettled([searchColumn("a"), searchColumn("b")]).then(() => setStatus(""));
}

async function searchColumn(slot) {
  const query = state.query;
  const run = state.run;
  const model = $(`#model-${slot}`).value;
  const k = clampInt($("#k"), 1, 50, 8);
  const list = $(`#column-${slot} .results`);
  if (!query || !model) return;
  list.classList.add("loading");
  try {
    let results;
    if (query.id !== undefined) {
      const params = new URLSearchParams({ image_id: query.id, model, k: k + 1 });
      results = (await api(`/api/search?${params}`)).results.filter((r) => r.id !== query.id).slice(0, k);
    } else {
      const form = new FormData();
      form.append("file", query.file, query.name);
      form.append("model", model);
      form.append("k", k);
      results = (await api("/api/search", { method: "POST", body: form })).results;
    }
    if (run === state.run) renderResults(list, results);
  } catch (err) {
    if (run === state.run) list.replaceChildren(el("li", { class: "empty" }, err.message));
  } finally {
    list.classList.remove("loading");
  }
}

function hitCard(hit, extraClass = "") {
  const caption = el("span", { class: "caption" },
    el("span", { class: "label" }, hit.label || "—"),
    el("span", { class: "distance", title: "distance" }, hit.distance.toFixed(3)));
  return el("button", {
    type: "button", class: `hit ${extraClass}`, title: `#${hit.id} — search from this image`,
    onclick: () => setQuery({ id: hit.id, url: hit.thumb, name: `${hit.label || "image"} #${hit.id}` }),
  }, thumb(hit.thumb, hit.label), caption);
}

function renderResults(list, results) {
  if (!results.length) {
    list.replaceChildren(el("li", { class: "empty" }, "No results: the index is empty."));
    return;
  }
  // Positions among the other images: a search by id finds the query itself first, and it is left out.
  list.replaceChildren(...results.map((hit, i) => el("li", { class: "result" },
    el("span", { class: "rank" }, String(i + 1)), hitCard(hit))));
}

// -- generation -------------------------------------------------------------------------------

async function generate() {
  const query = state.query;
  if (!query || query.id === undefined) return;
  const run = state.run;
  const body = {
    model: $("#gen-model").value, near: query.id, search: SEARCH_NEIGHBOURS,
    n: clampInt($("#gen-n"), 1, 32, 8), seed: clampInt($("#gen-seed"), 0, 2 ** 31, 0),
  };
  const button = $("#gen-go");
  button.disabled = true;
  showError("");
  try {
    const out = await api("/api/generate", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    if (run === state.run) renderCandidates(out.candidates);
  } catch (err) {
    showError(err.message);
  } finally {
    button.disabled = false;
  }
}

function renderCandidates(candidates) {
  $("#candidates").replaceChildren(...candidates.map((c) => el("figure", { class: "candidate" },
    el("img", { class: "generated pixelated", src: c.image, alt: `generated candidate ${c.index + 1}` }),
    el("figcaption", {}, `candidate ${c.index + 1}`),
    el("div", { class: "neighbours" }, ...c.neighbours.map((hit) => hitCard(hit, "small"))))));
}

// -- wiring ---------------------------------------------------------------------------------

function wire() {
  $("#file").addEventListener("change", (e) => useFile(e.target.files[0]));
  const drop = $("#drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    useFile(e.dataTransfer.files[0]);
  });
  for (const slot of ["a", "b"]) {
    $(`#model-${slot}`).addEventListener("change", () => { showFacts(slot); searchColumn(slot); });
  }
  $("#k").addEventListener("change", searchBoth);
  $("#gen-go").addEventListener("click", generate);
  const token = $("#token");
  token.value = state.token;
  if (state.token) $("#token-row").hidden = false;
  token.addEventListener("change", () => {
    state.token = token.value.trim();
    sessionStorage.setItem(TOKEN_KEY, state.token);
    if (state.query && state.query.file) useFile(state.query.file);
  });
}

async function main() {
  wire();
  try {
    await loadModels();
  } catch (err) {
    if (err.status === 401) $("#token-row").hidden = false;
    showError(`Cannot load the models: ${err.message}`);
  }
  document.body.dataset.ready = "true";
}

main();
