// The demo page at "/": one progress card per task, one connection indicator for the page.
// Built only on the public API of taskstream.js, as an application would use it.
//
// By default every task on the page shares ONE connection (watchTasks and the multi-task stream):
// browsers allow six HTTP/1.1 connections per origin, so a dashboard with a stream per task
// runs out. `?stream=single` uses one watchTask per task instead, to compare.
import { watchTask, watchTasks } from "./taskstream.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const perTask = params.get("stream") === "single";

const cards = new Map(); // task id -> card
let group = null; // multi mode: { handle, ids, status, transport }
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
  const connections = perTask
    ? [...cards.values()].filter((c) => c.status && c.status !== "closed").map((c) => c.status)
    : group && group.status !== "closed"
      ? [group.status]
      : [];
  const status = SEVERITY.find((s) => connections.includes(s)) ?? "idle";
  const watched = [...cards.values()].filter((c) => !c.done).length;
  $("connection").dataset.status = status;
  let text = status;
  if (connections.length) {
    const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;
    text += ` · ${plural(watched, "task")}, ${plural(connections.length, "connection")}`;
  }
  $("connection-text").textContent = text;
}

// ---- task cards ---------------------------------------------------------------------------------

function formatEta(seconds) {
  if (seconds == null) return "ETA —";
  if (seconds < 60) return `ETA ${seconds}s`;
  const minutes = Math.floor(seconds / 60);
  return `ETA ${minutes}m ${String(seconds % 60).padStart(2, "0")}s`;
}

function newCard(taskId) {
  const el = $("task-template").content.firstElementChild.cloneNode(true);
  el.dataset.taskId = taskId;
  el.querySelector(".task-id").textContent = taskId;
  $("tasks").prepend(el);
  $("empty").hidden = true;
  return { el, status: "connecting", transport: null, timeouts: 0, done: false, handle: null };
}

function renderTransport(card) {
  const parts = [card.transport, card.status].filter(Boolean);
  if (card.timeouts) parts.push(`resumed after timeout ×${card.timeouts}`);
  card.el.querySelector(".transport").textContent = parts.join(" · ");
}

function showProgress(card, p) {
  const { el } = card;
  const percent = p.progress >= 100 ? 100 : Math.floor(p.progress);
  el.dataset.state = p.state;
  el.querySelector(".state").textContent = p.state;
  el.querySelector(".bar").setAttribute("aria-valuenow", String(percent));
  el.querySelector(".fill").style.width = `${percent}%`;
  el.querySelector(".percent").textContent = `${percent}%`;
  el.querySelector(".eta").textContent = formatEta(p.estimated_time);
}

function showComplete(card, c) {
  const { el } = card;
  el.dataset.state = c.state;
  el.querySelector(".state").textContent = c.state;
  const outcome = el.querySelector(".outcome");
  if (c.state === "success") {
    showProgress(card, { state: "success", progress: 100, estimated_time: 0 });
    outcome.textContent = "✓ complete";
  } else {
    outcome.textContent = c.error ? `✗ ${c.state}: ${c.error}` : `✗ ${c.state}`;
  }
  finishCard(card);
}

function showError(card, err) {
  const { el } = card;
  el.dataset.state = err.kind === "not_found" ? "not_found" : "error";
  el.querySelector(".state").textContent = err.kind.replace("_", " ");
  el.querySelector(".outcome").textContent = `✗ ${err.message}`;
  finishCard(card);
}

function finishCard(card) {
  card.done = true;
  card.status = "closed";
  card.el.classList.add("done");
  renderTransport(card);
  renderConnection();
}

// ---- watching: one connection per task, or one for all ------------------------------------------

function watchOne(card, taskId) {
  card.handle = watchTask(taskId, {
    getToken,
    onProgress: (p) => showProgress(card, p),
    onComplete: (c) => showComplete(card, c),
    onError: (err) => showError(card, err),
    onTimeout: () => {
      card.timeouts += 1;
      renderTransport(card);
    },
    onStatus: (status, { transport }) => {
      if (card.done) return;
      card.status = status;
      card.transport = transport;
      renderTransport(card);
      renderConnection();
    },
  });
}

// Re-open the shared stream when the set of running tasks changes. The new stream starts with a
// snapshot of each task, so nothing is missed in the switch.
let regroupQueued = false;
function regroup() {
  if (regroupQueued) return;
  regroupQueued = true;
  queueMicrotask(() => {
    regroupQueued = false;
    const ids = [...cards.entries()].filter(([, c]) => !c.done).map(([id]) => id);
    if (group && ids.length === group.ids.length && ids.every((id) => group.ids.includes(id))) {
      return;
    }
    group?.handle.close();
    group = null;
    if (ids.length === 0) {
      renderConnection();
      return;
    }
    const current = { ids, status: "connecting", transport: null, handle: null };
    group = current;
    const pendingCards = () => ids.map((id) => cards.get(id)).filter((c) => !c.done);
    current.handle = watchTasks(ids, {
      getToken,
      onProgress: (p) => {
        const card = cards.get(p.task_id);
        if (card && !card.done) showProgress(card, p);
      },
      onComplete: (c) => {
        const card = cards.get(c.task_id);
        if (card && !card.done) showComplete(card, c);
      },
      onError: (err) => {
        const affected = err.taskId ? [cards.get(err.taskId)] : pendingCards();
        for (const card of affected) if (card && !card.done) showError(card, err);
      },
      onTimeout: () => {
        for (const card of pendingCards()) {
          card.timeouts += 1;
          renderTransport(card);
        }
      },
      onStatus: (status, { transport }) => {
        if (group !== current) return;
        current.status = status;
        current.transport = transport;
        for (const card of pendingCards()) {
          card.status = status;
          card.transport = transport;
          renderTransport(card);
        }
        renderConnection();
      },
      onAllDone: () => {
        if (group === current) group = null;
        renderConnection();
      },
    });
  });
}

function watch(taskId) {
  if (cards.has(taskId)) return;
  if (!perTask && taskId.includes(",")) {
    showPageError(`A task id with a comma cannot share the stream: ${taskId}`);
    return;
  }
  const card = newCard(taskId);
  cards.set(taskId, card);
  if (perTask) watchOne(card, taskId);
  else regroup();
  renderConnection();
}

// ---- controls -----------------------------------------------------------------------------------

function showPageError(message) {
  const box = $("page-error");
  box.textContent = message;
  box.hidden = !message;
}

async function startDemoTask() {
  const button = $("start-demo");
  button.disabled = true;
  showPageError("");
  try {
    const response = await fetch("/demo/tasks", {
      method: "POST",
      headers: { Authorization: `Bearer ${await getToken()}` },
    });
    const body = await response.json();
    if (!response.ok) throw new Error(body.error ?? `HTTP ${response.status}`);
    watch(body.task_id);
  } catch (err) {
    showPageError(`Could not start a demo task: ${err.message}`);
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
