// The anomap page: sends dropped or chosen images to /v1/predict and shows each answer, newest first.
"use strict";

const PARALLEL = 4; // requests in flight at once; the server batches them
const state = { token: null, model: null, waiting: [], running: 0 };
const $ = (id) => document.getElementById(id);

const headers = () => (state.token ? { Authorization: `Bearer ${state.token}` } : {});
const fmt = (x) => (Math.abs(x) >= 1000 || Math.abs(x) < 0.01 ? x.toExponential(3) : x.toFixed(3));

async function answerOf(response) {
  const body = await response.json().catch(() => ({}));
  return response.ok ? body : { error: body.error || `HTTP ${response.status}`, status: response.status };
}

async function loadModel() {
  let body;
  try {
    body = await answerOf(await fetch("/v1/model", { headers: headers() }));
  } catch (err) {
    $("model").textContent = `the server cannot be reached (${err.message})`;
    return;
  }
  if (body.status === 401) return askToken(state.token ? "this token is not accepted" : "");
  if (body.error) return void ($("model").textContent = body.error);
  state.model = body;
  $("auth").hidden = true;
  $("model").textContent = `${body.method} · ${body.backbone || "no backbone"} · ${body.input_size} px input · ` +
    `threshold ${fmt(body.threshold)} · model ${body.sha256.slice(0, 12)}`;
  $("drop").classList.remove("disabled");
  $("files").disabled = false;
}

function askToken(message) {
  $("auth").hidden = false;
  $("auth-error").textContent = message;
  $("model").textContent = "waiting for the token";
  $("token").focus();
}

function addFiles(files) {
  if (!state.model) return;
  for (const file of files) {
    const card = $("card-template").content.firstElementChild.cloneNode(true);
    card.querySelector(".name").textContent = file.name;
    $("results").prepend(card);
    state.waiting.push({ file, card });
  }
  pump();
}

function pump() {
  while (state.running < PARALLEL && state.waiting.length) {
    const { file, card } = state.waiting.shift();
    state.running += 1;
    score(file, card).finally(() => {
      state.running -= 1;
      pump();
    });
  }
}

async function score(file, card) {
  const form = new FormData();
  form.append("file", file, file.name);
  let body;
  try {
    const response = await fetch("/v1/predict?heatmap=1&mask=1", { method: "POST", body: form, headers: headers() });
    body = await answerOf(response);
  } catch (err) {
    body = { error: `the server cannot be reached (${err.message})` };
  }
  if (body.error) return fail(card, body.error);
  await show(card, file, body);
}

function fail(card, message) {
  card.className = "card failed";
  card.dataset.decision = "error";
  card.querySelector(".decision").textContent = message;
}

async function show(card, file, body) {
  const decision = body.is_anomalous ? "anomalous" : "normal";
  card.className = `card ${decision}`;
  card.dataset.decision = decision;
  card.querySelector(".decision").textContent = decision;
  // the gauge runs from 0 to twice the threshold; the black mark is the threshold
  const share = body.threshold > 0 ? Math.min(Math.max(body.score / (2 * body.threshold), 0), 1) : +body.is_anomalous;
  card.querySelector(".fill").style.width = `${(100 * share).toFixed(1)}%`;
  card.querySelector(".numbers").textContent =
    `score ${fmt(body.score)} ${body.is_anomalous ? "≥" : "<"} threshold ${fmt(body.threshold)}`;
  card.querySelector(".meta").textContent =
    `${body.width}×${body.height} px · ${body.timing_ms.total.toFixed(0)} ms · batch of ${body.batch_size}`;
  card.querySelector(".heatmap").src = `data:image/png;base64,${body.heatmap}`;
  await drawOutline(card.querySelector(".outline"), file, body);
}

function picture(src) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("cannot be shown"));
    img.src = src;
  });
}

// The input (grey where the browser cannot show the format, e.g. TIFF) with the mask's border in red.
async function drawOutline(canvas, file, body) {
  const [w, h] = [body.width, body.height];
  [canvas.width, canvas.height] = [w, h];
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(await picture(`data:image/png;base64,${body.mask}`), 0, 0);
  const mask = ctx.getImageData(0, 0, w, h).data;
  const url = URL.createObjectURL(file);
  try {
    ctx.drawImage(await picture(url), 0, 0, w, h);
  } catch {
    ctx.fillStyle = "#555";
    ctx.fillRect(0, 0, w, h);
  } finally {
    URL.revokeObjectURL(url);
  }
  const on = (x, y) => x >= 0 && y >= 0 && x < w && y < h && mask[4 * (y * w + x)] > 127;
  const width = Math.max(1, Math.round(Math.max(w, h) / 256)); // about 1 px as shown
  ctx.fillStyle = "#ff1744";
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      if (on(x, y) && !(on(x - 1, y) && on(x + 1, y) && on(x, y - 1) && on(x, y + 1))) {
        ctx.fillRect(x - (width >> 1), y - (width >> 1), width, width);
      }
    }
  }
}

function setUp() {
  const drop = $("drop");
  $("files").addEventListener("change", (event) => {
    addFiles(event.target.files);
    event.target.value = "";
  });
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    addFiles(event.dataTransfer.files);
  });
  $("auth").addEventListener("submit", (event) => {
    event.preventDefault();
    state.token = $("token").value.trim();
    loadModel();
  });
  loadModel();
}

setUp();
