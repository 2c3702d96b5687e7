// vlmprune playground: plain JS, no build step. Talks only to the gateway's public API.
// A run = one streamed chat completion with X-VLMPrune-* headers (and X-VLMPrune-Trace, a fresh id),
// then GET /v1/vlmprune/traces/{id}: the tokens the engine kept, the stages and the cost.
"use strict";

const OUTLINE = "rgb(255, 210, 0)";  // kept cell outline; the dimmed image never reaches it
const DIM = "rgba(0, 0, 0, 0.65)";
const PANEL_WIDTH = { 1: 448, 2: 224 };  // canvas px per view panel (an integer number of px per cell)
const $ = (id) => document.getElementById(id);

const state = { model: null, meta: null, imageUrl: null, image: null, panels: [] };

function apiHeaders(extra = {}) {
  const key = $("api-key").value.trim();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

// The API's own message for a failed response: OpenAI's {"error": {"message"}}, else the text.
async function errorMessage(resp) {
  const text = await resp.text();
  try {
    const body = JSON.parse(text);
    if (body && body.error && body.error.message) return `${resp.status}: ${body.error.message}`;
  } catch (_) { /* not JSON */ }
  return `${resp.status}: ${text.slice(0, 300) || resp.statusText}`;
}

async function getJSON(path) {
  let resp;
  try {
    resp = await fetch(path, { headers: apiHeaders() });
  } catch (exc) {
    throw new Error(`cannot reach the gateway (${exc.message})`);
  }
  if (!resp.ok) throw new Error(await errorMessage(resp));
  return resp.json();
}

function showError(el, message) {
  el.textContent = message || "";
  el.hidden = !message;
}

// --- set-up ---------------------------------------------------------------------------------

// The methods come from the gateway itself, the model id from an upstream: either may fail alone
// (an upstream down still leaves the policy controls usable, and Run then shows the 503).
async function loadMeta() {
  showError($("page-error"), "");
  const errors = [];
  try {
    state.meta = await getJSON("/v1/vlmprune/methods");
    for (const panel of state.panels) fillPolicyControls(panel);
  } catch (exc) { errors.push(exc.message); }
  try {
    state.model = (await getJSON("/v1/models")).data[0].id;
  } catch (exc) { errors.push(exc.message); }
  const meta = state.meta;
  $("model-info").textContent = meta ? `model ${state.model || "?"} (${meta.family}); ` +
    (meta.tracing ? "kept-token overlays on" : "overlays off (no trace folder)") : "";
  showError($("page-error"), [...new Set(errors)].join("\n"));
}

function makePanel(name) {
  const node = $("panel-template").content.firstElementChild.cloneNode(true);
  node.id = `panel-${name}`;
  node.querySelector("h2").textContent = `Policy ${name.toUpperCase()}`;
  const el = {};
  node.querySelectorAll("[data-role]").forEach((e) => {
    e.id = `${name}-${e.dataset.role}`;
    el[e.dataset.role] = e;
  });
  const panel = { name, node, el, ratioTouched: false };
  el.ratio.addEventListener("input", () => { panel.ratioTouched = true; showRatio(panel); });
  el["ratio-reset"].addEventListener("click", () => { panel.ratioTouched = false; showRatio(panel); });
  el.policy.addEventListener("change", () => showRatio(panel));
  $("panels").appendChild(node);
  return panel;
}

function fillPolicyControls(panel) {
  const { meta } = state;
  const { el } = panel;
  el.policy.replaceChildren(...meta.policies.map((p) => new Option(
    `${p.name} (${p.method} ${p.ratio_now})`, p.name, false, p.name === meta.default_policy)));
  el.method.replaceChildren(new Option("policy's method", ""),
    ...meta.methods.map((m) => new Option(`${m.name} (${m.route.replace('_', '-')})`, m.name)));
  el.method.title = meta.methods.map((m) => `${m.name}: ${m.summary}`).join("\n");
  el.ratio.step = meta.ratio_step;
  el.ratio.max = meta.max_ratio;
  showRatio(panel);
}

function namedPolicy(panel) {
  return state.meta ? state.meta.policies.find((p) => p.name === panel.el.policy.value) : null;
}

function showRatio(panel) {
  const named = namedPolicy(panel);
  if (!panel.ratioTouched && named) panel.el.ratio.value = named.ratio_now;
  panel.el["ratio-value"].textContent = panel.ratioTouched ? Number(panel.el.ratio.value).toFixed(3)
    : `${named ? named.ratio_now : ""} (policy)`;
}

// --- the image ------------------------------------------------------------------------------

function setImage(url, note = "") {
  state.imageUrl = url;
  state.image = null;
  const img = $("preview");
  $("image-note").textContent = note;
  img.onload = () => { state.image = img; img.hidden = false; $("drop-hint").hidden = true; };
  img.onerror = () => {
    img.hidden = true;
    $("drop-hint").hidden = false;
    $("image-note").textContent = "the browser cannot display this file; Run sends it anyway and shows the gateway's answer";
  };
  img.src = url;
}

function readFile(file) {
  const reader = new FileReader();
  reader.onload = () => setImage(reader.result, file.name);
  reader.readAsDataURL(file);
  $("scene-info").hidden = true;
}

async function newDemoScene(index = null) {
  try {
    const scene = await getJSON("/v1/vlmprune/demo-scene" + (index === null ? "" : `?index=${encodeURIComponent(index)}`));
    setImage(scene.image, `demo scene ${scene.index} (${scene.family})`);
    $("scene-index").textContent = scene.index;
    $("scene-question").textContent = scene.question;
    $("scene-answer").textContent = scene.answer;
    $("scene-info").hidden = false;
    $("question").value = scene.question;
    showError($("page-error"), "");
  } catch (exc) {
    showError($("page-error"), exc.message);
  }
}

// --- a run ----------------------------------------------------------------------------------

function traceId() {
  const bytes = crypto.getRandomValues(new Uint8Array(12));
  return "pg" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function clearResults(panel) {
  for (const role of ["answer", "ttft", "latency", "prompt-tokens", "kept", "stages", "flops", "applied", "overlay-note"]) {
    panel.el[role].textContent = "";
  }
  panel.el.overlay.replaceChildren();
  showError(panel.el.error, "");
  panel.node.dataset.state = "running";
}

function policyHeaders(panel, id) {
  const h = { "Content-Type": "application/json", "X-VLMPrune-Policy": panel.el.policy.value, "X-VLMPrune-Trace": id };
  if (panel.el.method.value) h["X-VLMPrune-Method"] = panel.el.method.value;
  if (panel.ratioTouched) h["X-VLMPrune-Ratio"] = String(panel.el.ratio.value);
  return apiHeaders(h);
}

// Reads the SSE stream: content deltas, the usage chunk, and vLLM's / the gateway's error events.
async function readStream(resp, onDelta) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", usage = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    const lines = buffer.split("\n");
    buffer = lines.pop();
    for (const line of lines) {
      if (!line.startsWith("data: ") || line.startsWith("data: [DONE]")) continue;
      const event = JSON.parse(line.slice(6));
      if (event.error) throw new Error(`${event.error.code || ""}: ${event.error.message}`);
      if (event.usage) usage = event.usage;
      for (const choice of event.choices || []) {
        if (choice.delta && choice.delta.content) onDelta(choice.delta.content);
      }
    }
  }
  return usage;
}

