/*
 * rosetta web page: translate a sentence and look inside the model.
 *
 * Data flow
 *   page load  -> GET /v1/model -> state.model
 *                 -> header line, textarea maxlength, beam default/max, self-attention option,
 *                    the server's named glossaries
 *   translate  -> buildRequest() -> POST /v1/translate -> translations[0]
 *                 (readTerms(): the glossary box and required phrases; a malformed line
 *                 is an InputError shown beside its field, and nothing is sent)
 *                 -> renderTranslation()  translation text (met constraints marked), the
 *                                         constraints met / not met, and n-best list
 *                 -> renderAttention()    kind/layer/head selectors, token strips, heat map table
 *                 -> renderSearch()       top-k candidates table and the beam tree (inline SVG)
 *   heads view -> the "Heads" tab, opened the first time: GET /v1/heads -> state.heads
 *                 -> renderHeads()  one grid per kind (layers x heads, by the head's original
 *                                   number), cells coloured by role, the importance in each;
 *                                   a 404's message (how to make heads.json) instead of a grid
 *                 clicking a head -> showHead(): its kind translated for the current sentence
 *                 if the shown one lacks it, then the heat map below set to that head
 *                 (attention[kind][layer][index]: a pruned model's layers differ in heads)
 *   heat map   -> the current view (kind, layer, head) gives one rows x cols weight matrix
 *                 (state.matrix; "average" = mean over heads, computed here);
 *                 hovering / focusing / clicking a header sets state.hover or state.pinned,
 *                 and applyHighlight() restyles headers, strips and cells in place.
 *
 * All API text goes into the page with textContent / DOM APIs only.
 */
"use strict";

const WORD_MARK = "\u2581"; // SentencePiece's word-start marker
const HIGHLIGHT_MIN = 0.1; // weights at or above this count as "attended to"
const SHOWN_MIN = 0.05; // smaller weights are not printed in the cells (their title has them)
const FALLBACK_LIMITS = { max_chars: 2000, max_beam: 16, max_glossary_terms: 1000 };
const ALTERNATIVES = " | "; // how the API joins a constraint's alternative phrases
const KIND_LABELS = {
  cross: "cross-attention",
  encoder_self: "encoder self-attention",
  decoder_self: "decoder self-attention",
};
const SELF_KINDS = ["encoder_self", "decoder_self"];
const SVG_NS = "http://www.w3.org/2000/svg";
const HEAD_KINDS = ["encoder_self", "decoder_self", "cross"]; // the order of the heads' grids
// role colours (Tableau 10); a role not listed here takes one of the spare colours
const ROLE_COLOURS = {
  positional: "#4e79a7", "rare-word": "#f28e2b", alignment: "#59a14f",
  local: "#76b7b2", diffuse: "#bab0ac", mixed: "#edc948",
};
const SPARE_COLOURS = ["#b07aa1", "#ff9da7", "#9c755f", "#e15759"];

const state = {
  model: null, // GET /v1/model, or null when it failed
  busy: false,
  attention: null, // attention object of the shown translation
  view: { kind: "cross", layer: 0, head: "avg" },
  matrix: [], // weights of the current view: rows x cols
  pinned: null, // {axis: "row" | "col", index}
  hover: null, // same shape; shown instead of pinned while set
  lastRequest: null, // the body of the last translation shown (to ask it for another kind)
  heads: null, // GET /v1/heads, once loaded
  headsAsked: false, // GET /v1/heads has been sent (it is asked once)
  roleColours: {}, // role -> colour, for the grids, the legend and the caption
  chosenHead: null, // the heads.json entry whose map is shown (kept for the next translation)
};

const $ = (id) => document.getElementById(id);

/* ------------------------------------------------------------------ DOM helpers */

/** Create an HTML element: attrs become attributes ("class" included; null/undefined/false skipped). */
const el = (tag, attrs = {}, ...children) => build(document.createElement(tag), attrs, children);
/** The same for SVG elements. */
const svg = (tag, attrs = {}, ...children) => build(document.createElementNS(SVG_NS, tag), attrs, children);

function build(node, attrs, children) {
  for (const [name, value] of Object.entries(attrs)) {
    if (value !== null && value !== undefined && value !== false) node.setAttribute(name, String(value));
  }
  node.append(...children);
  return node;
}

const isSpecial = (piece) => /^<[^<>]+>$/.test(piece);

/** A piece for display: a subtle dot for the word marker, special tokens styled apart. */
function pieceNode(piece) {
  const span = el("span", { class: isSpecial(piece) ? "piece special" : "piece" });
  let rest = String(piece);
  if (rest.startsWith(WORD_MARK)) {
    span.append(el("span", { class: "wm", "aria-hidden": "true" }, "·"));
    rest = rest.slice(1);
  }
  span.append(rest.replaceAll(WORD_MARK, " "));
  return span;
}

/** A piece as plain words, for labels and tooltips. */
function pieceLabel(piece) {
  const text = String(piece).replaceAll(WORD_MARK, " ").trim();
  return text || "(space)";
}

/** Join pieces into text, dropping special tokens such as <s> and </s>. */
function joinPieces(pieces) {
  return pieces.filter((p) => !isSpecial(p)).join("").replaceAll(WORD_MARK, " ").trim();
}

const fmt = (x, digits = 2) => (Number.isFinite(x) ? x.toFixed(digits) : "–");

/* ------------------------------------------------------------------ colour scale */

// viridis, sampled at 0, 1/9, ..., 1 (matplotlib's values, rounded)
const VIRIDIS = [
  [68, 1, 84], [72, 40, 120], [62, 74, 137], [49, 104, 142], [38, 130, 142],
  [31, 158, 137], [53, 183, 121], [109, 205, 89], [180, 222, 44], [253, 231, 37],
];

function viridis(t) {
  const x = Math.min(1, Math.max(0, Number(t) || 0)) * (VIRIDIS.length - 1);
  const i = Math.min(VIRIDIS.length - 2, Math.floor(x));
  const f = x - i;
  return VIRIDIS[i].map((c, k) => Math.round(c + f * (VIRIDIS[i + 1][k] - c)));
}

