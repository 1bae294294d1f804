// The search page: pick a dataset, build a query of weighted terms, show pages of thumbnails. Every string
// from the API, a file or the user is inserted as text (textContent, attributes), never as markup.
"use strict";

const PAGE_SIZE = 20;
const EXCLUDE_WEIGHT = -0.5; // the CLI's --not weight (clipsearch_tools.client.EXCLUDE_WEIGHT)
// The proxy and the API take at most 10 MiB of body; base64 adds a third.
const MAX_QUERY_IMAGE_BYTES = 7 * 1024 * 1024;
const LOAD_AHEAD_PX = 300;

const byId = (id) => document.getElementById(id);

const page = {
  datasets: new Map(),
  search: null, // {dataset, body}: the running search, without its offset
  offset: 0,
  exhausted: true,
  loading: false,
  generation: 0, // answers of an older search are dropped
  queryImage: null, // {base64, name, previewUrl}
  similarTo: null, // {key, path}
};

class PageError extends Error {
  constructor(message, status = null, code = null) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function callApi(method, path, body) {
  const init = { method, headers: { accept: "application/json" } };
  if (body !== undefined) {
    init.headers["content-type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch("/api" + path, init);
  } catch (error) {
    throw new PageError("The page's server does not answer: is `clipsearch ui` still running?");
  }
  let payload = null;
  try {
    payload = await response.json();
  } catch (error) {
    payload = null;
  }
  if (!response.ok) {
    // The API answers {"error": {"code", "message"}}; API Gateway's own refusals {"message"}.
    const detail = payload && typeof payload.error === "object" && payload.error ? payload.error : {};
    const message = String(detail.message || (payload && payload.message) || response.statusText || "no message");
    throw new PageError(message, response.status, String(detail.code || "http_error"));
  }
  return payload;
}

function httpUrl(value) {
  if (typeof value !== "string") return null;
  try {
    const url = new URL(value);
    return url.protocol === "http:" || url.protocol === "https:" ? url.href : null;
  } catch (error) {
    return null;
  }
}

function element(tag, properties = {}, children = []) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(properties)) {
    if (name === "text") node.textContent = value;
    else if (name === "className") node.className = value;
    else node.setAttribute(name, value);
  }
  node.append(...children);
  return node;
}

// --- messages -----------------------------------------------------------------------------------

function showError(error) {
  const box = byId("error");
  const prefix = error.status ? `Error ${error.status}${error.code ? ` (${error.code})` : ""}: ` : "";
  box.textContent = prefix + (error.message || String(error));
  box.hidden = false;
}

function clearError() {
  byId("error").hidden = true;
  byId("error").textContent = "";
}

function setStatus(text) {
  byId("status").textContent = text;
}

// --- datasets -----------------------------------------------------------------------------------

function datasetSummary(dataset) {
  const counts = dataset.counts || {};
  const parts = [`${counts.indexed || 0} images`];
  if (counts.pending) parts.push(`${counts.pending} pending`);
  if (counts.failed) parts.push(`${counts.failed} failed`);
  return `${dataset.name} (${parts.join(", ")})`;
}

function showDatasetStatus() {
  const dataset = page.datasets.get(byId("dataset").value);
  if (!dataset) {
    byId("dataset-status").textContent = "";
    return;
  }
  const counts = dataset.counts || {};
  let status = counts.pending ? `indexing: ${counts.pending} pending` : "ready";
  if (dataset.status && dataset.status !== "active") status = String(dataset.status); // e.g. being deleted
  byId("dataset-status").textContent =
    `${status} · ${counts.indexed || 0} indexed · ${counts.failed || 0} failed · model ${dataset.model}`;
}

async function loadDatasets() {
  const select = byId("dataset");
  const previous = select.value;
  let datasets;
  try {
    datasets = (await callApi("GET", "/datasets")).datasets || [];
  } catch (error) {
    showError(error);
    return;
  }
  page.datasets = new Map(datasets.map((dataset) => [dataset.name, dataset]));
  if (datasets.length === 0) {
    select.replaceChildren(element("option", { value: "", text: "no datasets yet: clipsearch ingest DIR --dataset NAME" }));
  } else {
    select.replaceChildren(...datasets.map((dataset) => element("option", { value: dataset.name, text: datasetSummary(dataset) })));
    if (page.datasets.has(previous)) select.value = previous;
  }
  showDatasetStatus();
}

