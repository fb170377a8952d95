// taskstream.js: watch the progress of taskstream tasks from a browser.
//
// A dependency-free ES module with no build step: serve it as is and `import` it.
//
//   import { watchTask } from "/static/taskstream.js";
//   const handle = watchTask("task_abc123", {
//     getToken: () => auth.currentToken(),
//     onProgress: (p) => render(p.state, p.progress, p.estimated_time),
//     onComplete: (c) => console.log("finished:", c.state),
//     onError: (e) => console.error(e.kind, e.message),
//   });
//   handle.close();  // when the view goes away
//
// Transports, tried in this order until one works:
//   1. native EventSource (token in the `access_token` query parameter, because EventSource cannot
//      send headers); it reconnects by itself and resumes with Last-Event-ID;
//   2. fetch() streaming with an `Authorization` header, the SSE parsed here;
//   3. long polling of GET /api/v1/tasks/{id}?wait=25&after_version=N.
// A transport is abandoned only if it fails before it has worked once. After that, a lost
// connection is transient: the watch reconnects and never closes on it. A watch closes on
// `complete`, on "Task not found", on an authentication failure that a fresh token does not cure,
// or when the caller calls close().

const TERMINAL_STATES = new Set(["success", "failed", "cancelled"]);
const TRANSPORTS = ["eventsource", "fetch", "poll"];

/**
 * Why a watch ended without `complete`. `kind` is "not_found", "auth", "bad_request",
 * "unavailable" (no transport can run here) or "server" (an error event this client does not know).
 */
export class TaskStreamError extends Error {
  constructor(kind, message, { status = null, taskId = null } = {}) {
    super(message);
    this.name = "TaskStreamError";
    this.kind = kind;
    this.status = status;
    this.taskId = taskId;
  }
}

/** True for the states after which a task never changes again. */
export function isTerminal(state) {
  return TERMINAL_STATES.has(state);
}

/**
 * An incremental parser for the text/event-stream format (the WHATWG "event stream
 * interpretation"): feed it decoded text in chunks of any size; it calls `onEvent` once per
 * dispatched event with `{ type, data, id }`, and `onRetry(ms)` for each valid `retry:` field.
 * Comments (heartbeats) are ignored.
 */
export class SSEParser {
  constructor(onEvent, onRetry = () => {}) {
    this.onEvent = onEvent;
    this.onRetry = onRetry;
    this.buffer = "";
    this.started = false;
    this.lastEventId = "";
    this.reset();
  }

  reset() {
    this.type = "";
    this.data = [];
    this.hasData = false;
  }

  push(text) {
    if (!this.started) {
      this.started = true;
      if (text.charCodeAt(0) === 0xfeff) text = text.slice(1);
    }
    this.buffer += text;
    for (;;) {
      const match = /\r\n|\r|\n/.exec(this.buffer);
      if (match === null) return;
      // A CR at the very end may be the first half of a CRLF split across chunks.
      if (match[0] === "\r" && match.index === this.buffer.length - 1) return;
      const line = this.buffer.slice(0, match.index);
      this.buffer = this.buffer.slice(match.index + match[0].length);
      this.line(line);
    }
  }

  /** The stream ended: a trailing CR still ends its line; an unfinished event is dropped. */
  end() {
    if (this.buffer.endsWith("\r")) this.line(this.buffer.slice(0, -1));
    this.buffer = "";
    this.reset();
  }

  line(line) {
    if (line === "") {
      this.dispatch();
      return;
    }
    if (line.startsWith(":")) return;
    const colon = line.indexOf(":");
    let field = line;
    let value = "";
    if (colon !== -1) {
      field = line.slice(0, colon);
      value = line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
    }
    if (field === "event") this.type = value;
    else if (field === "data") {
      this.data.push(value);
      this.hasData = true;
    } else if (field === "id") {
      if (!value.includes("\0")) this.lastEventId = value;
    } else if (field === "retry") {
      if (/^\d+$/.test(value)) this.onRetry(Number(value));
    }
  }

  dispatch() {
    const event = { type: this.type || "message", data: this.data.join("\n"), id: this.lastEventId };
    const hasData = this.hasData;
    this.reset();
    if (hasData) this.onEvent(event);
  }
}

const sleep = (ms, signal) =>
  new Promise((resolve) => {
    if (signal?.aborted) return resolve();
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => {
      clearTimeout(timer);
      resolve();
    });
  });

// Spread reconnects of many clients that lost the same server at once.
const jitter = (ms) => Math.round(ms * (1 + Math.random() * 0.5));

function backoff(attempt) {
  return jitter(Math.min(30000, 1000 * 2 ** Math.min(attempt, 5)));
}

function retryAfterMs(response, fallback) {
  const raw = response.headers.get("Retry-After");
  const seconds = raw === null ? NaN : Number(raw);
  return Number.isFinite(seconds) && seconds >= 0 ? jitter(seconds * 1000) : fallback;
}

function callSafely(fn, ...args) {
  if (typeof fn !== "function") return undefined;
  try {
    return fn(...args);
  } catch (err) {
    // A bug in the caller's callback must not stop the watch.
    (globalThis.reportError ?? console.error)(err);
    return undefined;
  }
}

