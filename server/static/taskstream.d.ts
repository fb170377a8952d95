// Types for taskstream.js (a plain ES module; no build step).

/** Terminal states: after one of these a task never changes again. */
export type TerminalState = "success" | "failed" | "cancelled";

/** The `progress` event, and the task fields the polling fallback maps onto it. */
export interface TaskProgress {
  task_id: string;
  state: string;
  /** 0 to 100. */
  progress: number;
  /** Seconds left, or null when unknown. */
  estimated_time: number | null;
  /** ISO 8601 timestamp of the change. */
  updated_at: string | null;
  /** Increases by one with each committed change; also the SSE event id. */
  version: number;
  /** The task's own metadata (a JSON object of at most 2048 bytes); absent when it has none. */
  metadata?: Record<string, unknown>;
}

/** The `complete` event: the task reached a terminal state. */
export interface TaskComplete {
  task_id: string;
  state: TerminalState;
  /** Present when state is "failed". */
  error?: string | null;
}

export interface TaskTimeout {
  message: string;
}

/**
 * - connecting: opening the first connection
 * - live: a stream is open (EventSource or fetch)
 * - reconnecting: the connection dropped; the client is getting it back (it does not give up)
 * - polling: streaming is unavailable; long polling the REST API instead
 * - closed: the watch has ended (complete, fatal error, or a timeout with reconnectOnTimeout off)
 */
export type ConnectionStatus = "connecting" | "live" | "reconnecting" | "polling" | "closed";

export type Transport = "eventsource" | "fetch" | "poll";

/**
 * Why the status changed:
 * - token_expired: the server ended the stream at the token's expiry (refreshAhead was off or
 *   too late); the client reconnects with a fresh token and resumes
 * - offline / online: the browser's network went away / came back
 * - heartbeat: the fetch stream was silent for idleTimeout ms (a stalled connection)
 * - network: the connection failed or dropped
 * - server_closed: the server ended the stream without a final event (restart, proxy)
 * - complete: every watched task reached a terminal state
 * - error: a fatal TaskStreamError ended the watch
 * - timeout: the server's stream timeout, with reconnectOnTimeout off
 * - closed: close() was called
 */
export type StatusReason =
  | "token_expired"
  | "offline"
  | "online"
  | "heartbeat"
  | "network"
  | "server_closed"
  | "complete"
  | "error"
  | "timeout"
  | "closed";

/**
 * Why a watch (or, in watchTasks, one task of it) ended without `complete`:
 * - not_found: the task does not exist or belongs to another user
 * - auth: the token was refused (and a fresh one from getToken was refused too), getToken threw,
 *   or a fixed token expired mid-stream
 * - bad_request: the server rejected the request itself (for example an invalid task id)
 * - unavailable: no allowed transport exists in this environment
 * - server: an `error` event this client does not know
 */
export declare class TaskStreamError extends Error {
  constructor(
    kind: TaskStreamError["kind"],
    message: string,
    init?: { status?: number | null; taskId?: string | null },
  );
  readonly name: "TaskStreamError";
  readonly kind: "not_found" | "auth" | "bad_request" | "unavailable" | "server";
  /** The HTTP status when one was seen (the EventSource transport cannot see them). */
  readonly status: number | null;
  /** Set for per-task errors of watchTasks. */
  readonly taskId: string | null;
}