/** Dark or light text, whichever reads better on the background (WCAG relative luminance). */
function textOn([r, g, b]) {
  const lin = (v) => (v / 255 <= 0.03928 ? v / 255 / 12.92 : ((v / 255 + 0.055) / 1.055) ** 2.4);
  const luminance = 0.2126 * lin(r) + 0.7152 * lin(g) + 0.0722 * lin(b);
  return luminance > 0.18 ? "#111" : "#fff";
}

function paintScaleBar() {
  const stops = VIRIDIS.map((c, i) => `rgb(${c.join(",")}) ${(100 * i) / (VIRIDIS.length - 1)}%`);
  $("scale-bar").style.background = `linear-gradient(to right, ${stops.join(", ")})`;
}

/* ------------------------------------------------------------------ API */

class ApiError extends Error {
  constructor(message, status = null) {
    super(message);
    this.status = status; // the HTTP status, or null when there was no answer
  }
}

/** Input the page refuses before sending anything; `field` is the id of the control at fault. */
class InputError extends Error {
  constructor(message, field) {
    super(message);
    this.field = field;
  }
}

/** fetch JSON; any failure becomes an ApiError with a message fit to show. */
async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(path, { headers: { Accept: "application/json" }, ...options });
  } catch {
    throw new ApiError("The server cannot be reached");
  }
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    let message = body && typeof body.error === "string" ? body.error : `HTTP ${response.status}`;
    const retry = response.headers.get("Retry-After");
    if (response.status === 503 && retry) message += ` (try again in ${retry} s)`;
    throw new ApiError(message, response.status);
  }
  if (body === null) throw new ApiError(`HTTP ${response.status}: the reply is not JSON`);
  return body;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = false;
}

function clearError() {
  const box = $("error");
  box.textContent = "";
  box.hidden = true;
}

/** An InputError beside its field (only the glossary has such a box), the field marked invalid. */
function showFieldError(error) {
  const field = $(error.field);
  const box = $(`${error.field}-error`);
  field.setAttribute("aria-invalid", "true");
  box.textContent = error.message;
  box.hidden = false;
  field.focus();
}

function clearFieldError(id) {
  $(id).removeAttribute("aria-invalid");
  const box = $(`${id}-error`);
  box.textContent = "";
  box.hidden = true;
}

/* ------------------------------------------------------------------ model info */

const limits = () => ({ ...FALLBACK_LIMITS, ...(state.model?.limits ?? {}) });
const features = () => state.model?.features ?? { attention: true, search: true, attention_kinds: ["cross"] };

async function loadModel() {
  try {
    state.model = await api("/v1/model");
  } catch (error) {
    $("model-info").textContent = "Model information is unavailable.";
    showError(error.message);
  }
  configureControls();
}

function renderModelInfo(model) {
  const parts = [
    model.name,
    model.arch,
    `${model.source_language} → ${model.target_language}`,
    `${Number(model.parameters).toLocaleString("en")} parameters`,
  ];
  if (model.engine) parts.push(model.engine);
  const bleu = model.validation?.valid_bleu;
  if (Number.isFinite(bleu)) parts.push(`validation BLEU ${fmt(bleu, 1)}`);
  const info = $("model-info");
  info.textContent = parts.filter(Boolean).join(" · ");
  if (model.validation?.valid_bleu_signature) info.title = model.validation.valid_bleu_signature;
}

/** Limits, defaults and features of the model (or fallbacks) onto the form controls. */
function configureControls() {
  const { max_chars: maxChars, max_beam: maxBeam } = limits();
  $("source").maxLength = maxChars;
  const beam = $("beam");
  beam.max = maxBeam;
  const defaultBeam = state.model?.search?.beam;
  if (Number.isInteger(defaultBeam)) beam.value = Math.min(Math.max(1, defaultBeam), maxBeam);

  const feats = features();
  $("self-attention-label").hidden = !(feats.attention && SELF_KINDS.some((k) => selfKindOffered(k)));
  const showSearch = $("show-search");
  showSearch.disabled = feats.search === false;
  if (feats.search === false) showSearch.checked = false;
  if (state.model) {
    renderModelInfo(state.model);
    $("source").lang = state.model.source_language;
    $("source-lang").textContent = `(${state.model.source_language})`;
    $("required").lang = state.model.target_language;
  }
  configureGlossaries(state.model?.glossaries ?? []);
  updateCharCount();
}

/** The server's named glossaries as a choice ("none" first); hidden when it has none. */
function configureGlossaries(names) {
  const select = $("glossary-name");
  const current = select.value;
  fillSelect(select, [["", "none"], ...names.map((name) => [name, name])], names.includes(current) ? current : "");
  $("glossary-name-field").hidden = names.length === 0;
  onGlossaryChoice();
}

/** A named glossary replaces the typed terms: the box is disabled while one is chosen. */
function onGlossaryChoice() {
  const named = $("glossary-name").value !== "";
  $("glossary").disabled = named;
  if (named) clearFieldError("glossary");
}

const selfKindOffered = (kind) => (features().attention_kinds ?? []).includes(kind);

function updateCharCount() {
  const source = $("source");
  $("char-count").textContent = `${source.value.length} / ${source.maxLength} characters`;
}

/* ------------------------------------------------------------------ translating */

function readBeam() {
  const beam = $("beam");
  const value = Math.round(Number(beam.value));
  const clamped = Math.min(limits().max_beam, Math.max(1, Number.isFinite(value) ? value : 1));
  beam.value = clamped;
  return clamped;
}

/** Alternatives "a | b" as a list, one phrase as itself; empty parts dropped. */
function splitAlternatives(text) {
  return text.split("|").map((p) => p.trim()).filter(Boolean);
}

/** A glossary line cut at its first tab, or else its first "=": [source, targets], or null. */
function cutTerm(line) {
  const tab = line.indexOf("\t");
  const at = tab >= 0 ? tab : line.indexOf("=");
  return at >= 0 ? [line.slice(0, at), line.slice(at + 1)] : null;
}

/**
 * The glossary box as API terms: each line "source term = target term" (or a tab instead
 * of " = "), targets separated by "|" (or more tabs); blank lines and "#" comments are
 * skipped. A malformed line is an InputError naming it.
 */
