// PIO's page: a chat with any served model and the plugins' status, from the daemon's own
// OpenAI and admin APIs. No dependencies, nothing fetched from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { history: [], models: [], running: null, tokens: {}, polled: 0 };

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function notice(text) {
  $("notice").textContent = text || "";
  $("notice").hidden = !text;
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers() });
  if (response.status === 401) {
    // The server's words say which key opens the path (off loopback the admin API has none
    // until admin keys are configured).
    notice("This server needs a key (" + (await errorText(response)) + "): enter it at the top right.");
    throw new Error("unauthorized");
  }
  return response;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return (body.error && body.error.message) || response.statusText;
  } catch (_) {
    return response.status + " " + response.statusText;
  }
}

// Models -----------------------------------------------------------------------------------

async function loadModels() {
  const response = await api("/v1/models");
  if (!response.ok) throw new Error(await errorText(response));
  state.models = (await response.json()).data;
  const select = $("model");
  const chosen = select.value || localStorage.getItem("pio.model");
  select.replaceChildren(...state.models.map((m) => new Option(m.id, m.id)));
  if (chosen && state.models.some((m) => m.id === chosen)) select.value = chosen;
  modelChanged();
  notice("");
}

function modelChanged() {
  const model = state.models.find((m) => m.id === $("model").value);
  const vision = !!(model && model.pio && model.pio.capabilities.includes("vision"));
  $("image-field").hidden = !vision;
  if (model) localStorage.setItem("pio.model", model.id);
}

// Chat -------------------------------------------------------------------------------------

function bubble(role) {
  const li = document.createElement("li");
  li.className = role;
  $("messages").append(li);
  return li;
}

function showUser(text, image) {
  const li = bubble("user");
  if (image) {
    const img = document.createElement("img");
    img.src = image;
    li.append(img);
  }
  li.append(document.createTextNode(text));
}

function readImage() {
  const file = $("image").files[0];
  if (!file || $("image-field").hidden) return Promise.resolve(null);
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

// One assistant answer as it streams: reasoning folded, content, tool calls.
class Answer {
  constructor() {
    this.li = bubble("assistant");
    this.reasoning = "";
    this.content = "";
    this.calls = [];
    this.details = null;
    this.text = document.createElement("div");
    this.text.className = "content";
    this.li.append(this.text);
  }
  add(delta) {
    if (delta.reasoning_content) {
      if (!this.details) {
        this.details = document.createElement("details");
        this.details.innerHTML = "<summary>Reasoning</summary><div class=\"reasoning\"></div>";
        this.li.prepend(this.details);
      }
      this.reasoning += delta.reasoning_content;
      this.details.querySelector(".reasoning").textContent = this.reasoning;
    }
    if (delta.content) {
      this.content += delta.content;
      this.text.textContent = this.content;
    }
    for (const call of delta.tool_calls || []) {
      const c = (this.calls[call.index] = this.calls[call.index] || { name: "", arguments: "", el: null });
      if (call.function && call.function.name) c.name += call.function.name;
      if (call.function && call.function.arguments) c.arguments += call.function.arguments;
      if (!c.el) {
        c.el = document.createElement("div");
        c.el.className = "tool-call";
        this.li.append(c.el);
      }
      c.el.textContent = "→ " + c.name + "(" + c.arguments + ")";
    }
    $("messages").scrollTop = $("messages").scrollHeight;
  }
  end(finish, usage) {
    const meta = document.createElement("div");
    meta.className = "meta";
    meta.textContent = [finish && "finish: " + finish, usage && usage.completion_tokens + " tokens"]
      .filter(Boolean).join(" · ");
    this.li.append(meta);
  }
  fail(message) {
    this.li.classList.add("error");
    this.text.textContent = (this.content ? this.content + "\n" : "") + message;
  }
}

async function send(event) {
  event.preventDefault();
  const text = $("input").value;
  if (!text.trim() || state.running) return;
  const image = await readImage();
  const content = image
    ? [{ type: "image_url", image_url: { url: image } }, { type: "text", text }]
    : text;
  showUser(text, image);
  state.history.push({ role: "user", content });
  $("input").value = "";
  $("image").value = "";
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...state.history);
  const body = {
    model: $("model").value,
    messages,
    stream: true,
    stream_options: { include_usage: true },
    temperature: Number($("temperature").value),
    max_tokens: Number($("max-tokens").value),
  };
  const tools = $("tools").value.trim();
  if (tools) {
    try {
      body.tools = JSON.parse(tools);
    } catch (e) {
      bubble("error").textContent = "Tools: not JSON (" + e.message + ")";
      state.history.pop();
      return;
    }
  }
  const answer = new Answer();
  const controller = new AbortController();
  state.running = controller;
  $("send").disabled = true;
  $("stop").disabled = false;
  let finish = null;
  let usage = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorText(response));
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          if (chunk.usage) usage = chunk.usage;
          for (const choice of chunk.choices || []) {
            answer.add(choice.delta || {});
            finish = choice.finish_reason || finish;
          }
        }
      }
    }
    answer.end(finish, usage);
    const message = { role: "assistant", content: answer.content };
    if (answer.calls.length) {
      message.tool_calls = answer.calls.map((c, i) => ({
        id: "call_" + i, type: "function", function: { name: c.name, arguments: c.arguments },
      }));
    }
    state.history.push(message);
  } catch (e) {
    if (e.name === "AbortError") {
      answer.end("stopped", usage);
      state.history.push({ role: "assistant", content: answer.content });
    } else {
      answer.fail(e.message);
      state.history.pop();
    }
  } finally {
    state.running = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
}