export interface WatchOptionsBase {
  /** A bearer token (JWT). Give this or getToken. */
  token?: string;
  /** Called before each new connection, and once more after a 401, so tokens can be refreshed. */
  getToken?: () => string | Promise<string>;
  /** Server origin, e.g. "https://api.example.com". Default: the page's origin. */
  baseUrl?: string;
  /** Transports to try, in this order. Default: ["eventsource", "fetch", "poll"]. */
  transports?: Transport[];
  /** Called with each new version of a task, in version order, never twice for one version
   * (intermediate versions of a fast writer may be skipped; the latest always arrives). */
  onProgress?: (progress: TaskProgress) => void;
  /** Called when the server's stream timeout is reached; the stream then resumes by itself. */
  onTimeout?: (data: TaskTimeout) => void;
  onStatus?: (
    status: ConnectionStatus,
    detail: { transport: Transport | null; reason: StatusReason | null },
  ) => void;
  /**
   * Called once, when the first snapshot of every watched task is in hand on a stream that
   * delivers each later change (the server subscribes before it reads the snapshot).
   */
  onReady?: () => void;
  /**
   * Milliseconds before the token's expiry to open a new stream with a fresh token from
   * getToken (make before break: the old stream is closed once the new one is open). At most a
   * half of the token's remaining life early. 0 turns it off: the server then ends the stream
   * at expiry and the client reconnects. Default 10000. Needs getToken.
   */
  refreshAhead?: number;
  /** When a token expires, in ms since the epoch; default: the JWT's `exp` claim. */
  tokenExpiresAt?: (token: string) => number | null;
  /**
   * EventSource URLs carry a single-use ticket (POST /api/v1/sse/tickets, paid for with the
   * token in an Authorization header) instead of the token itself. Default false.
   */
  tickets?: boolean;
  /** Default true: after `timeout`, reconnect and resume. False: end the watch there. */
  reconnectOnTimeout?: boolean;
  /** Send cookies cross-origin (EventSource withCredentials, fetch credentials: "include"). */
  withCredentials?: boolean;
  /** Long-poll wait in seconds (the server allows at most 60). Default 25. */
  pollWait?: number;
  /** Milliseconds between polling rounds for several tasks. Default 2000. */
  pollInterval?: number;
  /** A first stream that delivers no event within this many ms counts as failed. Default 10000. */
  firstEventTimeout?: number;
  /**
   * A fetch stream silent (no heartbeat either) this many ms is dead (a stalled connection, a
   * machine that slept) and is reconnected. Keep it above the server's TASKSTREAM_HEARTBEAT
   * (default 15 s). Default 60000.
   */
  idleTimeout?: number;
  /** An EventSource implementation to use instead of the browser's; null disables it. */
  EventSource?: (new (url: string, init?: { withCredentials?: boolean }) => EventSource) | null;
  /** A fetch implementation to use instead of the global one. */
  fetch?: typeof fetch;
}

export interface WatchTaskOptions extends WatchOptionsBase {
  /** The task reached a terminal state. The watch is closed after this call. */
  onComplete?: (result: TaskComplete) => void;
  /** The watch ended for good (not found, auth). Transient connection errors are not reported here. */
  onError?: (error: TaskStreamError) => void;
}

export interface WatchTasksOptions extends WatchOptionsBase {
  /** One task reached a terminal state. */
  onComplete?: (result: TaskComplete) => void;
  /** One task is not found (error.taskId is set), or the whole watch ended (error.taskId null). */
  onError?: (error: TaskStreamError) => void;
  /** Every task has ended; the connection is closed. */
  onAllDone?: (results: Record<string, TaskComplete | TaskStreamError>) => void;
}

export interface WatchHandle {
  /** Stop watching. Idempotent; no callback is called afterwards. */
  close(): void;
  readonly status: ConnectionStatus | null;
  readonly transport: Transport | null;
  /** Why status last changed. */
  readonly reason: StatusReason | null;
  /** True once onReady has been called. */
  readonly ready: boolean;
  /** The last SSE event id received (the task version, for the single-task stream). */
  readonly lastEventId: string | null;
}

/** Watch one task until it completes, is not found, or close() is called. */
export declare function watchTask(taskId: string, options: WatchTaskOptions): WatchHandle;

/** Watch several tasks over one connection; ids must not contain commas. */
export declare function watchTasks(taskIds: string[], options: WatchTasksOptions): WatchHandle;

export interface WatchGroupOptions extends Omit<WatchOptionsBase, "tickets" | "resumeFrom"> {
  /** One task of the group reached a terminal state. */
  onComplete?: (result: TaskComplete) => void;
  /** One task is not found (error.taskId is set), or the whole watch ended (error.taskId null). */
  onError?: (error: TaskStreamError) => void;
  /** The group is closed and every task in it has ended; the connection is closed. */
  onAllDone?: (results: Record<string, TaskComplete | TaskStreamError>) => void;
}

/**
 * Watch every task of a group over one connection, including tasks that join it later, until
 * the group is closed and all its tasks have ended. No long-poll fallback, and no tickets.
 */
export declare function watchGroup(groupId: string, options: WatchGroupOptions): WatchHandle;

export declare function isTerminal(state: string): state is TerminalState;

/** A JWT's `exp` in ms since the epoch, read without verifying; null for anything else. */
export declare function jwtExpiresAt(token: string): number | null;

export interface SSEEvent {
  type: string;
  data: string;
  id: string;
}

/** Incremental text/event-stream parser (used by the fetch transport). */
export declare class SSEParser {
  constructor(onEvent: (event: SSEEvent) => void, onRetry?: (ms: number) => void);
  readonly lastEventId: string;
  /** Feed decoded text, in chunks of any size. */
  push(text: string): void;
  /** The stream ended: an unfinished event is dropped. */
  end(): void;
}