/**
 * When a JWT expires, in ms since the epoch, read from its `exp` claim without verifying it
 * (only the server can; this is just a schedule). Null for anything that is not a JWT.
 */
export function jwtExpiresAt(token) {
  if (typeof token !== "string") return null;
  const parts = token.split(".");
  if (parts.length !== 3) return null;
  try {
    const b64 = parts[1].replace(/-/g, "+").replace(/_/g, "/");
    const claims = JSON.parse(atob(b64 + "=".repeat((4 - (b64.length % 4)) % 4)));
    return typeof claims?.exp === "number" ? claims.exp * 1000 : null;
  } catch {
    return null;
  }
}

function isEventStream(response) {
  const type = response.headers.get("Content-Type") ?? "";
  return response.status === 200 && type.startsWith("text/event-stream") && Boolean(response.body);
}

/**
 * The later of two group-stream resume ids: per position, the higher version. During a token
 * refresh two streams overlap and the older one's ids lag; versions only go up, so the
 * element-wise maximum is what was delivered.
 */
function mergeGroupId(current, next) {
  if (!current || !/^[0-9.]+$/.test(current) || !/^[0-9.]+$/.test(next)) return next;
  const a = current.split(".");
  const b = next.split(".");
  const out = [];
  for (let i = 0; i < Math.max(a.length, b.length); i += 1) {
    out.push(String(Math.max(Number(a[i] ?? 0), Number(b[i] ?? 0))));
  }
  return out.join(".");
}

/** Raised inside a transport to move on to the next one. */
class Unusable extends Error {
  constructor(message, { absent = false } = {}) {
    super(message);
    this.absent = absent; // not available here at all: nothing was tried
  }
}

/**
 * One watch of one task (single mode), of a list of tasks (multi mode) or of every task of a
 * group (group mode: `ids` is the group id alone, the tasks arrive as they join) over one
 * connection. It owns at most one live transport at a time.
 */
class Watch {
  constructor(mode, ids, options) {
    if (!options || (options.token == null && typeof options.getToken !== "function")) {
      throw new TypeError("watchTask needs { token } or { getToken }");
    }
    this.mode = mode;
    this.ids = ids;
    this.opts = {
      pollWait: 25,
      pollInterval: 2000,
      firstEventTimeout: 10000,
      idleTimeout: 60000,
      refreshAhead: 10000,
      reconnectOnTimeout: true,
      withCredentials: false,
      ...options,
    };
    this.baseUrl = (options.baseUrl ?? "").replace(/\/+$/, "");
    // `EventSource: null` turns the native transport off; undefined means the browser's own.
    this.EventSource =
      options.EventSource === undefined ? globalThis.EventSource ?? null : options.EventSource;
    this.fetch = options.fetch ?? globalThis.fetch?.bind(globalThis) ?? null;
    // A group's tasks are not known up front, so there is nothing to long-poll; and tickets name
    // task ids, so they do not open group streams.
    const wanted = (options.transports ?? TRANSPORTS).filter(
      (name) => mode !== "group" || name !== "poll",
    );
    if (mode === "group" && options.tickets) {
      throw new TypeError("watchGroup cannot use tickets: use a token or getToken");
    }
    for (const name of wanted) {
      if (!TRANSPORTS.includes(name)) throw new TypeError(`unknown transport ${name}`);
    }
    this.ladder = TRANSPORTS.filter((name) => wanted.includes(name));
    this.versions = new Map(); // task id -> last version delivered
    this.pending = new Set(mode === "group" ? [] : ids); // tasks not yet terminal
    this.notFound = 0;
    this.results = {};
    this.lastState = new Map(); // task id -> last progress data
    this.lastEventId = null;
    // Versions already delivered elsewhere (another watch, another tab): resume after them.
    // Only a complete set is usable: the positional resume id cannot say "never seen" for one
    // task (the server would take 0 for "seen nothing" and stay silent about a missing task).
    const from = options.resumeFrom ?? null;
    this.resumed =
      mode !== "group" && from !== null && ids.every((id) => Number.isInteger(from[id]));
    if (this.resumed) {
      for (const id of ids) this.versions.set(id, from[id]);
      this.lastEventId = this.resumeId(true);
    }
    this.status = null;
    this.reason = null;
    this.transport = null;
    this.closed = false;
    this.ready = false;
    this.abort = new AbortController();
    this.es = null;
    this.retiring = null; // the EventSource a token refresh is replacing, until the new one opens
    this.tokenExpiresAt = null; // ms since the epoch, of the token last handed out (null: unknown)
    this.refreshTimer = null;
    this.rotate = null; // the live transport's make-before-break reconnect, if it has one
    this.tokenEnded = false; // the server ended the stream at the token's expiry
    this.watchNetwork();
    this.setStatus("connecting");
    this.run();
  }

  // ---- outcome -------------------------------------------------------------------------------

