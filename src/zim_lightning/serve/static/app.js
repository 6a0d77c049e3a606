// zim-lightning serve: the page. Plain JavaScript over the JSON API of zim_lightning.serve.server.
// Prompts live here (points, one box, an undo history); every change asks the server for a matte, which
// only runs ZIM's decoder because the server encoded the image once on upload.
"use strict";

// Box drags shorter than this (screen pixels) count as clicks.
const DRAG_THRESHOLD_PX = 5;
// Overlay colour and opacity of the matte drawn over the image.
const OVERLAY_RGB = [47, 111, 223];
const OVERLAY_OPACITY = 0.6;
// Radius of the point marks, in screen pixels.
const MARK_RADIUS_PX = 6;

// Everything the page knows, exposed for tests and the browser console.
const state = {
  imageId: null,
  name: null,
  width: 0,
  height: 0,
  points: [], // [x, y, label] in image pixels, label 1 positive, 0 negative
  box: null, // [x1, y1, x2, y2] in image pixels
  history: [], // prompt snapshots before each change, for undo
  mode: 1, // label a left click adds
  seq: 0, // request counter; stale answers are dropped
  completed: 0, // answers applied to the page
  lastResult: null, // the API's answer for the matte on screen
  overlay: null, // canvas holding the tinted matte
  drag: null,
};
window.zim = state;

const view = document.getElementById("view");
const ctx = view.getContext("2d");
const image = new Image();
const $ = (id) => document.getElementById(id);

function setStatus(text, isError = false) {
  const status = $("status");
  status.textContent = text;
  status.classList.toggle("error", isError);
}

async function api(path, options = {}) {
  const response = await fetch(path, options);
  const type = response.headers.get("Content-Type") || "";
  const body = type.includes("application/json") ? await response.json() : null;
  if (!response.ok) {
    throw new Error((body && body.error) || `${response.status} ${response.statusText}`);
  }
  return body;
}

// ---------------------------------------------------------------------------------------- images
async function loadEntry(entry) {
  // Decode first, then switch state and status in one synchronous step: whoever sees the new image
  // (a person, or a test polling window.zim) also sees its status, never a later overwrite of it.
  image.src = `/api/images/${entry.image_id}/image`;
  await image.decode();
  state.completed = ++state.seq; // a matte still on its way belongs to the previous image: drop it
  state.imageId = entry.image_id;
  state.name = entry.name;
  state.width = entry.width;
  state.height = entry.height;
  state.points = [];
  state.box = null;
  state.history = [];
  state.overlay = null;
  state.lastResult = null;
  view.width = entry.width;
  view.height = entry.height;
  view.classList.add("ready");
  $("placeholder").hidden = true;
  setStatus(`${entry.name}: ${entry.width}\u00d7${entry.height}, encoded in ${Math.round(entry.encode_ms)} ms.\nClick on the object.`);
  refreshControls();
  render();
}

async function upload(file) {
  const limit = state.info && state.info.max_upload_bytes;
  if (limit && file.size > limit) {
    setStatus(`${file.name} is ${(file.size / 2 ** 20).toFixed(1)} MB; the server accepts up to ${(limit / 2 ** 20).toFixed(0)} MB.`, true);
    return;
  }
  setStatus(`Encoding ${file.name}\u2026`);
  try {
    const entry = await api("/api/images", {
      method: "POST",
      headers: { "X-Filename": encodeURIComponent(file.name) },
      body: file,
    });
    await loadEntry(entry);
  } catch (error) {
    setStatus(`Upload failed: ${error.message}`, true);
  }
}

async function pickExample(name, thumb) {
  setStatus(`Encoding ${name}\u2026`);
  document.querySelectorAll(".examples img").forEach((img) => img.classList.toggle("active", img === thumb));
  try {
    await loadEntry(await api(`/api/examples/${name}`, { method: "POST" }));
  } catch (error) {
    setStatus(`Could not load ${name}: ${error.message}`, true);
  }
}

// --------------------------------------------------------------------------------------- prompts
function promptPayload() {
  return { points: state.points, box: state.box };
}

function hasPrompt() {
  return state.points.length > 0 || state.box !== null;
}

