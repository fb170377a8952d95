// The demo page at "/": one progress card per task, one connection indicator for the page.
// Built only on the public API of taskstream.js, as an application would use it.
import { watchTask } from "./taskstream.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);

const cards = new Map(); // task id -> { el, handle, status }
let demoMode = false;
let token = null;
let tokenExpiresAt = 0;

// ---- token --------------------------------------------------------------------------------------

async function fetchDemoToken() {
  const response = await fetch("/demo/token", { cache: "no-store" });
  if (!response.ok) return null;
  const body = await response.json();
  tokenExpiresAt = Date.now() + body.expires_in * 1000;
  return body.token;
}

// Called before every new connection, so a long-open page never reconnects with a stale token.
async function getToken() {
  if (demoMode) {
    if (!token || Date.now() > tokenExpiresAt - 60_000) token = await fetchDemoToken();
    if (!token) throw new Error("demo token unavailable");
    return token;
  }
  const typed = $("token").value.trim();
  if (!typed) throw new Error("no token");
  return typed;
}

// ---- the connection indicator -------------------------------------------------------------------

const SEVERITY = ["reconnecting", "polling", "connecting", "live"];

function renderConnection() {
  const active = [...cards.values()]
    .map((card) => card.status)
    .filter((status) => status && status !== "closed");
  let status = "idle";
  for (const candidate of SEVERITY) {
    if (active.includes(candidate)) {
      status = candidate;
      break;
    }
  }
  $("connection").dataset.status = status;
  const counts = active.length ? ` · ${active.length} open` : "";
  $("connection-text").textContent = status + counts;
}

// ---- task cards ---------------------------------------------------------------------------------

function formatEta(seconds) {
  if (seconds == null) return "ETA —";
  if (seconds < 60) return `ETA ${seconds}s`;
  const minutes = Math.floor(seconds / 60);
  return `ETA ${minutes}m ${String(seconds % 60).padStart(2, "0")}s`;
}

function showProgress(el, p) {
  const percent = p.progress >= 100 ? 100 : Math.floor(p.progress);
  el.dataset.state = p.state;
  el.querySelector(".state").textContent = p.state;
  el.querySelector(".bar").setAttribute("aria-valuenow", String(percent));
  el.querySelector(".fill").style.width = `${percent}%`;
  el.querySelector(".percent").textContent = `${percent}%`;
  el.querySelector(".eta").textContent = formatEta(p.estimated_time);
}

function watch(taskId) {
  if (cards.has(taskId)) return;
  const el = $("task-template").content.firstElementChild.cloneNode(true);
  el.dataset.taskId = taskId;
  el.querySelector(".task-id").textContent = taskId;
  $("tasks").prepend(el);
  $("empty").hidden = true;
  const card = { el, status: "connecting", transport: null, timeouts: 0, handle: null };
  const renderTransport = () => {
    const parts = [card.transport, card.status].filter(Boolean);
    if (card.timeouts) parts.push(`resumed after timeout ×${card.timeouts}`);
    el.querySelector(".transport").textContent = parts.join(" · ");
  };
  cards.set(taskId, card);

  card.handle = watchTask(taskId, {
    getToken,
    onProgress: (p) => showProgress(el, p),
    onComplete: (c) => {
      el.dataset.state = c.state;
      el.querySelector(".state").textContent = c.state;
      const outcome = el.querySelector(".outcome");
      if (c.state === "success") {
        showProgress(el, { state: "success", progress: 100, estimated_time: 0 });
        outcome.textContent = "✓ complete";
      } else {
        outcome.textContent = c.error ? `✗ ${c.state}: ${c.error}` : `✗ ${c.state}`;
      }
      el.classList.add("done");
    },
    onError: (err) => {
      el.dataset.state = err.kind === "not_found" ? "not_found" : "error";
      el.querySelector(".state").textContent = err.kind.replace("_", " ");
      el.querySelector(".outcome").textContent = `✗ ${err.message}`;
      el.classList.add("done");
    },
    onTimeout: () => {
      // The server's stream timeout: the client reconnects and resumes by itself.
      card.timeouts += 1;
      renderTransport();
    },
    onStatus: (status, { transport }) => {
      card.status = status;
      card.transport = transport;
      el.dataset.connection = status;
      renderTransport();
      renderConnection();
    },
  });
  renderConnection();
}

// ---- controls -----------------------------------------------------------------------------------

function showError(message) {
  const box = $("page-error");
  box.textContent = message;
  box.hidden = !message;
}

async function startDemoTask() {
  const button = $("start-demo");
  button.disabled = true;
  showError("");
  try {
    const response = await fetch("/demo/tasks", {
      method: "POST",
      headers: { Authorization: `Bearer ${await getToken()}` },
    });
    const body = await response.json();
    if (!response.ok) throw new Error(body.error ?? `HTTP ${response.status}`);
    watch(body.task_id);
  } catch (err) {
    showError(`Could not start a demo task: ${err.message}`);
  } finally {
    button.disabled = false;
  }
}

async function init() {
  try {
    token = await fetchDemoToken();
  } catch {
    token = null;
  }
  demoMode = token !== null;
  if (demoMode) {
    $("mode-note").textContent =
      "Demo mode: tasks belong to the user “demo” and a simulated worker advances them. " +
      "For local use only.";
    $("start-demo").hidden = false;
    $("start-demo").addEventListener("click", startDemoTask);
  } else {
    $("mode-note").textContent =
      "Paste a token (taskstream token SUB) and the id of a task that SUB owns.";
    $("token-label").hidden = false;
  }
  $("watch-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const id = $("task-id").value.trim();
    if (id) watch(id);
    $("task-id").value = "";
  });
  for (const id of (params.get("watch") ?? "").split(",")) {
    if (id.trim()) watch(id.trim());
  }
  document.body.dataset.ready = "true";
}

init();