  /**
   * `reason` says why the status changed: "token_refresh", "token_expired", "network",
   * "heartbeat", "offline", "online", "server_closed", "timeout", "complete", "error",
   * "unavailable" (streaming is not possible here), or null.
   */
  setStatus(status, reason = null) {
    if (this.closed || (status === this.status && reason === this.reason)) return;
    if (status === this.status && status === "live") return;
    this.status = status;
    this.reason = reason;
    callSafely(this.opts.onStatus, status, { transport: this.transport, reason });
  }

  shutdown() {
    this.closed = true;
    this.abort.abort();
    clearTimeout(this.refreshTimer);
    this.unwatchNetwork?.();
    for (const es of [this.es, this.retiring]) es?.close();
    this.es = null;
    this.retiring = null;
  }

  /** The caller's close(): stop everything, call nothing more. */
  close() {
    if (this.closed) return;
    this.shutdown();
    this.status = "closed";
    this.reason = "closed";
  }

  finish(callback, value, reason) {
    if (this.closed) return;
    this.setStatus("closed", reason);
    this.shutdown();
    callSafely(callback, value);
  }

  /** The first snapshot is in hand: from here on every change arrives (see onReady). */
  markReady() {
    if (this.ready || this.closed) return;
    this.ready = true;
    callSafely(this.opts.onReady);
  }

  // ---- token lifetime: refresh before the server ends the stream ---------------------------

  /**
   * A live stream was opened with the token last handed out: plan to replace it with a fresh one
   * `refreshAhead` ms before that token expires (at most half of its remaining life early),
   * so the server never has to end a stream for an expired token.
   */
  scheduleRefresh() {
    clearTimeout(this.refreshTimer);
    this.refreshTimer = null;
    const ahead = this.opts.refreshAhead;
    if (this.closed || !ahead || typeof this.opts.getToken !== "function") return;
    if (this.tokenExpiresAt === null || typeof this.rotate !== "function") return;
    const left = this.tokenExpiresAt - Date.now();
    if (left <= 0) return;
    const at = Math.max(0, left - Math.min(ahead, left / 2));
    this.refreshTimer = setTimeout(() => {
      this.refreshTimer = null;
      if (!this.closed) this.rotate?.();
    }, at);
  }

  // ---- the network: offline, online ----------------------------------------------------------

  watchNetwork() {
    const target = globalThis.window ?? null;
    if (!target || typeof target.addEventListener !== "function") return;
    // Offline: show it at once (the connection may take minutes to notice). Online: reconnect
    // now instead of waiting out a back-off, resuming from the last versions.
    const offline = () => this.setStatus("reconnecting", "offline");
    const online = () => {
      if (this.status !== "live" || this.reason === "offline") this.kick?.("online");
    };
    target.addEventListener("offline", offline);
    target.addEventListener("online", online);
    this.unwatchNetwork = () => {
      target.removeEventListener("offline", offline);
      target.removeEventListener("online", online);
    };
  }

  fail(error) {
    this.finish(this.opts.onError, error, "error");
  }

  // ---- events, whatever the transport --------------------------------------------------------

  handle(type, raw, id) {
    if (this.closed) return;
    if (id) this.lastEventId = this.mode === "group" ? mergeGroupId(this.lastEventId, id) : id;
    let data;
    try {
      data = JSON.parse(raw);
    } catch {
      return; // not ours; ignore rather than die
    }
    if (type === "progress") this.onProgress(data);
    else if (type === "complete") this.onComplete(data);
    else if (type === "error") this.onServerError(data);
    else if (type === "timeout") this.onTimeout(data);
    else if (type === "group_complete" && this.mode === "group") {
      this.finish(this.opts.onAllDone, this.results, "complete");
    }
  }

  taskIdOf(data) {
    return this.mode === "single" ? this.ids[0] : data.task_id;
  }

  onProgress(data) {
    const taskId = this.taskIdOf(data);
    if (this.mode === "group" && typeof taskId === "string" && !(taskId in this.results)) {
      this.pending.add(taskId); // a task of the group, maybe one that joined it just now
    }
    if (!this.pending.has(taskId)) return;
    const seen = this.versions.get(taskId);
    // Two streams overlap during a token refresh, and a resumed stream may repeat the last
    // state: a version is delivered once, and never one older than the last.
    if (typeof data.version === "number" && seen !== undefined && data.version <= seen) return;
    if (typeof data.version === "number") this.versions.set(taskId, data.version);
    if (data.task_id === undefined) data = { task_id: taskId, ...data };
    this.lastState.set(taskId, data);
    callSafely(this.opts.onProgress, data);
    if (
      this.mode !== "multi" ||
      this.versions.size + this.notFound >= this.ids.length
    ) {
      this.markReady();
    }
  }

  /**
   * Where a new connection resumes. Single task: its last version. Several: the server's
   * positional id (one version per listed id, dot-separated), computed from what was delivered
   * rather than copied from the last event, because during a token refresh two streams overlap
   * and the older one's ids lag.
   */
  resumeId(force = false) {
    if (this.lastEventId === null && !force) return null;
    if (this.mode === "single") {
      const v = this.versions.get(this.ids[0]);
      return v === undefined ? this.lastEventId : String(v);
    }
    // A group's id is positional over its tasks in the order they joined, which only the
    // server knows: the highest id seen (see mergeGroupId) is where to resume.
    if (this.mode === "group") return this.lastEventId;
    return this.ids.map((id) => String(this.versions.get(id) ?? 0)).join(".");
  }