function parseGlossary(text) {
  const terms = [];
  text.split(/\r?\n/).forEach((line, i) => {
    if (!line.trim() || line.trim().startsWith("#")) return;
    const where = `Glossary line ${i + 1}`;
    const cut = cutTerm(line);
    if (!cut) {
      throw new InputError(`${where}: expected “source term = target term”, got “${line.trim()}”.`, "glossary");
    }
    const source = cut[0].trim();
    const targets = cut[1].split(/\t|\|/).map((t) => t.trim()).filter(Boolean);
    if (!source) throw new InputError(`${where}: the source term before “=” is empty.`, "glossary");
    if (!targets.length) throw new InputError(`${where}: no target term after “=” for “${source}”.`, "glossary");
    terms.push({ source, targets });
  });
  const limit = limits().max_glossary_terms;
  if (terms.length > limit) {
    throw new InputError(`The glossary has ${terms.length} terms; the server takes at most ${limit}.`, "glossary");
  }
  return terms;
}

/** The glossary (a server's name or typed terms) and required phrases, only those given. */
function readTerms() {
  const extra = {};
  const named = $("glossary-name").value;
  const terms = named ? [] : parseGlossary($("glossary").value);
  if (named) extra.glossary = named;
  else if (terms.length) extra.glossary = terms;
  const phrases = $("required").value.split(",").map(splitAlternatives).filter((alts) => alts.length)
    .map((alts) => (alts.length === 1 ? alts[0] : alts));
  if (phrases.length) extra.constraints = [phrases]; // one list: the request has one text
  return extra;
}

/** The request for `text`; attention for `extraKinds` too, and for the chosen head's kind. */
function buildRequest(text, extraKinds = []) {
  const feats = features();
  const withSelf = $("self-attention").checked;
  const wanted = [...extraKinds, state.chosenHead?.kind].filter(Boolean);
  const kinds = ["cross", ...SELF_KINDS.filter((kind) =>
    (withSelf || wanted.includes(kind)) && selfKindOffered(kind))];
  const terms = readTerms(); // first: an InputError must stop the request before anything else
  return {
    text,
    ...terms,
    // a model whose search has no beam (mask-predict) refuses the option
    ...(state.model?.search_options?.includes("beam") === false ? {} : { beam: readBeam() }),
    return_attention: feats.attention !== false,
    attention_kinds: kinds,
    // the service shows no search view for a constrained translation (its beam is wider)
    return_search: $("show-search").checked && feats.search !== false
      && !terms.glossary && !terms.constraints,
    candidates: 5,
  };
}

function setBusy(busy) {
  state.busy = busy;
  const button = $("translate");
  button.disabled = busy;
  button.classList.toggle("busy", busy);
  button.querySelector(".label").textContent = busy ? "Translating…" : "Translate";
  button.setAttribute("aria-busy", String(busy));
}

/** Translates the text in the box (with attention for `extraKinds` too); whether it was shown. */
async function translate(extraKinds = []) {
  if (state.busy) return false;
  const text = $("source").value;
  if (!text.trim()) {
    showError("Enter some text to translate.");
    return false;
  }
  let request;
  try {
    request = buildRequest(text, extraKinds);
  } catch (error) {
    if (!(error instanceof InputError)) throw error;
    clearError();
    showFieldError(error);
    return false;
  }
  clearFieldError("glossary");
  return send(request);
}

/** Posts a translation request and shows the answer; whether it was shown. */
async function send(request) {
  if (state.busy) return false;
  setBusy(true);
  try {
    const reply = await api("/v1/translate", {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "application/json" },
      body: JSON.stringify(request),
    });
    const result = reply.translations?.[0];
    if (!result) throw new ApiError("The server returned no translation");
    clearError();
    state.lastRequest = request;
    renderResult(result);
    return true;
  } catch (error) {
    showError(error instanceof ApiError ? error.message : `Unexpected error: ${error.message}`);
    if (!(error instanceof ApiError)) console.warn(error);
    return false;
  } finally {
    setBusy(false);
  }
}

function renderResult(result) {
  renderTranslation(result);
  renderAttention(result.attention);
  renderSearch(result.search);
}

function renderTranslation(result) {
  $("result").hidden = false;
  const target = $("translation");
  const constraints = Array.isArray(result.constraints) ? result.constraints : [];
  target.replaceChildren(...markedText(String(result.text ?? ""), constraints.filter((c) => c.met)));
  if (state.model?.target_language) target.lang = state.model.target_language;
  renderConstraints(constraints);

  const hypotheses = result.hypotheses ?? [];
  $("nbest").replaceChildren(...hypotheses.map((h) => el("li", {},
    el("span", { class: "hyp-text", lang: state.model?.target_language }, h.text),
    el("span", { class: "hyp-score" }, `score ${fmt(h.score)} · log-prob ${fmt(h.log_prob)}`))));
  $("nbest-block").hidden = hypotheses.length < 2;
}

/** Spans [start, end) of `text` where a phrase of the constraints occurs, overlaps merged. */
function phraseSpans(text, constraints) {
  const spans = [];
  for (const constraint of constraints) {
    for (const phrase of String(constraint.text).split(ALTERNATIVES).map((p) => p.trim()).filter(Boolean)) {
      for (let at = text.indexOf(phrase); at >= 0; at = text.indexOf(phrase, at + phrase.length)) {
        spans.push([at, at + phrase.length]);
      }
    }
  }
  spans.sort((a, b) => a[0] - b[0] || b[1] - a[1]);
  const merged = [];
  for (const [start, end] of spans) {
    const last = merged[merged.length - 1];
    if (last && start < last[1]) last[1] = Math.max(last[1], end);
    else merged.push([start, end]);
  }
  return merged;
}

/** The text as text nodes, with each occurrence of a met constraint's phrase in a <mark class="term">. */
function markedText(text, met) {
  const nodes = [];
  let done = 0;
  for (const [start, end] of phraseSpans(text, met)) {
    if (start > done) nodes.push(text.slice(done, start));
    nodes.push(el("mark", { class: "term", title: "required term (met)" }, text.slice(start, end)));
    done = end;
  }
  if (done < text.length) nodes.push(text.slice(done));
  return nodes;
}