async function run(panel) {
  clearResults(panel);
  const { el } = panel;
  try {
    if (!state.imageUrl) throw new Error("choose an image (drop, pick, or New demo scene) first");
    const id = traceId();
    const body = {
      model: state.model || undefined, stream: true, stream_options: { include_usage: true }, max_tokens: 16, temperature: 0,
      messages: [{ role: "user", content: [
        { type: "image_url", image_url: { url: state.imageUrl } },
        { type: "text", text: $("question").value },
      ] }],
    };
    const t0 = performance.now();
    let resp;
    try {
      resp = await fetch("/v1/chat/completions", { method: "POST", headers: policyHeaders(panel, id), body: JSON.stringify(body) });
    } catch (exc) {
      throw new Error(`cannot reach the gateway (${exc.message})`);
    }
    el.applied.textContent = resp.headers.get("X-VLMPrune-Applied") || "";
    if (!resp.ok) throw new Error(await errorMessage(resp));
    let ttft = null, answer = "";
    const usage = await readStream(resp, (text) => {
      if (ttft === null) { ttft = performance.now() - t0; el.ttft.textContent = `${ttft.toFixed(0)} ms`; }
      answer += text;
      el.answer.textContent = answer;
    });
    el.latency.textContent = `${(performance.now() - t0).toFixed(0)} ms`;
    el["prompt-tokens"].textContent = usage ? usage.prompt_tokens : "?";
    el.answer.textContent = answer.trim() || "(empty answer)";
    showTrace(panel, await getJSON(`/v1/vlmprune/traces/${id}`));
    panel.node.dataset.state = "done";
  } catch (exc) {
    showError(el.error, exc.message);
    panel.node.dataset.state = "error";
  }
}

