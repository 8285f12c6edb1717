// What every part of the page shares: DOM helpers, the JSON API client with the service token,
// and the page's state. Plain ES module: no build step, no dependencies.

export const $ = (sel) => document.querySelector(sel);
const TOKEN_KEY = "embedsearch-token";

export const state = {
  models: [],       // from /api/models
  labels: [],       // from /api/labels: [{label, count}]
  query: null,      // {id, url, name, label} of a stored image, or {file, url, name} of one that is not stored
  b: null,          // the second image of "between": {id, thumb, name}
  token: sessionStorage.getItem(TOKEN_KEY) || "",
  run: 0,           // bumps on each new search so that late answers of an old one are dropped
  summary: "",      // "N images · M models"
  pending: null,    // the write that was refused for want of the token: retried once it is given
};

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (value === true) node.setAttribute(key, "");
    else if (value !== null && value !== undefined && value !== false) node.setAttribute(key, value);
  }
  for (const child of children) if (child !== null && child !== undefined) node.append(child);
  return node;
}

export class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

export async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (state.token) headers.set("Authorization", `Bearer ${state.token}`);
  const response = await fetch(path, { ...options, headers });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new ApiError(response.status, body.error || `${response.status} ${response.statusText}`);
  return body;
}

export const postJson = (path, body) => api(path, {
  method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
});

export function showError(message) {
  const box = $("#error");
  box.textContent = message || "";
  box.hidden = !message;
}

export function showNotice(message) {
  $("#notice").textContent = message || "";
}

// The header shows what the page is doing, else what the library holds.
export function setStatus(text) { $("#status").textContent = text || state.summary; }

// A write the service refused with 401: show the token field, and once a token is entered (the
// token's change event calls retryPending) run ``retry``, the whole operation, again.
export async function withToken(what, action, retry) {
  try {
    return await action();
  } catch (err) {
    if (err.status !== 401) throw err;
    state.pending = retry;
    $("#token-row").hidden = false;
    $("#token").focus();
    showError(`${what} needs the service's token: enter it in the token field and press Enter.`);
    return undefined;
  }
}

export function setToken(value) {
  state.token = value.trim();
  sessionStorage.setItem(TOKEN_KEY, state.token);
}

export async function retryPending() {
  const action = state.pending;
  state.pending = null;
  showError("");
  if (action) await action().catch((err) => showError(err.message));
}

// Tiles show /api/images/{id}/thumb (256 px WebP, or the image itself when it is that small), never
// the original: 16 photo tiles are a few hundred kB, not tens of MB.
export function thumb(url, alt) {
  const img = el("img", { src: url, alt: alt || "", loading: "lazy", decoding: "async" });
  img.addEventListener("load", () => img.classList.toggle("pixelated", img.naturalWidth <= 96));
  return img;
}

export const clampInt = (input, lo, hi, fallback) => {
  const v = Number.parseInt(input.value, 10);
  return Number.isFinite(v) ? Math.min(hi, Math.max(lo, v)) : fallback;
};

export function fillSelect(select, models, chosen) {
  select.replaceChildren(...models.map((m) => el("option", { value: m.name },
    m.name === m.kind ? m.name : `${m.name} (${m.kind})`)));
  if (chosen) select.value = chosen.name || chosen;
}

export const modelOf = (name) => state.models.find((m) => m.name === name);
export const decoders = () => state.models.filter((m) => m.kind === "ae" || m.kind === "vae");

// A caption line that is never cut off: it wraps, and its full text is the tooltip too.
export const textLine = (cls, text) => el("span", { class: cls, title: text }, text);

// A button that asks to be pressed a second time within a few seconds before it acts (no dialog).
export function confirmButton(label, confirmLabel, attrs, action) {
  let armed = null;
  const button = el("button", { type: "button", ...attrs }, label);
  button.addEventListener("click", async (event) => {
    event.stopPropagation();
    if (!armed) {
      button.textContent = confirmLabel;
      button.classList.add("armed");
      armed = setTimeout(() => { armed = null; button.textContent = label; button.classList.remove("armed"); }, 5000);
      return;
    }
    clearTimeout(armed);
    armed = null;
    button.textContent = label;
    button.classList.remove("armed");
    await action();
  });
  return button;
}

// Hamming distances (hashes) are whole numbers of bits; the others get three decimals.
const distance = (d, metric) => (metric === "hamming" ? String(Math.round(d)) : d.toFixed(3));

// A result tile's button: the thumbnail, the label, the distance and the file name; it searches by the image.
export function hitButton(hit, onPick, extraClass = "", metric = "") {
  const name = hit.name || `image #${hit.id}`;
  const caption = el("span", { class: "caption" },
    textLine("label", hit.label || "—"),
    el("span", { class: "distance", title: "distance to the query" }, distance(hit.distance, metric)),
    textLine("name", name));
  return el("button", {
    type: "button", class: `hit ${extraClass}`, title: `#${hit.id} ${name} — search from this image`,
    onclick: () => onPick(hit.id),
  }, thumb(hit.thumb, `${hit.label || "image"} ${name}`), caption);
}