/** Each constraint of the translation and whether it was met, in words (not only colour). */
function renderConstraints(constraints) {
  $("constraints-block").hidden = constraints.length === 0;
  const lang = state.model?.target_language;
  $("constraints").replaceChildren(...constraints.map((c) => el("li", { class: c.met ? "constraint met" : "constraint unmet" },
    el("span", { class: "constraint-mark", "aria-hidden": "true" }, c.met ? "✓" : "✗"),
    el("span", { class: "constraint-text", lang }, String(c.text)),
    el("span", { class: "constraint-status" }, c.met ? "met" : "not met"))));
  const count = constraints.filter((c) => c.met).length;
  $("constraints-summary").textContent =
    `${count} of ${constraints.length} required term${constraints.length === 1 ? "" : "s"} met.`;
}

/* ------------------------------------------------------------------ attention: data */

/** Row and column axes of an attention kind: pieces, their language, a name. */
function axesOf(attention, kind) {
  const source = { pieces: attention.source_pieces ?? [], lang: state.model?.source_language, name: "Source" };
  const target = { pieces: attention.target_pieces ?? [], lang: state.model?.target_language, name: "Translation" };
  if (kind === "encoder_self") {
    return { row: { ...source, name: "Source (attending)" }, col: { ...source, name: "Source (attended)" } };
  }
  if (kind === "decoder_self") {
    return { row: target, col: { ...target, pieces: attention.decoder_inputs ?? [], name: "Decoder input" } };
  }
  return { row: target, col: source };
}

/** The rows x cols matrix of one layer and one head, or the mean over heads ("avg"). */
function viewMatrix(attention, { kind, layer, head }) {
  const heads = attention[kind][layer];
  if (head !== "avg") return heads[head];
  return heads[0].map((row, i) =>
    row.map((_, j) => heads.reduce((sum, h) => sum + h[i][j], 0) / heads.length),
  );
}

/** Indices whose weight counts as highlighted: >= HIGHLIGHT_MIN, and always the largest. */
function highlightedSet(weights) {
  let best = 0;
  weights.forEach((w, i) => { if (w > weights[best]) best = i; });
  const set = new Set(weights.flatMap((w, i) => (w >= HIGHLIGHT_MIN ? [i] : [])));
  if (weights.length) set.add(best);
  return set;
}

/* ------------------------------------------------------------------ attention: controls */

function renderAttention(attention) {
  state.attention = attention;
  state.pinned = state.hover = null;
  const section = $("attention");
  const returned = (kind) => Array.isArray(attention?.[kind]) && attention[kind].length > 0;
  const kinds = Object.keys(KIND_LABELS).filter(returned);
  section.hidden = kinds.length === 0;
  if (!kinds.length) return;

  const rnn = state.model?.arch === "rnn";
  $("map-title").textContent = rnn ? "Bahdanau alignment" : "Attention";
  const chosen = shownHead(state.chosenHead);
  const kind = chosen?.kind ?? (kinds.includes(state.view.kind) ? state.view.kind : kinds[0]);
  fillSelect($("kind"), kinds.map((k) => [k, KIND_LABELS[k]]), kind);
  $("kind").closest("label").hidden = kinds.length < 2;
  if (chosen) selectKind(chosen.kind, chosen.layer, chosen.index);
  else selectKind($("kind").value);
}

/** `entry` (a heads.json head) if the shown attention has its map, else null. */
function shownHead(entry) {
  const heads = entry && !entry.pruned ? state.attention?.[entry.kind]?.[entry.layer] : null;
  return Array.isArray(heads) && Number.isInteger(entry.index) && entry.index < heads.length ? entry : null;
}

function fillSelect(select, options, selected) {
  select.replaceChildren(...options.map(([value, label]) => el("option", { value }, label)));
  select.value = String(selected);
}

/**
 * A new kind: refill the layer and head selectors and rebuild the map, showing `layer`
 * (default: the last) and `head` (an index into that layer's heads; default: their average).
 */
function selectKind(kind, layer = null, head = "avg") {
  const layers = state.attention[kind];
  const rnn = state.model?.arch === "rnn";
  state.view = { kind, layer: layer ?? layers.length - 1, head };
  fillSelect($("layer"), layers.map((_, i) => [i, `${i + 1} of ${layers.length}`]), state.view.layer);
  $("layer-label").hidden = rnn || layers.length < 2;
  fillHeadOptions();
  state.pinned = state.hover = null;
  buildHeatmap();
  buildStrips();
  updateView();
}

/** The head selector for the view's layer: a pruned model's layers may differ in heads. */
function fillHeadOptions() {
  const { kind, layer, head } = state.view;
  const count = state.attention[kind][layer].length;
  const options = Array.from({ length: count }, (_, i) => [i, headName(kind, layer, i)]);
  state.view.head = head !== "avg" && head < count ? head : "avg";
  fillSelect($("head"), [["avg", "average"], ...options], state.view.head);
  $("head-label").hidden = state.model?.arch === "rnn" || count < 2;
}

function onViewChange() {
  const head = $("head").value;
  state.view.layer = Number($("layer").value);
  state.view.head = head === "avg" ? "avg" : Number(head);
  fillHeadOptions();
  state.chosenHead = headAt(state.view); // a head chosen here is kept like one clicked
  updateView();
}

/** Recompute the matrix of the current view and repaint cells and highlights. */
function updateView() {
  state.matrix = viewMatrix(state.attention, state.view);
  paintCells();
  applyHighlight();
  showHeadCaption();
}

/* ------------------------------------------------------------------ attention: heat map */

function buildHeatmap() {
  const { kind } = state.view;
  const axes = axesOf(state.attention, kind);
  // focusable header: Enter/Space pins it (see wireHeatmapEvents)
  const header = (scope, cls, data, piece, lang) => el("th", { scope, class: cls, ...data, tabindex: 0,
    lang, "aria-label": pieceLabel(piece), "aria-selected": "false" }, pieceNode(piece));

  const headRow = el("tr", {}, el("td", { class: "corner" }));
  axes.col.pieces.forEach((piece, j) => {
    headRow.append(header("col", "source-piece", { "data-col": j }, piece, axes.col.lang));
  });
  const body = el("tbody");
  axes.row.pieces.forEach((piece, i) => {
    const row = el("tr", { "data-row": i }, header("row", "target-piece", { "data-row": i }, piece, axes.row.lang));
    axes.col.pieces.forEach((_, j) => row.append(el("td", { class: "cell", "data-row": i, "data-col": j })));
    body.append(row);
  });
  const caption = el("caption", { class: "visually-hidden" },
    `${KIND_LABELS[kind]}: rows are ${axes.row.name} pieces, columns ${axes.col.name} pieces`);
  const table = el("table", { class: "attention-map" }, caption, el("thead", {}, headRow), body);
  $("heatmap").replaceChildren(table);
}