function showTrace(panel, trace) {
  const { el } = panel;
  const kept = trace.images.reduce((s, im) => s + im.kept_count, 0);
  const total = trace.images.reduce((s, im) => s + im.visual_tokens, 0);
  el.kept.textContent = `${kept} of ${total}`;
  el.kept.dataset.kept = kept;
  el.stages.textContent = trace.stages.map((s) => `${s.where}: ${s.kept}/${s.of}`).join(" → ");
  if (trace.cost) {
    const c = trace.cost;
    el.flops.textContent = `${(c.actual_flops / 1e9).toFixed(2)} of ${(c.baseline_flops / 1e9).toFixed(2)} GFLOPs ` +
      `(${(100 * c.saved_fraction).toFixed(1)} % saved, estimated)`;
    el.flops.dataset.saved = c.saved_fraction;
  }
  el.applied.textContent = trace.applied;
  el["overlay-note"].textContent = trace.overlay_note || "";
  trace.images.forEach((image) => drawOverlay(panel, image));
}

// Each view panel: the image dimmed, every kept token's cell restored and outlined. The canvas
// keeps its cells (token, x, y, w, h in canvas px) in data-cells, so what is drawn can be checked.
function drawOverlay(panel, image) {
  if (!image.panels || !image.kept || !state.image) {
    if (!panel.el["overlay-note"].textContent) {
      panel.el["overlay-note"].textContent = `${image.kept_count} of ${image.visual_tokens} tokens kept (no grid to draw)`;
    }
    return;
  }
  const keptSet = new Set(image.kept);
  const width = PANEL_WIDTH[image.panels.length] || 224;
  const height = Math.round(width * image.height / image.width);
  for (const view of image.panels) {
    const canvas = document.createElement("canvas");
    canvas.width = width;
    canvas.height = height;
    const ctx = canvas.getContext("2d");
    ctx.drawImage(state.image, 0, 0, width, height);
    ctx.fillStyle = DIM;
    ctx.fillRect(0, 0, width, height);
    const cells = [];
    const kept = [];
    view.tokens.forEach((token, i) => {
      const [x0, y0, x1, y1] = view.boxes[i];
      const px = Math.max(0, Math.round(x0 * width)), py = Math.max(0, Math.round(y0 * height));
      const pw = Math.min(width, Math.round(x1 * width)) - px, ph = Math.min(height, Math.round(y1 * height)) - py;
      if (pw <= 0 || ph <= 0) return;
      cells.push([token, px, py, pw, ph]);
      if (keptSet.has(token)) kept.push([px, py, pw, ph]);
    });
    const sx = state.image.naturalWidth / width, sy = state.image.naturalHeight / height;
    for (const [px, py, pw, ph] of kept) {
      ctx.drawImage(state.image, px * sx, py * sy, pw * sx, ph * sy, px, py, pw, ph);
    }
    ctx.strokeStyle = OUTLINE;
    ctx.lineWidth = 2;
    for (const [px, py, pw, ph] of kept) ctx.strokeRect(px + 1, py + 1, pw - 2, ph - 2);
    canvas.dataset.cells = JSON.stringify(cells);
    const figure = document.createElement("figure");
    const caption = document.createElement("figcaption");
    caption.textContent = view.name || `${kept.length} of ${cells.length} cells kept`;
    figure.append(canvas, caption);
    panel.el.overlay.appendChild(figure);
  }
}

async function runAll() {
  $("run").disabled = true;
  try {
    const active = $("compare").checked ? state.panels : state.panels.slice(0, 1);
    for (const panel of active) await run(panel);  // one after the other: timings do not share the engine
  } finally {
    $("run").disabled = false;
  }
}

// --- wiring ---------------------------------------------------------------------------------

function init() {
  $("api-key").value = localStorage.getItem("vlmprune-api-key") || "";
  $("api-key").addEventListener("change", () => {
    localStorage.setItem("vlmprune-api-key", $("api-key").value.trim());
    loadMeta();
  });
  state.panels = [makePanel("a"), makePanel("b")];
  state.panels[1].node.hidden = true;
  $("compare").addEventListener("change", () => { state.panels[1].node.hidden = !$("compare").checked; });
  $("image-file").addEventListener("change", (e) => { if (e.target.files[0]) readFile(e.target.files[0]); });
  const zone = $("drop-zone");
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    if (e.dataTransfer.files[0]) readFile(e.dataTransfer.files[0]);
  });
  $("demo-scene").addEventListener("click", () => newDemoScene());
  $("run").addEventListener("click", runAll);
  loadMeta();
  const scene = new URLSearchParams(location.search).get("scene");  // /playground?scene=N: a fixed scene
  if (scene !== null) newDemoScene(scene);
}

init();