  onComplete(data) {
    const taskId = this.taskIdOf(data);
    if (!this.pending.has(taskId)) return;
    if (data.task_id === undefined) data = { task_id: taskId, ...data };
    this.pending.delete(taskId);
    this.results[taskId] = data;
    if (this.mode === "single") {
      this.markReady();
      this.finish(this.opts.onComplete, data, "complete");
      return;
    }
    callSafely(this.opts.onComplete, data);
    this.maybeAllDone();
  }

  onServerError(data) {
    const message = typeof data.error === "string" ? data.error : "Stream error";
    if (this.mode === "group" && data.task_id == null && /group not found/i.test(message)) {
      this.fail(new TaskStreamError("not_found", message));
      return;
    }
    if (data.task_id == null && /token/i.test(message)) {
      this.onTokenExpired(message);
      return;
    }
    const taskId = this.mode === "single" ? this.ids[0] : data.task_id ?? null;
    const kind = /not found/i.test(message) ? "not_found" : "server";
    const error = new TaskStreamError(kind, message, { taskId });
    if (this.mode === "single" || taskId === null) {
      this.fail(error);
      return;
    }
    if (!this.pending.has(taskId)) return;
    this.pending.delete(taskId);
    this.notFound += 1;
    this.results[taskId] = error;
    callSafely(this.opts.onError, error);
    if (this.versions.size + this.notFound >= this.ids.length) this.markReady();
    this.maybeAllDone();
  }

  /**
   * The server ends a stream when the token it was opened with expires. With getToken, that is
   * routine: reconnect with a fresh token and resume. With a fixed token, it is the end.
   */
  onTokenExpired(message) {
    if (typeof this.opts.getToken !== "function") {
      this.fail(new TaskStreamError("auth", message));
      return;
    }
    this.setStatus("reconnecting", "token_expired");
    this.tokenEnded = true; // not server trouble: come back at once, without the retry delay
    // fetch reconnects (with a fresh token) when the stream ends; an EventSource would come back
    // with the stale token in its URL, so it is replaced.
    this.replaceEventSource?.();
  }

  onTimeout(data) {
    callSafely(this.opts.onTimeout, data);
    // The server closes the stream after `timeout`; a reconnect resumes from the last event id.
    if (!this.opts.reconnectOnTimeout) this.finish(null, undefined, "timeout");
  }

  maybeAllDone() {
    // A group ends with the server's `group_complete`: another task may still join it.
    if (this.mode === "group") return;
    if (this.pending.size === 0) this.finish(this.opts.onAllDone, this.results, "complete");
  }

  /** A transport lost its connection: if the last state seen was terminal, that is the end. */
  finishIfTerminalSeen() {
    for (const taskId of [...this.pending]) {
      const last = this.lastState.get(taskId);
      if (last && isTerminal(last.state)) this.onComplete({ task_id: taskId, state: last.state });
    }
    return this.closed;
  }

  // ---- credentials and URLs ------------------------------------------------------------------

  async token() {
    let token = this.opts.token;
    if (typeof this.opts.getToken === "function") {
      try {
        token = await this.opts.getToken();
      } catch (err) {
        throw new TaskStreamError("auth", `getToken failed: ${err?.message ?? err}`);
      }
    }
    const expiresAt = this.opts.tokenExpiresAt ?? jwtExpiresAt;
    const at = callSafely(expiresAt, token);
    this.tokenExpiresAt = typeof at === "number" && Number.isFinite(at) ? at : null;
    return token;
  }

  /** POST /api/v1/sse/tickets: a one-use ticket for the next EventSource URL. */
  async ticket(token) {
    const body = this.mode === "single" ? { task_id: this.ids[0] } : { task_ids: this.ids };
    let response;
    try {
      response = await this.fetch(`${this.baseUrl}/api/v1/sse/tickets`, {
        method: "POST",
        headers: { Authorization: `Bearer ${token}`, "Content-Type": "application/json" },
        body: JSON.stringify(body),
        cache: "no-store",
        credentials: this.opts.withCredentials ? "include" : "same-origin",
        signal: this.abort.signal,
      });
    } catch (err) {
      throw new Unusable(`ticket request failed: ${err?.message ?? err}`);
    }
    if (response.status === 200) {
      const answer = await response.json().catch(() => null);
      if (answer && typeof answer.ticket === "string") return answer.ticket;
      throw new Unusable("ticket answer without a ticket");
    }
    await this.raiseForFatal(response);
    throw new Unusable(`ticket request answered ${response.status}`);
  }

  streamPath() {
    if (this.mode === "group") {
      return [`/api/v1/sse/groups/${encodeURIComponent(this.ids[0])}/progress`, {}];
    }
    if (this.mode === "single") {
      return [`/api/v1/sse/tasks/${encodeURIComponent(this.ids[0])}/progress`, {}];
    }
    // Always the full list, in the same order: the multi-task resume id is positional.
    return ["/api/v1/sse/tasks", { ids: this.ids.join(",") }];
  }

