// shared.js: one stream connection for all tabs of an origin.
//
//   import { shareConnection } from "/static/shared.js";
//   const hub = shareConnection({ getToken: () => auth.currentToken() });
//   const sub = hub.watch("task_abc123", { onProgress, onComplete, onError, onStatus });
//   sub.close();  // this view no longer needs the task
//
// Every tab makes a hub with the same `name`. One of them, the leader, holds a Web Lock and runs
// ONE multi-task watch (watchTasks) over the union of the tasks that all tabs want; it relays every
// change over a BroadcastChannel. The others queue on the lock. When the leader's tab closes, the
// browser gives the lock to the next tab, which already knows the last version of every task
// (it heard every relay) and opens the stream resuming from them: nothing missed, nothing twice.
// Each hub delivers a version at most once and never an older one after a newer one.
//
// A tab whose id set changes (a task added or dropped) tells the leader, which replaces its
// stream make-before-break: the new stream (resuming from the known versions when every id has
// one, else from fresh snapshots, which the version check makes harmless) opens before the old
// one is closed. Without Web Locks or BroadcastChannel, every tab runs its own watch (the
// fallback is the same code with a leader of one).
import { watchTasks } from "./taskstream.js";

const PREFIX = "taskstream:";
// Changes to the id set within this many ms make one new stream, not several.
const SETTLE_MS = 30;

/** True where this browser can share one connection between tabs. */
export function canShareConnection() {
  return (
    typeof globalThis.BroadcastChannel === "function" &&
    typeof globalThis.navigator?.locks?.request === "function"
  );
}

/**
 * Make this tab's hub. Options: what watchTasks takes (getToken or token, baseUrl, transports,
 * tickets, refreshAhead, idleTimeout...), plus `name` (tabs with the same name share; default
 * "default"), `share` (false: never share, this tab streams alone) and `onLeader(isLeader)`.
 */
export function shareConnection(options = {}) {
  return new TabHub(options);
}

class TabHub {
  constructor(options) {
    if (options.token == null && typeof options.getToken !== "function") {
      throw new TypeError("shareConnection needs { token } or { getToken }");
    }
    const { name = "default", share = true, onLeader, ...watchOptions } = options;
    this.watchOptions = watchOptions;
    this.onLeader = onLeader;
    this.tab = globalThis.crypto?.randomUUID?.() ?? `${Date.now()}-${Math.random()}`;
    this.listeners = new Map(); // task id -> Set of this tab's listeners
    this.versions = new Map(); // task id -> last version delivered here
    this.states = new Map(); // task id -> last progress
    this.ends = new Map(); // task id -> ["complete", data] | ["error", {kind, message}]
    this.wants = new Map(); // other tab -> Set of task ids
    this.status = "connecting";
    this.reason = null;
    this.isLeader = false;
    this.closed = false;
    this.stream = null; // the leader's watch: { handle, ids }
    this.retired = new Set(); // handles being replaced; their changes still count
    this.syncTimer = null;
    this.shared = share && canShareConnection();
    if (!this.shared) {
      this.lead();
      return;
    }
    this.channel = new BroadcastChannel(`${PREFIX}${name}`);
    this.channel.onmessage = (ev) => this.onMessage(ev.data);
    this.onPageHide = () => this.close();
    globalThis.addEventListener?.("pagehide", this.onPageHide);
    // Held for the life of this hub: the lock is the leadership. Queued requests are granted in
    // order when the holder releases it or its tab goes away.
    globalThis.navigator.locks.request(`${PREFIX}${name}`, () => {
      if (this.closed) return undefined;
      this.lead();
      return new Promise((resolve) => {
        this.releaseLock = resolve;
      });
    });
    this.announce();
  }

  // ---- this tab's subscriptions --------------------------------------------------------------

  /** Follow one task: `{ onProgress, onComplete, onError, onStatus }`. Returns `{ close() }`. */
  watch(taskId, listener = {}) {
    if (typeof taskId !== "string" || taskId === "" || taskId.includes(",")) {
      throw new TypeError("watch needs a task id without commas");
    }
    if (this.closed) throw new Error("this hub is closed");
    let set = this.listeners.get(taskId);
    const added = set === undefined;
    if (added) {
      set = new Set();
      this.listeners.set(taskId, set);
    }
    set.add(listener);
    // What this tab already heard about the task is delivered at once.
    queueMicrotask(() => {
      if (!set.has(listener)) return;
      const last = this.states.get(taskId);
      if (last) call(listener.onProgress, last);
      const end = this.ends.get(taskId);
      if (end) call(end[0] === "complete" ? listener.onComplete : listener.onError, end[1]);
      call(listener.onStatus, this.status, { reason: this.reason, leader: this.isLeader });
    });
    if (added) this.changed();
    return {
      close: () => {
        if (!set.delete(listener) || set.size > 0) return;
        if (this.listeners.get(taskId) === set) this.listeners.delete(taskId);
        this.changed();
      },
    };
  }

  /** Leave: this tab's tasks are dropped; if this tab led, the next one takes over. */
  close() {
    if (this.closed) return;
    this.closed = true;
    clearTimeout(this.syncTimer);
    globalThis.removeEventListener?.("pagehide", this.onPageHide);
    this.stopStream();
    if (this.channel) {
      this.post({ type: "bye", tab: this.tab });
      this.channel.close();
    }
    this.releaseLock?.();
  }

