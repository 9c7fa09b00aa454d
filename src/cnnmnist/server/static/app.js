// The draw-a-digit page. Every change to the drawing is sent as a PNG to POST /predict (the
// answer, its ten probabilities and the 28x28 picture the model saw) and to POST /explain
// (the first two blocks' feature maps and where the evidence lies). The server prepares it
// exactly as `cnnmnist predict` does. No libraries, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const pad = $("pad");
const ink = pad.getContext("2d");
const LINE = pad.width / 14; // about an MNIST stroke once scaled to 20 px
// Less ink than this (stroke length in pad pixels; a tap counts as one line width) is not
// a digit yet: the page says "draw a digit" instead of asking the model, which would read
// a dot as confidently as a whole digit.
const ENOUGH_INK = 2.5 * LINE;
const DRAW_A_DIGIT = "draw a digit";

// The drawing has versions: every change makes a new one. `cleared` is the version of the
// last clear (or upload): answers for older versions are dropped when they come back.
let version = 0;
let cleared = 0;
let drawn = 0; // ink drawn since the last clear, in pad pixels
let photo = null; // the uploaded file, while the pad shows it
let last = null; // the pointer's previous position while drawing
let snapshot = { version: -1, request: null }; // one PNG per version, for both endpoints
let spokenAnswer = ""; // what the live region says once drawing pauses
window.timings = { predict: [], explain: [] }; // ms per request, as the page made them

// ---- the pad ----------------------------------------------------------------------------

function wipe() {
  ink.fillStyle = "#fff";
  ink.fillRect(0, 0, pad.width, pad.height);
}

function at(event) {
  const box = pad.getBoundingClientRect();
  return [
    ((event.clientX - box.left) * pad.width) / box.width,
    ((event.clientY - box.top) * pad.height) / box.height,
  ];
}

function stroke(from, to) {
  const length = Math.hypot(to[0] - from[0], to[1] - from[1]);
  ink.beginPath();
  if (length === 0) {
    // a dot (a tap): Chromium draws no caps on a line of no length
    ink.fillStyle = "#000";
    ink.arc(...from, LINE / 2, 0, 2 * Math.PI);
    ink.fill();
  } else {
    ink.strokeStyle = "#000";
    ink.lineWidth = LINE;
    ink.lineCap = "round";
    ink.lineJoin = "round";
    ink.moveTo(...from);
    ink.lineTo(...to);
    ink.stroke();
  }
  drawn += length || LINE;
}

pad.addEventListener("pointerdown", (event) => {
  if (event.button !== 0 && event.pointerType === "mouse") return;
  pad.setPointerCapture(event.pointerId);
  if (photo !== null) clear(); // a stroke after an upload starts from a clean pad
  last = at(event);
  stroke(last, last);
  changed();
});
pad.addEventListener("pointermove", (event) => {
  if (last === null) return;
  const moves = event.getCoalescedEvents?.() ?? [];
  for (const e of moves.length ? moves : [event]) {
    const here = at(e);
    stroke(last, here);
    last = here;
  }
  changed();
});
for (const name of ["pointerup", "pointercancel"]) {
  pad.addEventListener(name, () => {
    if (last === null) return;
    last = null;
    explainSoon(); // at once
    refresh(); // drawing paused: the answer may now be announced
  });
}

// ---- the two endpoints --------------------------------------------------------------------

// One endpoint: at most one request in flight; when it comes back and the drawing has
// changed meanwhile, the latest drawing is sent, so the last answer is always for it.
class Channel {
  constructor(name, path, show, due = () => true) {
    this.name = name;
    this.path = path;
    this.show = show;
    this.due = due; // whether to send now
    this.busy = false;
    this.asked = 0; // the version last sent
    this.shown = 0; // the version whose answer is drawn
    this.sentAt = -Infinity;
  }