function paintCells() {
  const axes = axesOf(state.attention, state.view.kind);
  for (const cell of $("heatmap").querySelectorAll("td.cell")) {
    const i = Number(cell.dataset.row);
    const j = Number(cell.dataset.col);
    const w = state.matrix[i]?.[j] ?? 0;
    const rgb = viridis(w);
    cell.style.backgroundColor = `rgb(${rgb.join(",")})`;
    cell.style.color = textOn(rgb);
    cell.textContent = w >= 0.995 ? "1" : w >= SHOWN_MIN ? w.toFixed(2).slice(1) : "";
    const from = pieceLabel(axes.row.pieces[i] ?? "?");
    const label = `${from} → ${pieceLabel(axes.col.pieces[j] ?? "?")}: ${w.toFixed(3)}`;
    cell.title = label;
    cell.setAttribute("aria-label", label);
  }
}

/** The source sentence and the translation as strips of tokens that highlight with the map. */
function buildStrips() {
  const axes = axesOf(state.attention, state.view.kind);
  const strip = ({ pieces, lang }, axis) =>
    pieces.map((p, i) => el("span", { class: "token", "data-axis": axis, "data-index": i, lang }, pieceNode(p)));
  $("col-strip").replaceChildren(...strip(axes.col, "col"));
  $("row-strip").replaceChildren(...strip(axes.row, "row"));
  $("col-strip-label").textContent = axes.col.name;
  $("row-strip-label").textContent = axes.row.name;
}

/* ------------------------------------------------------------------ attention: highlighting */

/** The selection a header or strip token stands for, or null. */
function selectionOf(node) {
  const target = node instanceof Element ? node.closest("th.target-piece, th.source-piece, .token") : null;
  if (!target) return null;
  const { axis, index, row, col } = target.dataset;
  if (target.classList.contains("token")) return { axis, index: Number(index) };
  if (target.classList.contains("target-piece")) return { axis: "row", index: Number(row) };
  return { axis: "col", index: Number(col) };
}

const sameSelection = (a, b) => Boolean(a && b && a.axis === b.axis && a.index === b.index);

function setHover(selection) {
  if (sameSelection(selection, state.hover) || (!selection && !state.hover)) return;
  state.hover = selection;
  applyHighlight();
}

function togglePin(selection) {
  state.pinned = sameSelection(selection, state.pinned) ? null : selection;
  state.hover = null; // show the pinned state (or its removal) right away
  applyHighlight();
}

/** Restyle headers, strip tokens and cells for the shown selection (hover wins over pinned). */
function applyHighlight() {
  const root = $("attention");
  const rowHeads = [...root.querySelectorAll("th.target-piece")];
  const colHeads = [...root.querySelectorAll("th.source-piece")];
  const rowTokens = [...$("row-strip").children];
  const colTokens = [...$("col-strip").children];
  for (const node of [...rowHeads, ...colHeads, ...rowTokens, ...colTokens]) {
    node.classList.remove("highlighted", "selected", "pinned");
    node.style.removeProperty("--w");
    if (node.tagName === "TH") node.setAttribute("aria-selected", "false");
  }
  for (const node of root.querySelectorAll("tr.selected, td.col-selected")) {
    node.classList.remove("selected", "col-selected");
  }

  const selection = state.hover ?? state.pinned;
  if (!selection || !state.matrix.length) return;
  const { axis, index } = selection;
  const byRow = axis === "row";
  const weights = byRow ? state.matrix[index] ?? [] : state.matrix.map((row) => row[index] ?? 0);
  const marked = highlightedSet(weights);
  const [ownHeads, ownTokens, otherHeads, otherTokens] = byRow
    ? [rowHeads, rowTokens, colHeads, colTokens]
    : [colHeads, colTokens, rowHeads, rowTokens];

  for (const node of [ownHeads[index], ownTokens[index]]) {
    if (!node) continue;
    node.classList.add("selected");
    node.classList.toggle("pinned", sameSelection(selection, state.pinned));
    if (node.tagName === "TH") node.setAttribute("aria-selected", "true");
  }
  if (byRow) {
    root.querySelector(`tr[data-row="${index}"]`)?.classList.add("selected");
  } else {
    for (const cell of root.querySelectorAll(`td.cell[data-col="${index}"]`)) cell.classList.add("col-selected");
  }

  weights.forEach((w, k) => {
    for (const node of [otherHeads[k], otherTokens[k]]) {
      if (!node) continue;
      node.style.setProperty("--w", w.toFixed(3));
      node.classList.toggle("highlighted", marked.has(k));
    }
  });
}

function clearSelection() {
  state.pinned = state.hover = null;
  applyHighlight();
}

function wireHeatmapEvents() {
  for (const area of [$("heatmap"), $("col-strip"), $("row-strip")]) {
    area.addEventListener("mouseover", (e) => setHover(selectionOf(e.target)));
    area.addEventListener("mouseleave", () => setHover(null));
    area.addEventListener("click", (e) => {
      const selection = selectionOf(e.target);
      if (selection) togglePin(selection);
    });
  }
  const map = $("heatmap");
  map.addEventListener("focusin", (e) => setHover(selectionOf(e.target)));
  map.addEventListener("focusout", () => setHover(null));
  map.addEventListener("keydown", (e) => {
    const selection = selectionOf(e.target);
    if (selection && (e.key === "Enter" || e.key === " ")) {
      e.preventDefault();
      togglePin(selection);
    }
  });
  $("attention").addEventListener("keydown", (e) => {
    if (e.key === "Escape") clearSelection();
  });
  $("clear-selection").addEventListener("click", clearSelection);
  $("kind").addEventListener("change", () => {
    selectKind($("kind").value);
    state.chosenHead = null;
  });
  $("layer").addEventListener("change", onViewChange);
  $("head").addEventListener("change", onViewChange);
}

/* ------------------------------------------------------------------ views: translation, heads */

const VIEWS = { translation: "tab-translation", heads: "tab-heads" };