function change(mutate) {
  state.history.push({ points: state.points.slice(), box: state.box });
  mutate();
  refreshControls();
  render();
  requestMatte();
}

function undo() {
  const previous = state.history.pop();
  if (!previous) return;
  state.points = previous.points;
  state.box = previous.box;
  refreshControls();
  render();
  requestMatte();
}

function reset() {
  if (!hasPrompt()) return;
  change(() => {
    state.points = [];
    state.box = null;
  });
}

function downloadUrl(kind) {
  const prompt = encodeURIComponent(JSON.stringify(promptPayload()));
  return `/api/images/${state.imageId}/download?kind=${kind}&prompt=${prompt}`;
}

function refreshControls() {
  $("undo").disabled = state.history.length === 0;
  $("reset").disabled = !hasPrompt();
  const ready = state.imageId !== null && hasPrompt();
  for (const kind of ["alpha", "cutout"]) {
    const link = $(`download-${kind}`);
    link.classList.toggle("disabled", !ready);
    if (ready) {
      link.href = downloadUrl(kind);
      link.download = `${(state.name || "image").replace(/\.[^.]*$/, "")}_${kind}.png`;
    } else {
      link.removeAttribute("href");
    }
  }
}

async function requestMatte() {
  const seq = ++state.seq;
  if (!hasPrompt()) {
    state.overlay = null;
    state.lastResult = null;
    state.completed = seq;
    render();
    setStatus("Prompts cleared.");
    return;
  }
  try {
    const result = await api(`/api/images/${state.imageId}/predict`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(promptPayload()),
    });
    if (seq !== state.seq) return; // a newer prompt is on its way
    const overlay = await tint(result.alpha);
    if (seq !== state.seq) return;
    state.overlay = overlay.canvas;
    state.lastResult = { ...result, pageAlphaMean: overlay.mean };
    view.dataset.alphaMean = String(overlay.mean);
    state.completed = seq;
    render();
    setStatus(`Matte: predicted IoU ${result.iou.toFixed(3)}, decoder ${Math.round(result.decode_ms)} ms.`);
  } catch (error) {
    if (seq === state.seq) {
      state.completed = seq;
      setStatus(`Prediction failed: ${error.message}`, true);
    }
  }
}

// The server sends the 8-bit alpha as a grey PNG; colour it and keep its mean as the page saw it.
async function tint(dataUrl) {
  const alpha = new Image();
  alpha.src = dataUrl;
  await alpha.decode();
  const canvas = document.createElement("canvas");
  canvas.width = alpha.naturalWidth;
  canvas.height = alpha.naturalHeight;
  const context = canvas.getContext("2d");
  context.drawImage(alpha, 0, 0);
  const pixels = context.getImageData(0, 0, canvas.width, canvas.height);
  const data = pixels.data;
  let sum = 0;
  for (let i = 0; i < data.length; i += 4) {
    const a = data[i];
    sum += a;
    data[i] = OVERLAY_RGB[0];
    data[i + 1] = OVERLAY_RGB[1];
    data[i + 2] = OVERLAY_RGB[2];
    data[i + 3] = Math.round(a * OVERLAY_OPACITY);
  }
  context.putImageData(pixels, 0, 0);
  return { canvas, mean: sum / (255 * (data.length / 4)) };
}

// ---------------------------------------------------------------------------------------- drawing
function render() {
  if (state.imageId === null) return;
  ctx.clearRect(0, 0, view.width, view.height);
  ctx.drawImage(image, 0, 0, view.width, view.height);
  if (state.overlay && $("show-overlay").checked) {
    ctx.drawImage(state.overlay, 0, 0, view.width, view.height);
  }
  // Marks keep the same size on screen whatever the image's resolution.
  const unit = MARK_RADIUS_PX * (view.width / Math.max(1, view.clientWidth));
  const box = state.drag && state.drag.moved ? state.drag.box : state.box;
  if (box) {
    ctx.save();
    ctx.lineWidth = unit / 2;
    ctx.setLineDash([unit * 1.5, unit]);
    ctx.strokeStyle = "#ffffff";
    ctx.strokeRect(box[0], box[1], box[2] - box[0], box[3] - box[1]);
    ctx.strokeStyle = "#2f6fdf";
    ctx.lineDashOffset = unit * 1.25;
    ctx.strokeRect(box[0], box[1], box[2] - box[0], box[3] - box[1]);
    ctx.restore();
  }
  for (const [x, y, label] of state.points) {
    ctx.beginPath();
    ctx.arc(x, y, unit, 0, 2 * Math.PI);
    ctx.fillStyle = label === 1 ? "#1fa855" : "#d93025";
    ctx.fill();
    ctx.lineWidth = unit / 3;
    ctx.strokeStyle = "#ffffff";
    ctx.stroke();
  }
}