  /**
   * The one place where an EventSource URL gets its credentials. EventSource cannot send
   * headers, so the token travels as `access_token`. A ticket flow (a short-lived, one-use
   * `ticket` exchanged for the token) slots in here and nowhere else.
   */
  async eventSourceUrl(resume) {
    const [path, params] = this.streamPath();
    const query = new URLSearchParams(params);
    const token = await this.token();
    if (this.opts.tickets) query.set("ticket", await this.ticket(token));
    else query.set("access_token", token);
    // A new EventSource cannot set Last-Event-ID; the server also reads `lastEventId`.
    const from = this.resumeId();
    if (resume && from) query.set("lastEventId", from);
    return `${this.baseUrl}${path}?${query}`;
  }

  async fetchHeaders(extra = {}) {
    return { Authorization: `Bearer ${await this.token()}`, ...extra };
  }

  fetchInit(headers, signal) {
    return {
      headers,
      signal,
      cache: "no-store",
      credentials: this.opts.withCredentials ? "include" : "same-origin",
    };
  }

  // ---- the transport ladder ------------------------------------------------------------------

  async run() {
    for (const name of this.ladder) {
      if (this.closed) return;
      this.transport = name;
      try {
        if (name === "eventsource") await this.runEventSource();
        else if (name === "fetch") await this.runFetch();
        else await this.runPoll();
        return; // the transport ended the watch
      } catch (err) {
        if (this.closed) return;
        if (err instanceof TaskStreamError) {
          this.fail(err);
          return;
        }
        if (!(err instanceof Unusable)) {
          (globalThis.reportError ?? console.error)(err);
        }
        if (!err.absent) this.setStatus("reconnecting", "network");
      }
    }
    if (!this.closed) {
      this.fail(new TaskStreamError("unavailable", "No transport could reach the server"));
    }
  }

  /**
   * Native EventSource. Resolves when the watch ends; rejects with Unusable when it fails before
   * it ever worked (first connection: before its first event; a reopened one: before it opens).
   *
   * A token refresh (and a return online) is make-before-break: the new EventSource opens with
   * the fresh credentials, resuming from the last versions, while the old one keeps delivering;
   * the old one is closed when the new one has opened. Versions seen twice are dropped.
   * EventSource cannot see the server's heartbeat comments, so a stalled connection is noticed
   * only by the browser itself or by an `online` event: the fetch transport watches heartbeats.
   */
  runEventSource() {
    const ES = this.EventSource;
    if (typeof ES !== "function") {
      return Promise.reject(new Unusable("no EventSource", { absent: true }));
    }
    return new Promise((resolve, reject) => {
      let proven = false;
      let reopenAttempt = 0;
      const stop = () => resolve();
      this.abort.signal.addEventListener("abort", stop);

      const open = async (resume, handover = null) => {
        let url;
        try {
          url = await this.eventSourceUrl(resume);
        } catch (err) {
          // A refresh that cannot get credentials leaves the old stream to run to its end.
          if (handover === null) reject(err);
          return;
        }
        if (this.closed || (handover !== null && this.es !== handover)) return;
        const es = new ES(url, { withCredentials: this.opts.withCredentials });
        if (handover !== null) this.retiring = handover;
        this.es = es;
        let opened = false;
        let firstTimer = null;
        if (!proven) {
          // An open stream that delivers nothing (a buffering proxy) is no use either.
          firstTimer = setTimeout(() => {
            if (!proven && this.es === es) giveUp(es, "no event received");
          }, this.opts.firstEventTimeout);
        }
        const onEvent = (type) => (ev) => {
          if (this.retiring === es) {
            // Replaced but not yet closed: its changes still count; its end does not.
            if (type !== "error") this.handle(type, ev.data, ev.lastEventId);
            return;
          }
          if (this.es !== es) return;
          if (!proven) {
            proven = true;
            this.scheduleRefresh();
          }
          reopenAttempt = 0;
          clearTimeout(firstTimer);
          this.setStatus("live");
          this.handle(type, ev.data, ev.lastEventId);
        };
        for (const type of ["progress", "complete", "timeout", "group_complete"]) {
          es.addEventListener(type, onEvent(type));
        }
        es.addEventListener("open", () => {
          if (this.es !== es) return;
          opened = true;
          if (handover !== null && this.retiring === handover) {
            handover.close();
            this.retiring = null;
          }
          if (resume) {
            proven = true;
            reopenAttempt = 0;
          }
          if (proven) {
            this.setStatus("live");
            this.scheduleRefresh();
          }
        });
        es.addEventListener("error", (ev) => {
          if (this.closed) return;
          if (this.retiring === es) {
            // The replaced stream ended (its token ran out) before its successor opened.
            es.close();
            this.retiring = null;
            return;
          }
          if (this.es !== es) return;
          if (typeof ev.data === "string") {
            // The server's own `event: error` (task not found), not a connection problem.
            onEvent("error")(ev);
            return;
          }
          if (handover !== null && !opened && this.retiring === handover) {
            // The replacement could not open: the old stream runs on until its token's end.
            es.close();
            this.es = handover;
            this.retiring = null;
            return;
          }
          if (!proven) {
            giveUp(es, opened ? "stream ended before its first event" : "connection failed");
            return;
          }
          if (this.finishIfTerminalSeen()) return;
          if (es.readyState !== ES.CLOSED) {
            // Transient: the browser reconnects by itself, sending Last-Event-ID. Let it.
            this.setStatus("reconnecting", "network");
            return;
          }
          // The browser gave up (an HTTP error such as an expired token in the URL). Open a new
          // EventSource with a fresh token, resuming where we were; if that one cannot even open,
          // fall through to fetch, which can see the HTTP status and tell a fatal error.
          es.close();
          this.es = null;
          this.setStatus("reconnecting", "server_closed");
          if (resume && !opened) {
            reject(new Unusable("reopened EventSource failed"));
            return;
          }
          reopenAttempt += 1;
          sleep(backoff(reopenAttempt - 1), this.abort.signal).then(() => {
            if (!this.closed) open(true);
          });
        });
      };

      this.replaceEventSource = () => {
        this.tokenEnded = false;
        if (!this.es) return;
        this.es.close();
        this.es = null;
        sleep(jitter(250), this.abort.signal).then(() => {
          if (!this.closed) open(true);
        });
      };
      this.rotate = () => {
        if (this.es && !this.retiring) open(true, this.es);
      };
      this.kick = () => {
        // Back online: an open EventSource may sit on a dead connection; replace it (make before
        // break). One that is between attempts is reopened now rather than after its delay.
        if (!this.es || this.retiring) return;
        if (this.es.readyState === ES.OPEN) {
          open(true, this.es);
          return;
        }
        this.es.close();
        this.es = null;
        open(true);
      };

      const giveUp = (es, why) => {
        es.close();
        if (this.es === es) this.es = null;
        this.rotate = null;
        this.kick = null;
        this.abort.signal.removeEventListener("abort", stop);
        reject(new Unusable(why));
      };

      // A watch that starts from known versions is a resumption: nothing may come until a change.
      open(this.resumed);
    });
  }