// --- the query ----------------------------------------------------------------------------------

function isoMoment(value) {
  if (!value) return undefined;
  const moment = new Date(value); // datetime-local: the user's local time
  return Number.isNaN(moment.getTime()) ? value : moment.toISOString();
}

function searchBody() {
  const terms = [];
  const text = byId("query").value.trim();
  if (text) terms.push({ text, weight: 1 });
  if (page.queryImage) terms.push({ image_base64: page.queryImage.base64, weight: 1 });
  if (page.similarTo) terms.push({ key: page.similarTo.key, weight: 1 });
  if (terms.length === 0) {
    throw new PageError("Type what to look for, choose an image, or press \u201cMore like this\u201d on a result.");
  }
  for (const excluded of byId("exclude").value.split(",")) {
    if (excluded.trim()) terms.push({ text: excluded.trim(), weight: EXCLUDE_WEIGHT });
  }
  const body = terms.length === 1 && text ? { query: text } : { terms };
  body.k = PAGE_SIZE;
  const prefix = byId("prefix").value;
  if (prefix) body.prefix = prefix;
  const since = isoMoment(byId("since").value);
  if (since) body.since = since;
  const until = isoMoment(byId("until").value);
  if (until) body.until = until;
  const minScore = byId("min-score").value.trim();
  if (minScore) {
    // A value that is not a number still goes to the API, which names the parameter in its 400.
    body.min_score = Number.isFinite(Number(minScore)) ? Number(minScore) : minScore;
  }
  return body;
}

function startSearch() {
  clearError();
  const dataset = byId("dataset").value;
  if (!dataset) {
    showError(new PageError("Choose a dataset first."));
    return;
  }
  let body;
  try {
    body = searchBody();
  } catch (error) {
    showError(error);
    return;
  }
  page.generation += 1;
  page.search = { dataset, body };
  page.offset = 0;
  page.exhausted = false;
  page.loading = false;
  byId("results").replaceChildren();
  setStatus("Searching\u2026");
  loadNextPage();
}

async function loadNextPage() {
  if (!page.search || page.loading || page.exhausted) return;
  const generation = page.generation;
  const { dataset, body } = page.search;
  page.loading = true;
  updateLoadMore();
  try {
    const answer = await callApi(
      "POST",
      `/datasets/${encodeURIComponent(dataset)}/search/text?thumbnails=true&presign=true`,
      { ...body, offset: page.offset },
    );
    if (generation !== page.generation) return;
    const results = answer.results || [];
    byId("results").append(...results.map(resultItem));
    page.offset += results.length;
    page.exhausted = results.length < PAGE_SIZE;
    const shown = byId("results").childElementCount;
    let status = shown === 0 ? "No results." : `${shown} results`;
    if (shown > 0) status += page.exhausted ? " (all)" : "; scroll for more";
    status += ` \u00b7 model ${answer.model} \u00b7 ${Math.round(answer.took_ms)} ms`;
    if (answer.truncated) status += " \u00b7 the query was cut to the model's 77 tokens";
    setStatus(status);
  } catch (error) {
    if (generation !== page.generation) return;
    page.exhausted = true;
    setStatus("");
    showError(error);
  } finally {
    if (generation === page.generation) {
      page.loading = false;
      updateLoadMore();
      requestAnimationFrame(loadMoreIfNearEnd);
    }
  }
}

function updateLoadMore() {
  byId("load-more").hidden = page.exhausted || !page.search || byId("results").childElementCount === 0;
  byId("load-more").disabled = page.loading;
}

function loadMoreIfNearEnd() {
  const sentinel = byId("more-sentinel").getBoundingClientRect();
  if (sentinel.top < window.innerHeight + LOAD_AHEAD_PX) loadNextPage();
}

// --- results ------------------------------------------------------------------------------------