/** Shows one view (the body's data-view selects the panels, see style.css); heads load once. */
function showView(view) {
  document.body.dataset.view = view;
  for (const [name, id] of Object.entries(VIEWS)) {
    const tab = $(id);
    tab.setAttribute("aria-selected", String(name === view));
    tab.tabIndex = name === view ? 0 : -1;
  }
  if (view === "heads") loadHeads();
}

function wireViewEvents() {
  for (const [name, id] of Object.entries(VIEWS)) $(id).addEventListener("click", () => showView(name));
  $("view-tabs").addEventListener("keydown", (e) => { // arrow keys move between the tabs
    if (e.key !== "ArrowLeft" && e.key !== "ArrowRight") return;
    const names = Object.keys(VIEWS);
    const at = names.indexOf(document.body.dataset.view);
    const next = names[(at + (e.key === "ArrowRight" ? 1 : names.length - 1)) % names.length];
    showView(next);
    $(VIEWS[next]).focus();
  });
  $("heads-grids").addEventListener("click", (e) => {
    const button = e.target instanceof Element ? e.target.closest("button.head-button") : null;
    if (!button || button.disabled) return;
    const { kind, layer, head } = button.closest("td").dataset;
    const entry = state.heads.heads.find((h) =>
      h.kind === kind && h.layer === Number(layer) && h.head === Number(head));
    if (entry) showHead(entry);
  });
}

/* ------------------------------------------------------------------ heads: the grids */

const kindLabel = (kind) => (state.model?.arch === "rnn" && kind === "cross" ? "Bahdanau alignment" : KIND_LABELS[kind]);

/** The heads.json entry at the view's position (kind, layer, index into the maps), or null. */
function headAt({ kind, layer, head }) {
  if (head === "avg" || !state.heads) return null;
  return state.heads.heads.find((h) => !h.pruned && h.kind === kind && h.layer === layer && h.index === head) ?? null;
}

/** A head's name (1-based): its number in the original model where heads.json gives it. */
function headName(kind, layer, index) {
  const entry = headAt({ kind, layer, head: index });
  return String((entry ? entry.head : index) + 1);
}

const hexRgb = (hex) => [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16));

function roleColours(roles) {
  let spare = 0;
  return Object.fromEntries(Object.keys(roles).map((role) =>
    [role, ROLE_COLOURS[role] ?? SPARE_COLOURS[spare++ % SPARE_COLOURS.length]]));
}

/** The number a cell shows: BLEU lost when the head is masked, else its gradient importance. */
function importanceOf(entry) {
  const { masking_bleu: bleu, gradient } = entry.importance ?? {};
  if (Number.isFinite(bleu)) return { value: bleu, measure: "BLEU lost when masked" };
  if (Number.isFinite(gradient)) return { value: gradient, measure: "gradient importance" };
  return null;
}

async function loadHeads() {
  if (state.headsAsked) return;
  state.headsAsked = true;
  const message = $("heads-message");
  message.textContent = "Loading the analysis of the heads…";
  message.hidden = false;
  try {
    renderHeads(await api("/v1/heads"));
    message.hidden = true;
  } catch (error) {
    message.textContent = error.message; // a 404 says how to make heads.json
    if (error.status === null) state.headsAsked = false; // no answer: ask again next time
  }
}

function renderHeads(report) {
  state.heads = report;
  state.roleColours = roleColours(report.roles ?? {});
  const shown = report.heads.filter((h) => !h.pruned).length;
  const pruned = report.heads.length - shown;
  $("heads-summary").textContent = `${report.model} (${report.arch}): ${shown} heads` +
    (pruned ? ` and ${pruned} pruned` : "") +
    `, analysed on ${Number(report.sentences).toLocaleString("en")} sentences.`;
  renderHeadsLegend(report);
  const kinds = HEAD_KINDS.filter((kind) => report.heads.some((h) => h.kind === kind));
  $("heads-grids").replaceChildren(...kinds.map((kind) => headsGrid(report.heads.filter((h) => h.kind === kind), kind)));
  if (state.attention) { // name the shown heads as heads.json does
    fillHeadOptions();
    showHeadCaption();
  }
}

function renderHeadsLegend(report) {
  const items = Object.entries(report.roles ?? {}).map(([role, description]) => el("li", {},
    roleSwatch(role), el("span", { class: "role-name" }, role), ` ${description}`));
  const thresholds = Object.entries(report.thresholds ?? {}).map(([name, value]) => `${name} ${value}`).join(" · ");
  $("heads-legend").replaceChildren(
    el("ul", { class: "role-list", "aria-label": "Roles" }, ...items),
    el("p", { class: "legend", title: "the numbers the rules that assign the roles compare with" },
      `Role thresholds: ${thresholds || "none given"}.`));
}

function roleSwatch(role) {
  const swatch = el("span", { class: "role-swatch", "data-role": role, "aria-hidden": "true" });
  swatch.style.backgroundColor = state.roleColours[role] ?? "#fff";
  return swatch;
}

/** One kind's grid: a row per layer, a column per head (original numbers); absent positions empty. */
function headsGrid(entries, kind) {
  const layers = Math.max(...entries.map((h) => h.layer)) + 1;
  const columns = Math.max(...entries.map((h) => h.head)) + 1;
  const at = new Map(entries.map((h) => [`${h.layer}/${h.head}`, h]));
  const headRow = el("tr", {}, el("td", { class: "corner" }),
    ...Array.from({ length: columns }, (_, h) => el("th", { scope: "col" }, `head ${h + 1}`)));
  const body = el("tbody");
  for (let layer = 0; layer < layers; layer++) {
    const row = el("tr", {}, el("th", { scope: "row" }, `layer ${layer + 1}`));
    for (let head = 0; head < columns; head++) {
      const entry = at.get(`${layer}/${head}`);
      row.append(entry ? headCell(entry) : el("td", { class: "head-cell empty" }));
    }
    body.append(row);
  }
  return el("table", { class: "heads-grid", id: `heads-grid-${kind}`, "data-kind": kind },
    el("caption", {}, kindLabel(kind)), el("thead", {}, headRow), body);
}