  async pump() {
    if (this.busy) return;
    this.busy = true;
    try {
      while (this.asked < version && wanted() && this.due()) {
        const v = version;
        this.asked = v;
        this.sentAt = performance.now();
        if (this === explain) explainedAt = this.sentAt;
        const answer = await call(this.path, await request(v));
        window.timings[this.name].push(Math.round(performance.now() - this.sentAt));
        if (v > cleared) {
          await this.show(answer, () => v > cleared);
          if (v > cleared) this.shown = v;
        }
        refresh();
      }
    } finally {
      this.busy = false;
      refresh();
      this.after?.();
    }
  }
}

// The answer comes at once. The explanation takes the model several times as long, and the
// model answers one request at a time, so it is asked for when the drawing pauses (the
// pointer lifted, or still for PAUSE_MS) and at most every STALE_MS during a long stroke:
// the answer never waits behind a queue of explanations.
const PAUSE_MS = 150;
const STALE_MS = 1000;
let changedAt = 0; // when the drawing last changed
let explainedAt = 0; // when an explanation was last asked for, or this drawing begun
const predict = new Channel("predict", "predict?pixels=1", showAnswer);
const explain = new Channel("explain", "explain", showExplanation, () => {
  const now = performance.now();
  return last === null || now - changedAt >= PAUSE_MS || now - explainedAt >= STALE_MS;
});
let explainTimer = null;

function explainSoon() {
  clearTimeout(explainTimer);
  if (explain.asked >= version || !wanted()) return;
  const due = Math.min(changedAt + PAUSE_MS, explainedAt + STALE_MS);
  const wait = last === null ? 0 : Math.max(0, due - performance.now());
  explainTimer = setTimeout(() => explain.pump(), wait);
}
explain.after = explainSoon; // the drawing changed while it was asked: once more, when due

function wanted() {
  return version > cleared && (photo !== null || drawn >= ENOUGH_INK);
}

// What to send for version v: the uploaded file itself (so the server reads it exactly as
// `predict` would), or the pad as a PNG (one copy for both endpoints).
async function request(v) {
  if (photo !== null) {
    const form = new FormData();
    form.append("image", photo);
    return { method: "POST", body: form };
  }
  if (snapshot.version !== v) {
    const blob = new Promise((resolve) => pad.toBlob(resolve, "image/png"));
    snapshot = { version: v, request: blob };
  }
  const body = await snapshot.request;
  return { method: "POST", headers: { "Content-Type": "image/png" }, body };
}

// The JSON answer, or {error} in words a user can act on (never an exception's name).
async function call(path, init) {
  let response;
  try {
    response = await fetch(path, init);
  } catch {
    return { error: "the server did not answer; is `cnnmnist serve` still running?" };
  }
  let answer = null;
  try {
    answer = await response.json();
  } catch {
    // not JSON: a proxy's error page, say
  }
  if (!response.ok || answer === null) {
    const said = answer && typeof answer.error === "string" ? answer.error : null;
    return { error: said || `the server could not answer (HTTP ${response.status})` };
  }
  return answer;
}

function changed() {
  version += 1;
  changedAt = performance.now();
  if (version === cleared + 1) explainedAt = changedAt; // a new drawing
  document.querySelector(".pad-box").classList.add("inked");
  if (!wanted()) {
    // Too little ink for a digit: say so rather than ask the model.
    showNothing(DRAW_A_DIGIT);
    predict.shown = explain.shown = version;
  } else {
    predict.pump();
    explainSoon();
  }
  refresh();
}

// body[data-state]: "empty" after a clear or load, "busy" while the answer for the latest
// drawing is not all drawn yet, "ready" once its answer and its explanation both are.
function refresh() {
  let state = "busy";
  if (version === cleared) state = "empty";
  else if (predict.shown === version && explain.shown === version) state = "ready";
  document.body.dataset.state = state;
  document.body.dataset.predicted = String(predict.shown === version && version > cleared);
  // The live region says only the answer, and only when drawing pauses: not every stroke.
  if (last === null && predict.shown === version) {
    const spoken = $("spoken");
    const say = version === cleared ? "" : spokenAnswer;
    if (spoken.textContent !== say) spoken.textContent = say;
  }
}

