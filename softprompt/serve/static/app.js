// softprompt playground: chat with one model, or send one prompt to several side by side.
// Plain JS against the server's own OpenAI API; model output is always inserted as text, never HTML.
"use strict";

const $ = (sel) => document.querySelector(sel);
const state = { models: [], history: [], controller: null };

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("#api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

const METHODS = { PROMPT_TUNING: "prompt tuning", P_TUNING: "P-tuning", PREFIX_TUNING: "prefix tuning" };

function describe(model) {
  const sp = model.softprompt;
  return sp ? `${METHODS[sp.method] || sp.method}, ${sp.num_virtual_tokens} virtual tokens` : "base model";
}

async function loadModels() {
  const status = $("#server-status");
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    const body = await r.json();
    if (!r.ok) throw new Error(body.error ? body.error.message : r.statusText);
    state.models = body.data;
    status.textContent = `${state.models.length} models`;
    status.className = "status ok";
  } catch (err) {
    state.models = [];
    status.textContent = err.message;
    status.className = "status bad";
  }
  renderModels();
}

function renderModels() {
  const select = $("#model-select");
  const previous = select.value;
  select.replaceChildren();
  for (const m of state.models) {
    const option = document.createElement("option");
    option.value = m.id;
    option.textContent = m.id;
    select.append(option);
  }
  if (state.models.some((m) => m.id === previous)) select.value = previous;
  else if (state.models.length > 1) select.value = state.models[1].id; // the first adapter
  showModelInfo();

  const checks = $("#compare-models");
  const ticked = new Set([...checks.querySelectorAll("input:checked")].map((i) => i.value));
  checks.replaceChildren();
  for (const m of state.models) {
    const label = document.createElement("label");
    label.className = "compare-model";
    const box = document.createElement("input");
    box.type = "checkbox";
    box.value = m.id;
    box.checked = ticked.size ? ticked.has(m.id) : true;
    label.append(box, " " + m.id);
    label.title = describe(m);
    checks.append(label);
  }
}

function showModelInfo() {
  const m = state.models.find((x) => x.id === $("#model-select").value);
  $("#model-info").textContent = m ? describe(m) : "";
}

// POST a streaming chat completion; calls onText(piece) per delta; resolves to the finish reason.
async function streamChat(model, messages, onText, signal) {
  const body = {
    model,
    messages,
    stream: true,
    temperature: Number($("#temperature").value),
    max_tokens: Number($("#max-tokens").value),
  };
  const r = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body), signal });
  if (!r.ok) {
    let message = r.statusText;
    try { message = (await r.json()).error.message; } catch (_) { /* not JSON */ }
    throw new Error(message);
  }
  const reader = r.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let finish = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return finish;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return finish;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        const choice = chunk.choices && chunk.choices[0];
        if (!choice) continue;
        if (choice.delta && choice.delta.content) onText(choice.delta.content);
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
  }
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const who = document.createElement("div");
  who.className = "who";
  who.textContent = role === "user" ? "you" : $("#model-select").value;
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  div.append(who, body);
  $("#messages").append(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

async function sendChat(event) {
  event.preventDefault();
  const input = $("#chat-input");
  const text = input.value.trim();
  if (!text || state.controller) return;
  input.value = "";
  addMessage("user", text);
  state.history.push({ role: "user", content: text });
  const reply = addMessage("assistant", "");
  const out = reply.querySelector(".text");
  state.controller = new AbortController();
  $("#send").disabled = true;
  $("#stop").disabled = false;
  try {
    const finish = await streamChat($("#model-select").value, state.history, (piece) => {
      out.textContent += piece;
      reply.scrollIntoView({ block: "end" });
    }, state.controller.signal);
    reply.dataset.finish = finish || "";
    state.history.push({ role: "assistant", content: out.textContent });
  } catch (err) {
    reply.classList.add("error");
    if (err.name !== "AbortError") out.textContent += (out.textContent ? "\n" : "") + "⚠ " + err.message;
    state.history.pop(); // the question stays on screen but is not sent again
  } finally {
    reply.dataset.done = "true";
    state.controller = null;
    $("#send").disabled = false;
    $("#stop").disabled = true;
  }
}

async function compare() {
  const prompt = $("#compare-prompt").value.trim();
  const chosen = [...document.querySelectorAll("#compare-models input:checked")].map((i) => i.value);
  const columns = $("#columns");
  columns.replaceChildren();
  if (!prompt || !chosen.length) return;
  $("#compare-send").disabled = true;
  await Promise.all(chosen.map(async (model) => {
    const column = $("#column-template").content.firstElementChild.cloneNode(true);
    column.dataset.model = model;
    column.querySelector(".name").textContent = model;
    const m = state.models.find((x) => x.id === model);
    column.querySelector(".meta").textContent = m ? describe(m) : "";
    columns.append(column);
    const out = column.querySelector(".output");
    const foot = column.querySelector(".foot");
    const started = performance.now();
    let pieces = 0;
    try {
      const finish = await streamChat(model, [{ role: "user", content: prompt }], (piece) => {
        out.textContent += piece;
        pieces += 1;
      });
      foot.textContent = `${finish || "done"} · ${pieces} chunks · ${((performance.now() - started) / 1000).toFixed(2)} s`;
    } catch (err) {
      column.classList.add("error");
      foot.textContent = "⚠ " + err.message;
    } finally {
      column.dataset.done = "true";
    }
  }));
  $("#compare-send").disabled = false;
}

function switchTab(name) {
  for (const tab of document.querySelectorAll(".tab")) tab.classList.toggle("active", tab.dataset.tab === name);
  for (const panel of document.querySelectorAll(".panel")) panel.classList.toggle("active", panel.id === name);
  document.dispatchEvent(new CustomEvent("tab", { detail: name }));
}

document.addEventListener("DOMContentLoaded", () => {
  $("#api-key").value = localStorage.getItem("softprompt-api-key") || "";
  $("#api-key").addEventListener("change", () => {
    localStorage.setItem("softprompt-api-key", $("#api-key").value.trim());
    loadModels();
  });
  for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => switchTab(tab.dataset.tab));
  $("#model-select").addEventListener("change", showModelInfo);
  $("#chat-form").addEventListener("submit", sendChat);
  $("#chat-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) sendChat(e);
  });
  $("#stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("#clear").addEventListener("click", () => {
    state.history = [];
    $("#messages").replaceChildren();
  });
  $("#compare-send").addEventListener("click", compare);
  loadModels();
});
