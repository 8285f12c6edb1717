// The library browser (pages of thumbnails, filtered by label) and the 2-D map of a model's vectors
// (a PCA computed by the service, drawn as SVG, coloured by label; click a point to search by it).
import { $, api, el, fillSelect, showError, state, textLine, thumb } from "./util.js";

const PAGE = 24;
const SVG = "http://www.w3.org/2000/svg";
const SIZE = 600; // the map's drawing box (the SVG scales to its width)
// Twelve colours told apart by most eyes (Tableau's palette, then a grey for the rest).
const COLOURS = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
  "#9c755f", "#2f4b7c", "#a0cbe8", "#8cd17d"];
const OTHER = "#9aa1ac";
const KEYBOARD_POINTS = 300;

let onPick = () => {};
const lib = { offset: 0, loaded: false };
const map = { loaded: null, out: null }; // the model whose map is drawn, and its answer

export function initLibrary(options) {
  onPick = options.onPick;
  fillSelect($("#map-model"), state.models, state.models[0]);
  fillLabels();
  $("#lib-label").addEventListener("change", () => { lib.offset = 0; loadPage(); });
  $("#lib-prev").addEventListener("click", () => { lib.offset = Math.max(0, lib.offset - PAGE); loadPage(); });
  $("#lib-next").addEventListener("click", () => { lib.offset += PAGE; loadPage(); });
  $("#map-model").addEventListener("change", () => loadMap());
}

function fillLabels() {
  const select = $("#lib-label");
  const chosen = select.value;
  const total = state.labels.reduce((n, l) => n + l.count, 0);
  select.replaceChildren(el("option", { value: "" }, `all labels (${total})`),
    ...state.labels.filter((l) => l.label !== null).map((l) => el("option", { value: l.label }, `${l.label} (${l.count})`)));
  select.value = state.labels.some((l) => l.label === chosen) ? chosen : "";
}

export function showLibrary() { if (!lib.loaded) loadPage(); }
export function showMap() {
  if (map.loaded !== $("#map-model").value) loadMap();
  else if (map.out) drawMap(map.out); // again: the current query's point is marked
}

// After an upload or deletion: counts in the label list, and the open views drawn again.
export function libraryChanged() {
  fillLabels();
  lib.loaded = false;
  map.loaded = null;
  map.out = null;
  if (!$("#view-library").hidden) loadPage();
  if (!$("#view-map").hidden) loadMap();
}

async function loadPage() {
  lib.loaded = true;
  const params = new URLSearchParams({ offset: lib.offset, limit: PAGE });
  if ($("#lib-label").value) params.set("label", $("#lib-label").value);
  try {
    const page = await api(`/api/images?${params}`);
    if (page.offset > 0 && page.offset >= page.total) { lib.offset = Math.max(0, page.total - PAGE); return loadPage(); }
    const last = Math.min(page.offset + page.images.length, page.total);
    $("#lib-pos").textContent = page.total ? `${page.offset + 1}–${last} of ${page.total}` : "no images";
    $("#lib-prev").disabled = page.offset === 0;
    $("#lib-next").disabled = last >= page.total;
    $("#lib-grid").replaceChildren(...page.images.map(libraryTile));
  } catch (err) {
    showError(err.message);
  }
  return undefined;
}

function libraryTile(image) {
  const name = image.name || `image #${image.id}`;
  return el("li", { class: "lib-tile", "data-id": image.id },
    el("button", { type: "button", class: "hit", title: `#${image.id} ${name} — search by this image`,
      onclick: () => onPick(image.id) },
    thumb(image.thumb, `${image.label || "image"} ${name}`),
    el("span", { class: "caption" }, textLine("label", image.label || (image.generated ? "generated" : "—")),
      el("span", { class: "distance" }, `#${image.id}`), textLine("name", name))));
}

// -- the map ------------------------------------------------------------------------------------------

async function loadMap() {
  const model = $("#map-model").value;
  if (!model) return;
  map.loaded = model;
  $("#map-info").textContent = "Projecting…";
  try {
    const out = await api(`/api/map?${new URLSearchParams({ model })}`);
    if (map.loaded === model) { map.out = out; drawMap(out); }
  } catch (err) {
    $("#map-info").textContent = err.message;
  }
}

function svg(tag, attrs = {}) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  return node;
}

function colourOf(out) {
  const counts = new Map();
  for (const p of out.points) counts.set(p.label, (counts.get(p.label) || 0) + 1);
  const order = [...counts.entries()].sort((a, b) => b[1] - a[1] || String(a[0]).localeCompare(String(b[0])));
  const colours = new Map(order.map(([label], i) => [label, label !== null && i < COLOURS.length ? COLOURS[i] : OTHER]));
  return { counts: order, colours };
}

function drawMap(out) {
  const pad = 16;
  const xs = out.points.map((p) => p.x);
  const ys = out.points.map((p) => p.y);
  const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  const scale = (SIZE - 2 * pad) / Math.max(x1 - x0, y1 - y0, 1e-9); // one scale for both axes: distances stay honest
  const { counts, colours } = colourOf(out);
  const radius = out.points.length > 1000 ? 4 : out.points.length > 200 ? 6 : 9; // big enough to tap on a phone
  const root = svg("svg", { viewBox: `0 0 ${SIZE} ${SIZE}`, role: "img", class: "map-svg",
    "aria-label": `2-D map of ${out.model}'s vectors, coloured by label` });
  const current = state.query && state.query.id;
  // Each point a tab stop on small maps only: thousands of stops would trap the keyboard (the
  // Library view lists the same images).
  const keyboard = out.points.length <= KEYBOARD_POINTS;
  for (const p of out.points) {
    const cx = pad + (p.x - x0) * scale + (SIZE - 2 * pad - (x1 - x0) * scale) / 2;
    const cy = SIZE - pad - (p.y - y0) * scale - (SIZE - 2 * pad - (y1 - y0) * scale) / 2;
    const dot = svg("circle", { cx: cx.toFixed(1), cy: cy.toFixed(1), r: p.id === current ? radius + 3 : radius,
      fill: colours.get(p.label), "data-id": p.id, class: p.id === current ? "point current" : "point" });
    if (keyboard) { dot.setAttribute("tabindex", "0"); dot.setAttribute("role", "button"); }
    const tip = svg("title");
    tip.textContent = `${p.label || "no label"} — #${p.id} (click to search by it)`;
    dot.append(tip);
    root.append(dot);
  }
  const pick = (e) => {
    const id = e.target.dataset && e.target.dataset.id;
    if (id !== undefined) onPick(Number(id));
  };
  root.addEventListener("click", pick);
  root.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); pick(e); } });
  $("#map-canvas").replaceChildren(root);
  $("#map-legend").replaceChildren(...counts.map(([label, n]) => {
    const swatch = el("span", { class: "swatch" });
    swatch.style.backgroundColor = colours.get(label); // the CSSOM: the page's CSP refuses style attributes
    return el("li", {}, swatch, `${label === null ? "no label" : label} (${n})`);
  }));
  const pct = out.explained.map((v) => `${(100 * v).toFixed(0)} %`);
  $("#map-info").textContent = `${out.model}: PCA of ${out.points.length.toLocaleString()} of ${out.vectors.toLocaleString()} `
    + `vectors; the axes hold ${pct[0]} and ${pct[1]} of their variance. Click a point to search by its image.`;
}