// ---- the answer --------------------------------------------------------------------------

const bars = $("bars");
for (let k = 0; k < 10; k++) {
  const row = document.createElement("div");
  row.className = "bar";
  row.innerHTML =
    `<span class="key">${k}</span>` +
    `<div class="track" role="meter" aria-label="digit ${k}" aria-valuemin="0" aria-valuemax="100"` +
    ` aria-valuenow="0"><div class="fill"></div></div><span class="pct"></span>`;
  bars.append(row);
}

function setBars(probabilities, top) {
  bars.querySelectorAll(".bar").forEach((row, k) => {
    const p = probabilities ? probabilities[k] : 0;
    const percent = `${(100 * p).toFixed(1)}%`;
    row.classList.toggle("top", probabilities !== null && k === top);
    const track = row.querySelector(".track");
    track.setAttribute("aria-valuenow", (100 * p).toFixed(1));
    track.setAttribute("aria-valuetext", probabilities ? percent : "no answer");
    row.querySelector(".fill").style.width = `${100 * p}%`;
    row.querySelector(".pct").textContent = probabilities ? percent : "";
  });
}

function showNothing(message) {
  $("digit").textContent = "\u2013";
  $("confidence").textContent = message;
  setBars(null, null);
  $("seen").getContext("2d").clearRect(0, 0, 28, 28);
  $("answer").classList.remove("answered");
  unexplained();
  spokenAnswer = message;
}

function showAnswer(answer) {
  if (answer.error || answer.digit === null || answer.digit === undefined) {
    const blank = (answer.warnings || []).some((w) => w.startsWith("no ink found"));
    showNothing(answer.error ? "no answer" : DRAW_A_DIGIT);
    if (answer.error) spokenAnswer = answer.error;
    $("status").textContent = blank ? "" : answer.error || (answer.warnings || []).join("; ");
    return;
  }
  const percent = `${(100 * answer.confidence).toFixed(1)}%`;
  $("status").textContent = (answer.warnings || []).join("; ");
  $("digit").textContent = String(answer.digit);
  $("confidence").textContent = percent;
  setBars(answer.probabilities, answer.digit);
  const picture = new ImageData(28, 28);
  answer.pixels.flat().forEach((v, i) => {
    picture.data.set([v, v, v, 255], 4 * i);
  });
  $("seen").getContext("2d").putImageData(picture, 0, 0);
  $("answer").classList.add("answered");
  spokenAnswer = `${answer.digit}, ${percent}`;
  showTiming();
}

function showTiming() {
  const ms = (name) => window.timings[name].at(-1);
  const parts = [`answered in ${ms("predict")} ms`];
  if (window.timings.explain.length) parts.push(`explained in ${ms("explain")} ms`);
  $("timing").textContent = parts.join(", ");
}

// ---- the explanation ---------------------------------------------------------------------

function legend(digitShown) {
  const key = (kind, text) => {
    const span = document.createElement("span");
    span.className = "key";
    const swatch = document.createElement("span");
    swatch.className = `swatch ${kind}`;
    span.append(swatch, text);
    return span;
  };
  const what = digitShown === null ? "the answer" : String(digitShown);
  return [key("for", ` red: evidence for ${what},`), " ", key("against", " blue: against")];
}