  /**
   * fetch() streaming with an Authorization header; SSE parsed by SSEParser. A stream silent for
   * `idleTimeout` ms (the server sends a heartbeat comment every TASKSTREAM_HEARTBEAT seconds)
   * is dead: a machine that slept, a stalled proxy. It is dropped and the watch resumes.
   * A token refresh is make-before-break, as for EventSource: the old response is read until
   * the new one has answered 200.
   */
  async runFetch() {
    if (typeof this.fetch !== "function" || typeof TextDecoder !== "function") {
      throw new Unusable("no fetch streaming", { absent: true });
    }
    let proven = false;
    let attempt = 0;
    let retryMs = 3000;
    let refreshed = false;
    let current = null; // the controller of the response being read
    let next = null; // a response opened by a refresh, waiting to be read
    let rotating = false;
    this.rotate = async () => {
      if (rotating || this.closed || current === null) return;
      rotating = true;
      const controller = new AbortController();
      const onAbort = () => controller.abort();
      this.abort.signal.addEventListener("abort", onAbort);
      try {
        const response = await this.openFetchStream(controller.signal);
        if (this.closed || current === null || !isEventStream(response)) {
          controller.abort();
          return;
        }
        next = { response, controller, onAbort };
        current.abort("handover");
      } catch {
        // The old stream runs on to its token's end; the ordinary path takes it from there.
        controller.abort();
      } finally {
        rotating = false;
        if (next?.controller !== controller) this.abort.signal.removeEventListener("abort", onAbort);
      }
    };
    this.kick = (why) => {
      // Back online: the stream may sit on a dead connection; refresh it (make before break).
      // Between attempts, skip the rest of the back-off.
      if (current !== null) this.rotate?.();
      else this.wake?.abort(why);
    };
    while (!this.closed) {
      let controller;
      let onAbort;
      let wait;
      let response;
      try {
        if (next !== null) {
          ({ response, controller, onAbort } = next);
          next = null;
        } else {
          controller = new AbortController();
          onAbort = () => controller.abort();
          this.abort.signal.addEventListener("abort", onAbort);
          try {
            response = await this.openFetchStream(controller.signal);
          } catch (err) {
            if (err instanceof TaskStreamError) throw err;
            if (this.closed) return;
            if (!proven) throw new Unusable(`fetch failed: ${err?.message ?? err}`);
            this.setStatus("reconnecting", "network");
            wait = backoff(attempt++);
            continue;
          }
        }
        if (isEventStream(response)) {
          if (!proven) {
            proven = true;
            this.scheduleRefresh();
          }
          attempt = 0;
          refreshed = false;
          this.setStatus("live");
          current = controller;
          const ended = await this.readStream(response.body, controller, retryMs);
          current = null;
          retryMs = ended.retryMs;
          if (this.closed) return;
          if (ended.why === "handover" && next !== null) {
            this.scheduleRefresh();
            continue;
          }
          if (this.finishIfTerminalSeen()) return;
          if (this.tokenEnded) {
            this.tokenEnded = false;
            continue;
          }
          this.setStatus("reconnecting", ended.why);
          wait = jitter(retryMs);
          continue;
        }
        if (response.status === 204) {
          // The server says this stream has nothing more for us: we saw its end already.
          if (this.finishIfTerminalSeen()) return;
          throw new Unusable("204 without a terminal state");
        }
        if (response.status === 401 && typeof this.opts.getToken === "function" && !refreshed) {
          refreshed = true; // one retry with a fresh token, right away
          continue;
        }
        await this.raiseForFatal(response);
        if (!proven) throw new Unusable(`stream answered ${response.status}`);
        this.setStatus("reconnecting", "server_closed");
        wait = retryAfterMs(response, backoff(attempt++));
      } finally {
        this.abort.signal.removeEventListener("abort", onAbort);
        if (wait !== undefined && !this.closed) {
          // An `online` event ends the wait early (kick).
          this.wake = new AbortController();
          const both = () => this.wake.abort();
          this.abort.signal.addEventListener("abort", both);
          await sleep(wait, this.wake.signal);
          this.abort.signal.removeEventListener("abort", both);
          this.wake = null;
        }
      }
    }
  }