function stop() {
  if (state.running) state.running.abort();
}

function clearChat() {
  stop();
  state.history = [];
  $("messages").replaceChildren();
}

// Status -----------------------------------------------------------------------------------

function bytes(n) {
  if (n == null) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return n.toFixed(i ? 1 : 0) + " " + units[i];
}

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

async function loadStatus() {
  const response = await api("/v1/plugins");
  if (!response.ok) {
    notice("Status: " + (await errorText(response)) + " (the status view needs an admin key when keys are set)");
    return;
  }
  const now = performance.now();
  const { plugins, errors } = await response.json();
  const seconds = (now - state.polled) / 1000;
  const rows = plugins.map((p) => {
    const before = state.tokens[p.name];
    const rate = before != null && seconds > 0 ? (p.generated_tokens - before) / seconds : null;
    state.tokens[p.name] = p.generated_tokens;
    const tr = document.createElement("tr");
    tr.dataset.plugin = p.name;
    tr.append(
      cell(p.name + " " + p.version),
      cell(p.state, "state-" + p.state),
      cell(p.tier_requested + " → " + (p.tier_applied || "–")),
      cell(bytes(p.memory_bytes) + " / " + bytes(p.memory_limit_bytes)),
      cell(String(p.restarts)),
      cell(String(p.requests_in_flight)),
      cell(String(p.engine ? p.engine.waiting : Math.max(0, p.requests - p.requests_in_flight))),
      cell(rate == null ? "–" : rate.toFixed(1)),
      cell(p.last_error || ""),
    );
    return tr;
  });
  state.polled = now;
  $("plugins").replaceChildren(...rows);
  $("broken").replaceChildren(...errors.map((e) => {
    const li = document.createElement("li");
    li.textContent = e.manifest + ": " + e.error;
    return li;
  }));
}

// Wiring -----------------------------------------------------------------------------------

function show(view) {
  for (const tab of document.querySelectorAll(".tab")) tab.classList.toggle("active", tab.dataset.view === view);
  $("chat").hidden = view !== "chat";
  $("status").hidden = view !== "status";
  if (view === "status") loadStatus().catch(() => {});
}

document.addEventListener("DOMContentLoaded", () => {
  $("key").value = localStorage.getItem("pio.key") || "";
  $("key").addEventListener("change", () => {
    localStorage.setItem("pio.key", $("key").value.trim());
    // `api` has said what an unauthorized key needs; another failure says itself.
    loadModels().catch((e) => { if (e.message !== "unauthorized") notice(e.message); });
  });
  for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => show(tab.dataset.view));
  $("model").addEventListener("change", modelChanged);
  $("composer").addEventListener("submit", send);
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
  });
  $("stop").addEventListener("click", stop);
  $("clear").addEventListener("click", clearChat);
  loadModels().catch(() => {});
  setInterval(() => { if (!$("status").hidden) loadStatus().catch(() => {}); }, 2000);
});