function headCell(entry) {
  const { kind, layer, head, role, pruned } = entry;
  const importance = importanceOf(entry);
  const name = `${kindLabel(kind)}, layer ${layer + 1}, head ${head + 1}`;
  const lines = [name, pruned ? "pruned: removed from this model" : `role: ${role}${entry.detail ? ` (${entry.detail})` : ""}`];
  const stats = [["confidence", entry.confidence], ["entropy", entry.entropy], ["mean distance", entry.distance]]
    .filter(([, v]) => Number.isFinite(v)).map(([k, v]) => `${k} ${fmt(v)}`);
  if (stats.length) lines.push(stats.join(" · "));
  const measures = [["BLEU lost when masked", "masking_bleu"], ["NLL gained when masked", "masking_nll"], ["gradient", "gradient"]]
    .filter(([, key]) => Number.isFinite(entry.importance?.[key]))
    .map(([label, key]) => `${label} ${fmt(entry.importance[key], 3)}`);
  if (measures.length) lines.push(`importance: ${measures.join(", ")}`);
  const button = el("button", {
    type: "button", class: "head-button", disabled: pruned, "aria-pressed": "false",
    title: lines.join("\n"), "aria-label": lines.join("; "),
  },
  el("span", { class: "head-importance" }, importance ? fmt(importance.value) : "–"),
  el("span", { class: "head-role" }, pruned ? "pruned" : role));
  if (!pruned) {
    const colour = state.roleColours[role] ?? "#fff";
    button.style.backgroundColor = colour;
    button.style.color = textOn(hexRgb(colour));
  }
  return el("td", { class: pruned ? "head-cell pruned" : "head-cell", "data-kind": kind,
    "data-layer": layer, "data-head": head, "data-role": role }, button);
}

/* ------------------------------------------------------------------ heads: one head's map */

/** Shows `entry`'s heat map on the current sentence, translating for its kind if need be. */
async function showHead(entry) {
  if (features().attention === false) {
    showError("This server does not return attention (rosetta serve --engine torch does).");
    return;
  }
  state.chosenHead = entry;
  document.body.classList.add("head-shown");
  if (shownHead(entry)) {
    $("kind").value = entry.kind;
    selectKind(entry.kind, entry.layer, entry.index);
  } else {
    // the last sentence again with this kind (or, before any, the text in the box);
    // renderAttention shows the chosen head
    const last = state.lastRequest;
    const kinds = [...new Set([...(last?.attention_kinds ?? []), entry.kind])];
    const shown = last ? await send({ ...last, return_attention: true, attention_kinds: kinds }) : await translate([entry.kind]);
    if (shown && state.chosenHead === entry && !shownHead(entry)) {
      showError(`The attention returned has no ${kindLabel(entry.kind)} layer ${entry.layer + 1} head at index ${entry.index}.`);
    }
  }
  if (state.chosenHead === entry) $("attention").scrollIntoView({ block: "nearest" });
}

/** The caption naming the head shown (kind, layer, head, role), and its cell marked in the grid. */
function showHeadCaption() {
  const entry = state.attention ? headAt(state.view) : null;
  const caption = $("head-caption");
  caption.hidden = !entry;
  if (entry) {
    const detail = entry.detail ? ` (${entry.detail})` : "";
    caption.replaceChildren(roleSwatch(entry.role),
      `${kindLabel(entry.kind)}, layer ${entry.layer + 1}, head ${entry.head + 1}: ${entry.role}${detail}`);
  }
  for (const cell of $("heads-grids").querySelectorAll("td.head-cell:not(.empty)")) {
    const { kind, layer, head } = cell.dataset;
    const chosen = Boolean(entry) && kind === entry.kind && Number(layer) === entry.layer && Number(head) === entry.head;
    cell.classList.toggle("chosen", chosen);
    cell.firstChild.setAttribute("aria-pressed", String(chosen));
  }
}

/* ------------------------------------------------------------------ search: candidates */

function renderSearch(search) {
  const section = $("search");
  section.hidden = !search;
  if (!search) return;
  renderCandidates(search.candidates ?? [], state.attention?.target_pieces ?? []);
  const hasBeam = Boolean(search.beam && search.beam.nodes?.length);
  $("beam-block").hidden = !hasBeam;
  $("beam-tree").replaceChildren();
  if (hasBeam) renderBeamTree(search.beam);
}

function percent(p) {
  const value = 100 * p;
  return `${value < 10 ? value.toFixed(1) : value.toFixed(0)}%`;
}

function renderCandidates(candidates, targetPieces) {
  const lang = state.model?.target_language;
  const head = el("thead", {}, el("tr", {},
    el("th", { scope: "col" }, "#"),
    el("th", { scope: "col" }, "Produced"),
    el("th", { scope: "col" }, "Most probable pieces")));
  const body = el("tbody");
  candidates.forEach((list, i) => {
    const produced = targetPieces[i];
    const items = list.map((c) => {
      const chosen = produced !== undefined && c.piece === produced;
      const title = `${pieceLabel(c.piece)}: ${percent(c.prob)}`;
      return el("li", { class: chosen ? "candidate chosen" : "candidate", title },
        el("span", { class: "candidate-piece", lang }, pieceNode(c.piece)),
        el("span", { class: "bar", "aria-hidden": "true" }, barFill(c.prob)),
        el("span", { class: "prob" }, percent(c.prob),
          ...(chosen ? [el("span", { class: "check", "aria-hidden": "true" }, "✓"),
            el("span", { class: "visually-hidden" }, " (chosen)")] : [])));
    });
    body.append(el("tr", { "data-row": i },
      el("td", { class: "pos" }, String(i + 1)),
      el("th", { scope: "row", lang }, produced === undefined ? "–" : pieceNode(produced)),
      el("td", {}, el("ol", { class: "candidate-list" }, ...items))));
  });
  $("candidates").replaceChildren(
    el("caption", { class: "visually-hidden" }, "Top candidates for each produced piece"), head, body);
}

function barFill(prob) {
  const fill = el("span", { class: "bar-fill" });
  fill.style.width = `${Math.max(0, Math.min(1, prob)) * 100}%`;
  return fill;
}

/* ------------------------------------------------------------------ search: beam tree */

const TREE = { nodeW: 96, nodeH: 36, colGap: 34, rowGap: 8, pad: 10 };