function resultItem(hit) {
  const item = element("li", { className: "result" });
  const thumbnail = httpUrl(hit.thumbnail);
  const full = httpUrl(hit.url);
  let preview;
  if (thumbnail) {
    preview = element("img", { src: thumbnail, alt: `Preview of ${hit.path}`, decoding: "async" });
    preview.addEventListener("error", () => preview.replaceWith(noPreview("preview unavailable")), { once: true });
  } else {
    preview = noPreview("no preview");
  }
  if (full) {
    const link = element("a", { className: "thumbnail", href: full, target: "_blank", rel: "noopener noreferrer" }, [preview]);
    link.setAttribute("aria-label", `Open ${hit.path}`);
    item.append(link);
  } else {
    item.append(element("div", { className: "thumbnail" }, [preview]));
  }
  const score = Number(hit.score);
  const similar = element("button", { type: "button", className: "more-like-this", text: "More like this" });
  similar.setAttribute("aria-label", `More like ${hit.path}`);
  similar.addEventListener("click", () => searchSimilarTo(hit));
  item.append(element("div", { className: "meta" }, [
    element("span", { className: "score", text: `score ${Number.isFinite(score) ? score.toFixed(3) : "?"}` }),
    element("span", { className: "path", text: String(hit.path), title: String(hit.key) }),
    similar,
  ]));
  item.dataset.key = String(hit.key);
  return item;
}

function noPreview(text) {
  return element("span", { className: "no-preview", text });
}

function searchSimilarTo(hit) {
  forgetQueryImage();
  page.similarTo = { key: String(hit.key), path: String(hit.path) };
  byId("similar-to-path").textContent = page.similarTo.path;
  byId("similar-to").hidden = false;
  byId("query").value = "";
  window.scrollTo({ top: 0 });
  startSearch();
}

function forgetSimilarTo() {
  page.similarTo = null;
  byId("similar-to").hidden = true;
  byId("similar-to-path").textContent = "";
}

// --- the query image ----------------------------------------------------------------------------

function forgetQueryImage() {
  if (page.queryImage) URL.revokeObjectURL(page.queryImage.previewUrl);
  page.queryImage = null;
  byId("query-image").hidden = true;
  byId("query-image-preview").removeAttribute("src");
  byId("query-image-name").textContent = "";
  byId("image").value = "";
}

function base64Of(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",", 2)[1] || "");
    reader.onerror = () => reject(new PageError(`Cannot read ${file.name}.`));
    reader.readAsDataURL(file);
  });
}

async function searchByImageFile(file) {
  if (!file) return;
  clearError();
  if (file.type && !file.type.startsWith("image/")) {
    showError(new PageError(`${file.name} is not an image (${file.type}).`));
    return;
  }
  if (file.size > MAX_QUERY_IMAGE_BYTES) {
    showError(new PageError(`${file.name} is ${(file.size / 1048576).toFixed(1)} MiB; query images may be at most 7 MiB.`));
    return;
  }
  let base64;
  try {
    base64 = await base64Of(file);
  } catch (error) {
    showError(error);
    return;
  }
  forgetQueryImage();
  forgetSimilarTo();
  page.queryImage = { base64, name: file.name, previewUrl: URL.createObjectURL(file) };
  byId("query-image-preview").src = page.queryImage.previewUrl;
  byId("query-image-name").textContent = file.name;
  byId("query-image").hidden = false;
  byId("query").value = "";
  startSearch();
}

// --- wiring ------------------------------------------------------------------------------------

function wire() {
  byId("search").addEventListener("submit", (event) => {
    event.preventDefault();
    startSearch();
  });
  byId("dataset").addEventListener("change", () => {
    showDatasetStatus();
    forgetSimilarTo(); // a stored key belongs to its dataset
    if (page.search) startSearch();
  });
  byId("reload-datasets").addEventListener("click", loadDatasets);
  byId("image").addEventListener("change", (event) => searchByImageFile(event.target.files[0]));
  byId("clear-image").addEventListener("click", forgetQueryImage);
  byId("clear-similar").addEventListener("click", forgetSimilarTo);
  byId("load-more").addEventListener("click", loadNextPage);

  const zone = byId("drop-zone");
  document.addEventListener("dragover", (event) => {
    event.preventDefault(); // a file dropped anywhere is a query, not a page to open
    zone.classList.add("dragging");
  });
  document.addEventListener("dragleave", (event) => {
    if (!event.relatedTarget) zone.classList.remove("dragging");
  });
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    searchByImageFile(event.dataTransfer && event.dataTransfer.files[0]);
  });

  new IntersectionObserver((entries) => {
    if (entries.some((entry) => entry.isIntersecting)) loadNextPage();
  }, { rootMargin: `0px 0px ${LOAD_AHEAD_PX}px 0px` }).observe(byId("more-sentinel"));
}

wire();
loadDatasets();