  changed() {
    this.announce();
    if (this.isLeader) this.scheduleSync();
  }

  announce() {
    this.post({ type: "want", tab: this.tab, ids: [...this.listeners.keys()] });
  }

  post(message) {
    if (this.channel && !this.closed) this.channel.postMessage(message);
    else if (this.channel && message.type === "bye") this.channel.postMessage(message);
  }

  // ---- what every tab hears --------------------------------------------------------------------

  onMessage(msg) {
    if (this.closed || !msg || typeof msg !== "object") return;
    switch (msg.type) {
      case "want":
        this.wants.set(msg.tab, new Set(msg.ids));
        if (this.isLeader) {
          this.scheduleSync();
          // A tab that just arrived has heard neither the status nor the last state of tasks
          // already streamed (they may not change for a long time). Tabs that have them drop
          // the repeat by version.
          this.post({ type: "status", status: this.status, reason: this.reason });
          for (const id of msg.ids) {
            const last = this.states.get(id);
            if (last) this.post({ type: "progress", data: last });
            const end = this.ends.get(id);
            if (end) this.post({ type: "end", taskId: id, kind: end[0], data: end[1] });
          }
        }
        break;
      case "bye":
        this.wants.delete(msg.tab);
        if (this.isLeader) this.scheduleSync();
        break;
      case "leader":
        // A new leader needs everyone's ids (it may have missed some while starting).
        this.announce();
        break;
      case "progress":
        this.progress(msg.data);
        break;
      case "end":
        this.end(msg.taskId, msg.kind, msg.data);
        break;
      case "status":
        this.setStatus(msg.status, msg.reason);
        break;
      default:
        break;
    }
  }

  progress(data) {
    const id = data.task_id;
    const seen = this.versions.get(id);
    if (seen !== undefined && data.version <= seen) return false;
    this.versions.set(id, data.version);
    this.states.set(id, data);
    for (const l of this.listeners.get(id) ?? []) call(l.onProgress, data);
    return true;
  }

  end(taskId, kind, data) {
    if (this.ends.has(taskId)) return false;
    this.ends.set(taskId, [kind, data]);
    for (const l of this.listeners.get(taskId) ?? []) {
      call(kind === "complete" ? l.onComplete : l.onError, data);
    }
    return true;
  }

  setStatus(status, reason) {
    if (status === this.status && reason === this.reason) return;
    this.status = status;
    this.reason = reason;
    for (const set of this.listeners.values()) {
      for (const l of set) call(l.onStatus, status, { reason, leader: this.isLeader });
    }
  }

  // ---- the leader's stream -------------------------------------------------------------------

  lead() {
    this.isLeader = true;
    call(this.onLeader, true);
    this.post({ type: "leader", tab: this.tab });
    this.scheduleSync();
  }

  /** Every task some tab wants and that has not ended. */
  wanted() {
    const ids = new Set(this.listeners.keys());
    for (const set of this.wants.values()) for (const id of set) ids.add(id);
    return [...ids].filter((id) => !this.ends.has(id)).sort();
  }

  scheduleSync() {
    clearTimeout(this.syncTimer);
    this.syncTimer = setTimeout(() => this.sync(), SETTLE_MS);
  }

  sync() {
    if (!this.isLeader || this.closed) return;
    const ids = this.wanted();
    const now = this.stream?.ids ?? [];
    const open = now.filter((id) => !this.ends.has(id));
    if (ids.length === open.length && ids.every((id, i) => id === open[i])) return;
    if (ids.length === 0) {
      this.stopStream();
      return;
    }
    const resumeFrom = {};
    for (const id of ids) {
      if (this.versions.has(id)) resumeFrom[id] = this.versions.get(id);
    }
    const previous = this.stream;
    const stream = { ids, handle: null };
    const relay = (fn) => (...args) => {
      if (!this.closed) fn(...args);
    };
    stream.handle = watchTasks(ids, {
      ...this.watchOptions,
      resumeFrom,
      onProgress: relay((data) => {
        if (this.progress(data)) this.post({ type: "progress", data });
      }),
      onComplete: relay((data) => {
        if (this.end(data.task_id, "complete", data)) {
          this.post({ type: "end", taskId: data.task_id, kind: "complete", data });
        }
      }),
      onError: relay((error) => {
        const data = { kind: error.kind, message: error.message, taskId: error.taskId };
        for (const id of error.taskId ? [error.taskId] : ids) {
          if (this.end(id, "error", { ...data, taskId: id })) {
            this.post({ type: "end", taskId: id, kind: "error", data: { ...data, taskId: id } });
          }
        }
      }),
      onStatus: relay((status, { reason }) => {
        if (this.stream !== stream) return;
        if (status === "live" && previous && this.retired.has(previous.handle)) {
          // Make before break: the new stream is open, the old one can go.
          previous.handle.close();
          this.retired.delete(previous.handle);
        }
        if (status === "closed" && reason === "complete") return;
        this.setStatus(status, reason);
        this.post({ type: "status", status, reason });
      }),
    });
    if (previous) this.retired.add(previous.handle);
    this.stream = stream;
  }

  stopStream() {
    for (const handle of this.retired) handle.close();
    this.retired.clear();
    this.stream?.handle.close();
    this.stream = null;
  }
}

function call(fn, ...args) {
  if (typeof fn !== "function") return;
  try {
    fn(...args);
  } catch (err) {
    (globalThis.reportError ?? console.error)(err);
  }
}