  /** One stream request, resuming from the versions delivered so far. */
  async openFetchStream(signal) {
    const [path, params] = this.streamPath();
    const query = new URLSearchParams(params).toString();
    const extra = { Accept: "text/event-stream" };
    const from = this.resumeId();
    if (from) extra["Last-Event-ID"] = from;
    const headers = await this.fetchHeaders(extra);
    return this.fetch(
      `${this.baseUrl}${path}${query ? `?${query}` : ""}`,
      this.fetchInit(headers, signal),
    );
  }

  /**
   * Read one response until it ends. Returns `{ retryMs, why }`: why is "server_closed" (the
   * body ended), "heartbeat" (silent for idleTimeout ms), "handover" (a refresh replaced it) or
   * "network".
   */
  async readStream(body, controller, retryMs) {
    const reader = body.getReader();
    const decoder = new TextDecoder();
    let idle = null;
    let why = "network";
    const arm = () => {
      clearTimeout(idle);
      // Heartbeats come every TASKSTREAM_HEARTBEAT seconds: silence for longer than idleTimeout
      // means a dead connection, even one the operating system still calls open.
      idle = setTimeout(() => {
        why = "heartbeat";
        controller.abort();
      }, this.opts.idleTimeout);
    };
    const parser = new SSEParser(
      (ev) => this.handle(ev.type, ev.data, ev.id),
      (ms) => {
        retryMs = ms;
      },
    );
    // Some fetch implementations (Node 20's undici) may leave a pending read() unsettled when
    // the request is aborted after its body started: the abort itself ends the read here.
    let onAbort;
    const aborted = new Promise((_, reject) => {
      onAbort = () => reject(new Error("aborted"));
      if (controller.signal.aborted) onAbort();
      else controller.signal.addEventListener("abort", onAbort, { once: true });
    });
    aborted.catch(() => {});
    arm();
    try {
      for (;;) {
        const { done, value } = await Promise.race([reader.read(), aborted]);
        if (done) why = "server_closed";
        if (done || this.closed) break;
        arm();
        parser.push(decoder.decode(value, { stream: true }));
      }
    } catch {
      // Network error or our own abort: the caller decides what comes next.
      if (controller.signal.reason === "handover") why = "handover";
    } finally {
      clearTimeout(idle);
      controller.signal.removeEventListener("abort", onAbort);
      parser.end();
      reader.cancel().catch(() => {});
    }
    return { retryMs, why };
  }

  /** Throws TaskStreamError for answers that no retry can cure. */
  async raiseForFatal(response, taskId = null) {
    const { status } = response;
    if (status !== 400 && status !== 401 && status !== 403 && !(taskId && status === 404)) return;
    let message = `HTTP ${status}`;
    try {
      const body = await response.json();
      if (body && typeof body.error === "string") message = body.error;
    } catch {
      // not JSON; keep the status line
    }
    const kind = status === 404 ? "not_found" : status === 400 ? "bad_request" : "auth";
    throw new TaskStreamError(kind, message, { status, taskId });
  }

  /** Polling: long polling for one task, conditional GETs in rounds for several. */
  async runPoll() {
    if (typeof this.fetch !== "function") throw new Unusable("no fetch");
    this.rotate = null; // each poll sends a fresh token anyway
    this.kick = null;
    this.setStatus("polling");
    const etags = new Map();
    let attempt = 0;
    let refreshed = false;
    while (!this.closed && this.pending.size > 0) {
      const ids = [...this.pending];
      const long = ids.length === 1;
      const started = Date.now();
      let changed = false;
      let trouble = null;
      // Four at a time leaves the browser's other HTTP/1.1 connections to the page.
      for (let i = 0; i < ids.length && !this.closed; i += 4) {
        const results = await Promise.all(
          ids.slice(i, i + 4).map((id) => this.pollOne(id, etags, long, !refreshed)),
        );
        for (const r of results) {
          if (r.changed) changed = true;
          if (r.trouble && !trouble) trouble = r.trouble;
        }
      }
      if (this.closed) return;
      if (trouble) {
        if (trouble.status === 401 && typeof this.opts.getToken === "function" && !refreshed) {
          refreshed = true;
          continue;
        }
        this.setStatus("reconnecting", "network");
        await sleep(trouble.wait ?? backoff(attempt++), this.abort.signal);
        continue;
      }
      attempt = 0;
      refreshed = false;
      this.setStatus("polling");
      // Long polling returns early only on a change; anything faster without one means the
      // server ignored `wait`, so pace the loop like plain polling.
      const elapsed = Date.now() - started;
      const minimum = long ? (changed ? 0 : 1000) : this.opts.pollInterval;
      if (elapsed < minimum) await sleep(minimum - elapsed, this.abort.signal);
    }
  }

