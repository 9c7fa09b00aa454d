// The draw-a-digit page: every stroke is sent as a PNG to POST /predict, which prepares it
// exactly as `cnnmnist predict` does; the answer, its probabilities and the 28x28 picture the
// model saw are drawn below. No libraries, no build step.
"use strict";

const pad = document.getElementById("pad");
const ink = pad.getContext("2d");
const seen = document.getElementById("seen");
const digit = document.getElementById("digit");
const confidence = document.getElementById("confidence");
const bars = document.getElementById("bars");
const status = document.getElementById("status");

let last = null; // the pointer's previous position while drawing
let busy = false; // a request is in flight
let again = false; // the drawing changed while it was

function clear() {
  ink.fillStyle = "#fff";
  ink.fillRect(0, 0, pad.width, pad.height);
  digit.textContent = "\u2013";
  confidence.textContent = "";
  bars.replaceChildren();
  seen.getContext("2d").clearRect(0, 0, 28, 28);
  status.textContent = "";
  document.body.dataset.state = "empty";
}

function at(event) {
  const box = pad.getBoundingClientRect();
  return [
    ((event.clientX - box.left) * pad.width) / box.width,
    ((event.clientY - box.top) * pad.height) / box.height,
  ];
}

function stroke(from, to) {
  ink.strokeStyle = "#000";
  ink.lineWidth = pad.width / 14; // about an MNIST stroke once scaled to 20 px
  ink.lineCap = "round";
  ink.lineJoin = "round";
  ink.beginPath();
  ink.moveTo(...from);
  ink.lineTo(...to);
  ink.stroke();
}

pad.addEventListener("pointerdown", (event) => {
  pad.setPointerCapture(event.pointerId);
  last = at(event);
  stroke(last, last);
  send();
});
pad.addEventListener("pointermove", (event) => {
  if (last === null) return;
  const here = at(event);
  stroke(last, here);
  last = here;
  send();
});
for (const name of ["pointerup", "pointercancel"]) {
  pad.addEventListener(name, () => {
    last = null;
    send();
  });
}

// At most one request in flight; the latest drawing is always the last one sent.
async function send() {
  if (busy) {
    again = true;
    return;
  }
  busy = true;
  document.body.dataset.state = "busy";
  const blob = await new Promise((resolve) => pad.toBlob(resolve, "image/png"));
  await ask({ method: "POST", headers: { "Content-Type": "image/png" }, body: blob });
  busy = false;
  if (again) {
    again = false;
    send();
  } else {
    document.body.dataset.state = "ready";
  }
}

async function ask(request) {
  try {
    const response = await fetch("predict?pixels=1", request);
    const answer = await response.json();
    if (!response.ok) {
      status.textContent = answer.error || `error ${response.status}`;
      return;
    }
    show(answer);
  } catch (error) {
    status.textContent = `the server did not answer: ${error}`;
  }
}

function show(answer) {
  status.textContent = [answer.error, ...answer.warnings].filter(Boolean).join("; ");
  digit.textContent = answer.digit === null ? "\u2013" : String(answer.digit);
  confidence.textContent =
    answer.confidence === null ? "" : `${(100 * answer.confidence).toFixed(1)}%`;
  bars.replaceChildren(
    ...(answer.probabilities || []).map((p, k) => {
      const row = document.createElement("div");
      row.className = k === answer.digit ? "bar top" : "bar";
      row.innerHTML =
        `<span>${k}</span><span class="track"><span class="fill"></span></span>` +
        `<span class="pct">${(100 * p).toFixed(1)}%</span>`;
      row.querySelector(".fill").style.width = `${100 * p}%`;
      return row;
    }),
  );
  const picture = new ImageData(28, 28);
  answer.pixels.flat().forEach((v, i) => {
    picture.data.set([v, v, v, 255], 4 * i);
  });
  seen.getContext("2d").putImageData(picture, 0, 0);
}

document.getElementById("clear").addEventListener("click", clear);

document.getElementById("file").addEventListener("change", async (event) => {
  const file = event.target.files[0];
  if (!file) return;
  clear();
  // Show the photo on the pad (upright, as browsers apply its EXIF orientation) ...
  try {
    const photo = await createImageBitmap(file);
    const scale = Math.min(pad.width / photo.width, pad.height / photo.height);
    const w = photo.width * scale;
    const h = photo.height * scale;
    ink.drawImage(photo, (pad.width - w) / 2, (pad.height - h) / 2, w, h);
  } catch {
    // not an image the browser decodes; the server says what is wrong with it
  }
  // ... and send the file itself, so the server reads it exactly as `predict` would.
  document.body.dataset.state = "busy";
  const form = new FormData();
  form.append("image", file);
  await ask({ method: "POST", body: form });
  event.target.value = "";
  document.body.dataset.state = "ready";
});

clear();
