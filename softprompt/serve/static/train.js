// softprompt playground, Train tab: start a `softprompt train` run on the server, follow its loss, progress,
// tokens/s and ETA (polling GET /v1/train), stop it, and open its adapter in the chat beside the base.
// Uses app.js's $, headers, loadModels and switchTab. Server text is inserted as text, never HTML.
"use strict";

// clientError: the last refusal of the user's own action (stays until the next action); the run's error
// comes with each status.
const train = { timer: null, polling: false, status: null, prefilled: false, clientError: "" };
const GOING = new Set(["starting", "running", "stopping"]);
const POLL_MS = 500;

function numberOrNull(sel) {
  const v = $(sel).value.trim();
  return v === "" ? null : Number(v);
}

function trainRequest() {
  const body = {
    model: $("#train-model").value.trim() || null,
    data: $("#train-data").value.trim(),
    method: $("#train-method").value,
    name: $("#train-name").value.trim() || null,
    learning_rate: numberOrNull("#train-lr"),
    max_steps: numberOrNull("#train-steps"),
    num_train_epochs: numberOrNull("#train-epochs"),
    per_device_train_batch_size: numberOrNull("#train-batch"),
    num_virtual_tokens: numberOrNull("#train-virtual"),
    max_length: numberOrNull("#train-max-length"),
    val_size: numberOrNull("#train-val"),
    logging_steps: numberOrNull("#train-log-every") || 1,
  };
  for (const key of Object.keys(body)) if (body[key] === null) delete body[key];
  return body;
}

async function trainCall(method, path, body) {
  const r = await fetch(path, { method, headers: headers(), body: body ? JSON.stringify(body) : undefined });
  const data = await r.json();
  if (!r.ok) throw new Error(data.error ? data.error.message : r.statusText);
  return data;
}

function seconds(s) {
  if (s === null || s === undefined) return "…";
  s = Math.round(s);
  return s >= 3600 ? `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`
    : s >= 60 ? `${Math.floor(s / 60)} min ${s % 60} s` : `${s} s`;
}

function showError(runError) {
  const message = train.clientError || runError || "";
  const box = $("#train-error");
  box.hidden = !message;
  box.textContent = message;
}

function refuse(err) {
  train.clientError = err.message;
  showError(train.status && train.status.error);
}

function drawChart(losses, evals) {
  const svg = $("#loss-chart");
  const W = 640, H = 240, L = 48, R = 12, T = 12, B = 28;
  const all = losses.concat(evals);
  svg.dataset.points = String(losses.length);
  const axes = svg.querySelector(".axes");
  axes.replaceChildren();
  if (!all.length) {
    for (const line of svg.querySelectorAll("polyline")) line.setAttribute("points", "");
    return;
  }
  const steps = all.map((p) => p[0]), values = all.map((p) => p[1]);
  const x0 = Math.min(...steps), x1 = Math.max(...steps, x0 + 1);
  let y0 = Math.min(...values), y1 = Math.max(...values);
  if (y1 - y0 < 1e-9) { y0 -= 0.5; y1 += 0.5; }
  const x = (s) => L + ((s - x0) / (x1 - x0)) * (W - L - R);
  const y = (v) => T + ((y1 - v) / (y1 - y0)) * (H - T - B);
  const ns = "http://www.w3.org/2000/svg";
  const add = (tag, attrs, text) => {
    const el = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
    if (text !== undefined) el.textContent = text;
    axes.append(el);
  };
  for (const v of [y0, (y0 + y1) / 2, y1]) {
    add("line", { x1: L, x2: W - R, y1: y(v), y2: y(v) });
    add("text", { x: 4, y: y(v) + 4 }, v.toFixed(3));
  }
  add("text", { x: L, y: H - 8 }, `step ${x0}`);
  add("text", { x: W - R - 70, y: H - 8 }, `step ${x1}`);
  const points = (list) => list.map((p) => `${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(" ");
  svg.querySelector(".train-loss").setAttribute("points", points(losses));
  svg.querySelector(".eval-loss").setAttribute("points", points(evals));
}

function renderTrain(s) {
  train.status = s;
  const off = !s.enabled;
  $("#train-off").hidden = !off;
  $("#train-form").hidden = off;
  if (off) return;
  if (!train.prefilled && s.base_model) {
    $("#train-model").value = s.base_model;
    train.prefilled = true;
  }
  const going = GOING.has(s.state);
  $("#train-state").textContent = s.state;
  $("#train-run").textContent = s.name ? `${s.name} · ${s.folder}` : "";
  $("#train-start").disabled = going;
  $("#train-stop").disabled = !going;
  $("#train-stop").textContent = s.state === "stopping" ? "Kill" : "Stop";
  $("#train-open").disabled = going || !s.adapter_saved || !!s.adapter;
  $("#train-open").textContent = s.adapter ? `Opened as ${s.adapter}` : "Open in playground";
  const total = s.total_steps || 0;
  $("#train-bar").max = total || 1;
  $("#train-bar").value = Math.min(s.step || 0, total || 1);
  const last = s.losses && s.losses.length ? s.losses[s.losses.length - 1][1] : null;
  const parts = [];
  if (total) parts.push(`step ${s.step} / ${total}`);
  if (last !== null) parts.push(`loss ${last.toFixed(4)}`);
  if (s.tokens_per_s) parts.push(`${Math.round(s.tokens_per_s)} tok/s`);
  if (going && total) parts.push(`ETA ${seconds(s.eta_s)}`);
  if (s.elapsed_s !== undefined) parts.push(`elapsed ${seconds(s.elapsed_s)}`);
  $("#train-progress").textContent = parts.join(" · ");
  showError(s.error || "");
  drawChart(s.losses || [], s.eval_losses || []);
}

async function pollTrain() {
  clearTimeout(train.timer);
  if (train.polling) return; // one poll at a time; the one in flight schedules the next
  train.polling = true;
  try {
    renderTrain(await trainCall("GET", "/v1/train"));
  } catch (err) {
    refuse(err);
  } finally {
    train.polling = false;
  }
  const visible = $("#train").classList.contains("active");
  if (visible || (train.status && GOING.has(train.status.state))) train.timer = setTimeout(pollTrain, POLL_MS);
}

async function startTrain(event) {
  event.preventDefault();
  train.clientError = "";
  $("#train-start").disabled = true;
  try {
    renderTrain(await trainCall("POST", "/v1/train", trainRequest()));
  } catch (err) {
    refuse(err);
    $("#train-start").disabled = false;
  }
  pollTrain();
}

async function stopTrain() {
  train.clientError = "";
  try {
    renderTrain(await trainCall("POST", "/v1/train/stop"));
  } catch (err) {
    refuse(err);
  }
}

async function openTrained() {
  train.clientError = "";
  try {
    const card = await trainCall("POST", "/v1/train/open");
    await loadModels();
    $("#model-select").value = card.id;
    showModelInfo();
    for (const box of document.querySelectorAll("#compare-models input")) {
      box.checked = box.value === card.id || box.value === card.root; // the adapter beside its base
    }
    state.history = [];
    $("#messages").replaceChildren();
    switchTab("chat");
  } catch (err) {
    refuse(err);
  }
  pollTrain();
}

document.addEventListener("DOMContentLoaded", () => {
  $("#train-form").addEventListener("submit", startTrain);
  $("#train-stop").addEventListener("click", stopTrain);
  $("#train-open").addEventListener("click", openTrained);
  document.addEventListener("tab", (e) => { if (e.detail === "train") pollTrain(); });
});