  async pollOne(taskId, etags, long, mayRefresh) {
    const params = new URLSearchParams();
    if (long) {
      params.set("wait", String(this.opts.pollWait));
      params.set("after_version", String(this.versions.get(taskId) ?? 0));
    }
    const extra = { Accept: "application/json" };
    const etag = etags.get(taskId);
    if (etag && !long) extra["If-None-Match"] = etag;
    let response;
    try {
      const headers = await this.fetchHeaders(extra);
      const query = params.toString();
      response = await this.fetch(
        `${this.baseUrl}/api/v1/tasks/${encodeURIComponent(taskId)}${query ? `?${query}` : ""}`,
        this.fetchInit(headers, this.abort.signal),
      );
    } catch (err) {
      if (err instanceof TaskStreamError) throw err;
      return { trouble: { status: 0 } };
    }
    if (response.status === 304) return { changed: false };
    if (response.status === 200) {
      let task;
      try {
        task = await response.json();
      } catch {
        return { trouble: { status: 200 } };
      }
      const tag = response.headers.get("ETag");
      if (tag) etags.set(taskId, tag);
      const before = this.versions.get(taskId);
      this.onProgress({
        task_id: taskId,
        state: task.state,
        progress: task.progress,
        estimated_time: task.estimated_time ?? null,
        updated_at: task.updated_at ?? null,
        version: task.version,
      });
      if (isTerminal(task.state)) {
        const done = { task_id: taskId, state: task.state };
        if (task.state === "failed") done.error = task.error ?? null;
        this.onComplete(done);
      }
      return { changed: this.versions.get(taskId) !== before };
    }
    if (response.status === 401 && mayRefresh && typeof this.opts.getToken === "function") {
      return { trouble: { status: 401, wait: 0 } }; // once: retry with a fresh token
    }
    try {
      await this.raiseForFatal(response, taskId);
    } catch (err) {
      // Not found ends one task of several; anything else (a refused token) ends the watch.
      if (this.mode === "single" || err.kind !== "not_found") throw err;
      this.onServerError({ task_id: taskId, error: err.message });
      return { changed: true };
    }
    return { trouble: { status: response.status, wait: retryAfterMs(response, undefined) } };
  }

  handleObject() {
    const watch = this;
    return {
      close: () => watch.close(),
      get status() {
        return watch.status;
      },
      get transport() {
        return watch.transport;
      },
      get lastEventId() {
        return watch.lastEventId;
      },
      get reason() {
        return watch.reason;
      },
      get ready() {
        return watch.ready;
      },
    };
  }
}

/**
 * Watch one task until it ends. Returns `{ close(), status, transport, lastEventId }`.
 *
 * Options: `token` or `getToken` (called before each new connection), `baseUrl` (default: this
 * origin), `onProgress(progress)`, `onComplete({ task_id, state, error? })`,
 * `onError(TaskStreamError)`, `onTimeout({ message })`, `onStatus(status, { transport, reason })`
 * with status "connecting" | "live" | "reconnecting" | "polling" | "closed", `onReady()`,
 * `refreshAhead` (ms), `tickets` (bool). See taskstream.d.ts and docs/client-lifecycle.md.
 */
export function watchTask(taskId, options) {
  if (typeof taskId !== "string" || taskId === "") {
    throw new TypeError("watchTask needs a task id");
  }
  return new Watch("single", [taskId], options).handleObject();
}

/**
 * Watch several tasks over one connection (GET /api/v1/sse/tasks?ids=...). `onComplete` and
 * `onError` are called per task (the error carries `taskId`); `onAllDone(results)` once every
 * task has ended, and the connection is closed then.
 */
export function watchTasks(taskIds, options) {
  const ids = [...new Set(taskIds)];
  if (ids.length === 0 || ids.some((id) => typeof id !== "string" || id === "" || id.includes(","))) {
    throw new TypeError("watchTasks needs a non-empty list of task ids without commas");
  }
  return new Watch("multi", ids, options).handleObject();
}

/**
 * Watch every task of a group over one connection (GET /api/v1/sse/groups/{id}/progress),
 * including tasks that join it after the watch started. `onProgress`, `onComplete` and
 * `onError` are called per task; `onAllDone(results)` once the group is closed and every task in
 * it has ended (the server's `group_complete`), and the connection is closed then. A group that
 * does not exist, or is not yours, ends the watch with `onError` (kind "not_found").
 */
export function watchGroup(groupId, options) {
  if (typeof groupId !== "string" || groupId === "") {
    throw new TypeError("watchGroup needs a group id");
  }
  return new Watch("group", [groupId], options).handleObject();
}
