// The vlmkit page: chat with an image (streamed), zero-shot labels, image search. Talks to the server's
// OpenAI-style API with fetch; a streamed answer is read from the response body (EventSource cannot POST).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { messages: [], pendingImage: null, controller: null, lastUser: null };

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function api(path, body) {
  const res = await fetch(path, {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
  const data = await res.json();
  if (!res.ok) throw new Error(data.error ? data.error.message : res.statusText);
  return data;
}

function readFile(input) {
  return new Promise((resolve, reject) => {
    const file = input.files[0];
    if (!file) return resolve(null);
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

// ------------------------------------------------------------------ tabs, models
document.querySelectorAll(".tab").forEach((tab) => tab.addEventListener("click", () => {
  document.querySelectorAll(".tab, .panel").forEach((el) => el.classList.remove("active"));
  tab.classList.add("active");
  $("tab-" + tab.dataset.tab).classList.add("active");
}));

async function loadModels() {
  const res = await fetch("/v1/models");
  const { data } = await res.json();
  for (const [select, kind] of [["chat-model", "chat"], ["zs-model", "embedding"]]) {
    for (const m of data.filter((m) => m.kind === kind)) {
      const opt = document.createElement("option");
      opt.value = opt.textContent = m.id;
      $(select).appendChild(opt);
    }
  }
  setStatus(data.map((m) => m.id).join(", ") || "no models");
}

// ------------------------------------------------------------------ chat
for (const [id, out] of [["temperature", "temperature-value"], ["top-p", "top-p-value"]]) {
  $(id).addEventListener("input", () => { $(out).textContent = $(id).value; });
}

$("chat-image").addEventListener("change", async () => {
  state.pendingImage = await readFile($("chat-image"));
  $("chat-preview").src = state.pendingImage || "";
  $("chat-preview").hidden = !state.pendingImage;
});

function addMessage(role, text, image) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  if (image) {
    const img = document.createElement("img");
    img.src = image;
    div.appendChild(img);
  }
  const span = document.createElement("span");
  span.className = "text";
  span.textContent = text;
  div.appendChild(span);
  $("chat-log").appendChild(div);
  $("chat-log").scrollTop = $("chat-log").scrollHeight;
  return span;
}

async function streamAnswer() {
  const out = addMessage("assistant", "");
  out.parentElement.classList.add("streaming");
  const body = {
    model: $("chat-model").value, messages: state.messages, stream: true,
    temperature: parseFloat($("temperature").value), top_p: parseFloat($("top-p").value),
    max_tokens: parseInt($("max-tokens").value, 10),
  };
  state.controller = new AbortController();
  $("chat-send").disabled = $("regenerate").disabled = true;
  $("chat-stop").disabled = false;
  setStatus("generating...");
  let answer = "";
  try {
    const res = await fetch("/v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
      signal: state.controller.signal,
    });
    if (!res.ok) {
      const data = await res.json();
      throw new Error(data.error ? data.error.message : res.statusText);
    }
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut).trim();
        buffer = buffer.slice(cut + 2);
        if (!event.startsWith("data: ")) continue;
        const payload = event.slice(6);
        if (payload === "[DONE]") continue;
        const chunk = JSON.parse(payload);
        if (chunk.error) throw new Error(chunk.error.message);
        for (const choice of chunk.choices || []) {
          if (choice.delta && choice.delta.content) {
            answer += choice.delta.content;
            out.textContent = answer;
          }
          if (choice.finish_reason) setStatus("done (" + choice.finish_reason + ")");
        }
      }
    }
    state.messages.push({ role: "assistant", content: answer });
  } catch (err) {
    if (err.name === "AbortError") {
      setStatus("stopped");
      state.messages.push({ role: "assistant", content: answer });
    } else {
      out.parentElement.classList.add("error");
      out.textContent = err.message;
      setStatus(err.message, true);
    }
  } finally {
    out.parentElement.classList.remove("streaming");
    out.parentElement.classList.add("done");
    state.controller = null;
    $("chat-send").disabled = false;
    $("chat-stop").disabled = true;
    $("regenerate").disabled = state.lastUser === null;
  }
}

$("chat-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const text = $("chat-input").value.trim();
  if (!text && !state.pendingImage) return;
  const content = [];
  if (state.pendingImage) content.push({ type: "image_url", image_url: { url: state.pendingImage } });
  if (text) content.push({ type: "text", text });
  addMessage("user", text, state.pendingImage);
  state.messages.push({ role: "user", content });
  state.lastUser = state.messages.length - 1;
  state.pendingImage = null;
  $("chat-input").value = "";
  await streamAnswer();
});

$("chat-stop").addEventListener("click", () => state.controller && state.controller.abort());

$("regenerate").addEventListener("click", async () => {
  if (state.lastUser === null) return;
  state.messages = state.messages.slice(0, state.lastUser + 1);
  const log = $("chat-log");
  if (log.lastElementChild && log.lastElementChild.classList.contains("assistant")) log.lastElementChild.remove();
  await streamAnswer();
});

$("clear").addEventListener("click", () => {
  state.messages = [];
  state.lastUser = null;
  state.pendingImage = null;
  $("chat-log").innerHTML = "";
  $("chat-image").value = "";
  $("chat-preview").hidden = true;
  $("regenerate").disabled = true;
  setStatus("cleared");
});

// ------------------------------------------------------------------ zero-shot labels
$("zs-image").addEventListener("change", async () => {
  const url = await readFile($("zs-image"));
  $("zs-preview").src = url || "";
  $("zs-preview").hidden = !url;
});

$("zs-run").addEventListener("click", async () => {
  const image = $("zs-preview").hidden ? null : $("zs-preview").src;
  const labels = $("zs-labels").value.split("\n").map((s) => s.trim()).filter(Boolean);
  if (!image) return setStatus("choose an image first", true);
  try {
    const data = await api("/v1/classify", {
      model: $("zs-model").value, labels, template: $("zs-template").value,
      image: { url: image },
    });
    const box = $("zs-results");
    box.innerHTML = "";
    for (const { label, score } of data.data) {
      const row = document.createElement("div");
      row.className = "bar";
      const name = document.createElement("span");
      name.className = "label";
      name.textContent = label;
      const track = document.createElement("div");
      const fill = document.createElement("div");
      fill.className = "fill";
      fill.style.width = (100 * score).toFixed(1) + "%";
      track.appendChild(fill);
      const value = document.createElement("span");
      value.className = "score";
      value.textContent = score.toFixed(3);
      row.append(name, track, value);
      box.appendChild(row);
    }
    setStatus("classified");
  } catch (err) {
    setStatus(err.message, true);
  }
});

// ------------------------------------------------------------------ search
$("search-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const query = $("search-query").value.trim();
  if (!query) return;
  try {
    const data = await api("/v1/search", { query, top_k: parseInt($("search-k").value, 10) });
    const grid = $("search-results");
    grid.innerHTML = "";
    for (const hit of data.data) {
      const fig = document.createElement("figure");
      const img = document.createElement("img");
      img.src = hit.url;
      img.alt = hit.path;
      const cap = document.createElement("figcaption");
      cap.textContent = hit.score.toFixed(3) + "  " + hit.path;
      fig.append(img, cap);
      grid.appendChild(fig);
    }
    setStatus(data.data.length + " images");
  } catch (err) {
    setStatus(err.message, true);
  }
});

loadModels().catch((err) => setStatus("cannot list models: " + err.message, true));