// ------------------------------------------------------------------------------------------ mouse
function toImage(event) {
  const rect = view.getBoundingClientRect();
  const x = ((event.clientX - rect.left) / rect.width) * state.width;
  const y = ((event.clientY - rect.top) / rect.height) * state.height;
  return [Math.min(Math.max(x, 0), state.width), Math.min(Math.max(y, 0), state.height)];
}

view.addEventListener("contextmenu", (event) => event.preventDefault());

view.addEventListener("mousedown", (event) => {
  if (state.imageId === null || (event.button !== 0 && event.button !== 2)) return;
  event.preventDefault();
  state.drag = {
    button: event.button,
    start: toImage(event),
    screen: [event.clientX, event.clientY],
    moved: false,
    box: null,
  };
});

window.addEventListener("mousemove", (event) => {
  const drag = state.drag;
  if (!drag || drag.button !== 0) return;
  const distance = Math.hypot(event.clientX - drag.screen[0], event.clientY - drag.screen[1]);
  if (distance < DRAG_THRESHOLD_PX && !drag.moved) return;
  const [x, y] = toImage(event);
  const [x0, y0] = drag.start;
  drag.moved = true;
  drag.box = [Math.min(x0, x), Math.min(y0, y), Math.max(x0, x), Math.max(y0, y)];
  render();
});

window.addEventListener("mouseup", (event) => {
  const drag = state.drag;
  if (!drag) return;
  state.drag = null;
  if (drag.moved) {
    const box = drag.box.map((v) => Math.round(v * 10) / 10);
    if (box[2] > box[0] && box[3] > box[1]) {
      change(() => {
        state.box = box;
      });
    } else {
      render();
    }
    return;
  }
  const [x, y] = drag.start;
  const label = drag.button === 2 ? 0 : state.mode;
  change(() => {
    state.points = [...state.points, [Math.round(x * 10) / 10, Math.round(y * 10) / 10, label]];
  });
  event.preventDefault();
});

// -------------------------------------------------------------------------------------- controls
function setMode(label) {
  state.mode = label;
  $("mode-positive").classList.toggle("active", label === 1);
  $("mode-negative").classList.toggle("active", label === 0);
}

$("mode-positive").addEventListener("click", () => setMode(1));
$("mode-negative").addEventListener("click", () => setMode(0));
$("undo").addEventListener("click", undo);
$("reset").addEventListener("click", reset);
$("show-overlay").addEventListener("change", render);
$("file-input").addEventListener("change", (event) => {
  const file = event.target.files[0];
  if (file) upload(file);
  event.target.value = "";
});
window.addEventListener("keydown", (event) => {
  if ((event.ctrlKey || event.metaKey) && event.key === "z") {
    event.preventDefault();
    undo();
  } else if (event.key === "Escape") {
    reset();
  }
});

// Drop a file anywhere on the page to upload it.
document.addEventListener("dragover", (event) => event.preventDefault());
document.addEventListener("drop", (event) => {
  event.preventDefault();
  const file = event.dataTransfer && event.dataTransfer.files[0];
  if (file) upload(file);
});

async function init() {
  try {
    const info = await api("/api/info");
    $("model-name").textContent = `model: ${info.model}`;
    const examples = $("examples");
    for (const name of info.examples) {
      const thumb = document.createElement("img");
      thumb.src = `/api/examples/${name}.jpg`;
      thumb.alt = name;
      thumb.title = name;
      thumb.dataset.name = name;
      thumb.addEventListener("click", () => pickExample(name, thumb));
      examples.appendChild(thumb);
    }
    state.info = info;
  } catch (error) {
    setStatus(`Server unreachable: ${error.message}`, true);
  }
}

init();