// Shown only once every feature map is decoded, and only if the drawing was not cleared
// meanwhile (`current`), so a late explanation never lands on a cleared page.
async function showExplanation(answer, current) {
  if (answer.error || !answer.layers) {
    // a blank drawing or a refused file: /predict's answer says why, unless it failed alone
    if (answer.error && !$("status").textContent) $("status").textContent = answer.error;
    unexplained();
    return;
  }
  const pictures = await Promise.all(
    answer.layers.map(async (layer) => {
      const img = new Image();
      img.src = layer.mosaic;
      await img.decode().catch(() => {});
      return img;
    }),
  );
  if (!current()) return;
  drawEvidence(answer.input, answer.saliency);
  $("legend").replaceChildren(...legend(answer.digit));
  $("layers").replaceChildren(
    ...answer.layers.map((layer, i) => {
      const [h, w, c] = layer.shape;
      const figure = layerFigure();
      pictures[i].className = "mosaic";
      pictures[i].alt = `the ${c} feature maps of ${layer.name}, ${h}x${w} each`;
      figure.querySelector("img").replaceWith(pictures[i]);
      figure.querySelector(".name").textContent = layer.name;
      figure.querySelector(".what").textContent = layer.what;
      figure.querySelector(".shape").textContent = `\u2192 ${h}\u00d7${w}\u00d7${c}`;
      return figure;
    }),
  );
  $("inside").classList.add("explained");
  showTiming();
}

// No explanation: the placeholders (their space kept), an empty evidence picture.
function unexplained() {
  $("inside").classList.remove("explained");
  $("evidence").getContext("2d").clearRect(0, 0, 28, 28);
  $("legend").replaceChildren(...legend(null));
  $("layers").replaceChildren(
    layerFigure("the first block's feature maps"),
    layerFigure("the second's"),
  );
}

// A block's feature maps and its caption (a placeholder until the first explanation).
function layerFigure(placeholder = "") {
  const figure = document.createElement("figure");
  figure.className = "layer";
  figure.innerHTML =
    '<img class="mosaic" alt="">' +
    '<figcaption><b class="name"></b> <span class="what"></span> ' +
    '<span class="shape"></span></figcaption>';
  figure.querySelector(".what").textContent = placeholder;
  return figure;
}

// The evidence over the input: the digit in grey as the model saw it (ink dark on light
// paper), red where the evidence is for the answer, blue where it is against, each as
// strong as the evidence relative to the largest.
function drawEvidence(input, saliency) {
  const values = saliency.flat();
  const scale = Math.max(1e-9, ...values.map(Math.abs));
  const picture = new ImageData(28, 28);
  input.flat().forEach((v, i) => {
    const grey = 255 - 0.7 * v;
    const s = values[i] / scale;
    const alpha = Math.min(1, Math.abs(s)) * 0.85;
    const tint = s >= 0 ? [220, 30, 30] : [30, 80, 230];
    const mixed = tint.map((t) => Math.round(grey + (t - grey) * alpha));
    picture.data.set([...mixed, 255], 4 * i);
  });
  $("evidence").getContext("2d").putImageData(picture, 0, 0);
}

// ---- clear and upload --------------------------------------------------------------------

function clear() {
  clearTimeout(explainTimer);
  wipe();
  version += 1;
  cleared = version;
  drawn = 0;
  photo = null;
  document.querySelector(".pad-box").classList.remove("inked");
  showNothing(DRAW_A_DIGIT);
  spokenAnswer = "";
  $("status").textContent = "";
  $("timing").textContent = "";
  refresh();
}

$("clear").addEventListener("click", clear);

$("file").addEventListener("change", async (event) => {
  const file = event.target.files[0];
  event.target.value = "";
  if (!file) return;
  clear();
  photo = file;
  // Show the photo on the pad (upright, as browsers apply its EXIF orientation); the
  // server is sent the file itself. The first stroke after it starts a clean pad.
  try {
    const bitmap = await createImageBitmap(file);
    const scale = Math.min(pad.width / bitmap.width, pad.height / bitmap.height);
    const w = bitmap.width * scale;
    const h = bitmap.height * scale;
    if (photo === file) ink.drawImage(bitmap, (pad.width - w) / 2, (pad.height - h) / 2, w, h);
  } catch {
    // not an image the browser decodes; the server says what is wrong with it
  }
  if (photo === file) changed();
});

clear();