/** Position nodes: x by step; per step, children grouped under their parent's position, best first. */
function layoutBeam(nodes) {
  const steps = new Map();
  for (const node of nodes) {
    if (!steps.has(node.step)) steps.set(node.step, []);
    steps.get(node.step).push(node);
  }
  const rank = new Map();
  const place = new Map();
  let maxRows = 1;
  for (const step of [...steps.keys()].sort((a, b) => a - b)) {
    const column = steps.get(step);
    column.sort((a, b) => (rank.get(a.parent) ?? 0) - (rank.get(b.parent) ?? 0) || b.log_prob - a.log_prob);
    column.forEach((node, i) => {
      rank.set(node.id, i);
      place.set(node.id, {
        x: TREE.pad + step * (TREE.nodeW + TREE.colGap),
        y: TREE.pad + i * (TREE.nodeH + TREE.rowGap),
      });
    });
    maxRows = Math.max(maxRows, column.length);
  }
  const lastStep = Math.max(...steps.keys());
  return {
    place,
    width: 2 * TREE.pad + (lastStep + 1) * TREE.nodeW + lastStep * TREE.colGap,
    height: 2 * TREE.pad + maxRows * TREE.nodeH + (maxRows - 1) * TREE.rowGap,
  };
}

/** Node id -> rank of the best chosen hypothesis whose path passes through it (0 = best). */
function chosenPaths(beam, byId) {
  const onPath = new Map();
  (beam.chosen ?? []).forEach((id, rank) => {
    for (const node of ancestry(byId.get(id), byId)) {
      if (!onPath.has(node.id) || onPath.get(node.id) > rank) onPath.set(node.id, rank);
    }
  });
  return onPath;
}

/** The nodes from the root down to `node` (guarded against malformed, cyclic parents). */
function ancestry(node, byId) {
  const path = [];
  const seen = new Set();
  for (let n = node; n && !seen.has(n.id); n = byId.get(n.parent)) {
    seen.add(n.id);
    path.unshift(n);
  }
  return path;
}

const pathPieces = (node, byId) => ancestry(node, byId).map((n) => n.piece);

function pathClass(onPath, id) {
  if (!onPath.has(id)) return "";
  return onPath.get(id) === 0 ? " on-path best-path" : " on-path";
}

function truncate(text, max) {
  return text.length > max ? `${text.slice(0, max - 1)}…` : text;
}

function beamNode(node, at, onPath, byId) {
  const { nodeW: w, nodeH: h } = TREE;
  const group = svg("g", {
    class: `node status-${node.status}${pathClass(onPath, node.id)}`,
    transform: `translate(${at.x},${at.y})`,
    "data-node-id": node.id,
  });
  const text = joinPieces(pathPieces(node, byId)) || "(empty)";
  const lines = [text, `log-prob ${fmt(node.log_prob, 3)}`];
  if (Number.isFinite(node.score)) lines.push(`normalised score ${fmt(node.score, 3)}`);
  lines.push(`${node.status.replace("_", " ")}, step ${node.step}`);
  group.append(svg("title", {}, lines.join("\n")));
  group.append(svg("rect", { class: "box", width: w, height: h, rx: 5 }));
  if (node.status === "finished") { // the double border
    group.append(svg("rect", { class: "inner", x: 3, y: 3, width: w - 6, height: h - 6, rx: 3 }));
  }

  const label = svg("text", { class: "piece-label", x: w / 2, y: 15, "text-anchor": "middle" });
  let piece = String(node.piece);
  if (piece.startsWith(WORD_MARK)) {
    label.append(svg("tspan", { class: "wm" }, "·"));
    piece = piece.slice(1);
  }
  label.append(truncate(piece.replaceAll(WORD_MARK, " "), 11));
  group.append(label);
  const score = svg("text", { class: "score-label", x: w / 2, y: 29, "text-anchor": "middle" }, fmt(node.log_prob));
  group.append(score);
  return group;
}

function renderBeamTree(beam) {
  const nodes = beam.nodes;
  const byId = new Map(nodes.map((n) => [n.id, n]));
  const { place, width, height } = layoutBeam(nodes);
  const onPath = chosenPaths(beam, byId);
  const best = byId.get(beam.chosen?.[0]);

  const edges = nodes
    .filter((n) => byId.has(n.parent))
    .map((n) => {
      const from = place.get(n.parent);
      const to = place.get(n.id);
      const [x1, y1] = [from.x + TREE.nodeW, from.y + TREE.nodeH / 2];
      const [x2, y2] = [to.x, to.y + TREE.nodeH / 2];
      const mid = (x1 + x2) / 2;
      const d = `M${x1},${y1} C${mid},${y1} ${mid},${y2} ${x2},${y2}`;
      return svg("path", { class: `edge status-${n.status}${pathClass(onPath, n.id)}`, d });
    });
  // chosen paths last, so they are drawn on top
  const byPathRank = (e) => (e.classList.contains("best-path") ? 2 : e.classList.contains("on-path") ? 1 : 0);
  edges.sort((a, b) => byPathRank(a) - byPathRank(b));

  const steps = Math.max(...nodes.map((n) => n.step));
  const summary = `Beam tree, beam size ${beam.size}, ${nodes.length} hypotheses over ${steps} steps` +
    (best ? `; the chosen translation is “${joinPieces(pathPieces(best, byId))}”` : "");
  const tree = svg("svg", {
    width, height, viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": summary,
    lang: state.model?.target_language,
  },
  svg("g", { class: "edges" }, ...edges),
  svg("g", { class: "nodes" }, ...nodes.map((n) => beamNode(n, place.get(n.id), onPath, byId))));
  $("beam-tree").replaceChildren(tree);
}

/* ------------------------------------------------------------------ start */

function wireInputEvents() {
  $("translate-form").addEventListener("submit", (e) => {
    e.preventDefault();
    translate();
  });
  for (const id of ["source", "glossary"]) {
    $(id).addEventListener("keydown", (e) => {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
        e.preventDefault();
        translate();
      }
    });
  }
  $("source").addEventListener("input", updateCharCount);
  $("beam").addEventListener("change", readBeam);
  $("glossary").addEventListener("input", () => clearFieldError("glossary"));
  $("glossary-name").addEventListener("change", onGlossaryChoice);
}

function start() {
  paintScaleBar();
  wireInputEvents();
  wireHeatmapEvents();
  wireViewEvents();
  updateCharCount();
  loadModel();
}

start();
