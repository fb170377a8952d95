// Types for react.js. It imports "react" itself, so your bundler or import map must resolve it.
import type {
  TaskComplete,
  TaskProgress,
  TaskStreamError,
  ConnectionStatus,
  StatusReason,
  Transport,
  WatchOptionsBase,
} from "./taskstream.js";

export interface TaskProgressState {
  /** The latest progress, or null before the first event. */
  progress: TaskProgress | null;
  /**
   * True once the task's snapshot is in hand on a connection that delivers every later change:
   * nothing can fall between the snapshot and the live changes. Stays true across reconnects.
   */
  ready: boolean;
  /** True once the task reached a terminal state (see result.state for which). */
  isComplete: boolean;
  result: TaskComplete | null;
  /** Set only when the watch ended for good; transient connection errors show in status. */
  error: string | null;
  errorKind: TaskStreamError["kind"] | null;
  status: ConnectionStatus;
  /** Why status last changed (e.g. "token_expired", "offline", "heartbeat", "complete"). */
  reason: StatusReason | null;
  transport: Transport | null;
  /**
   * POST /api/v1/tasks/{id}/cancel with the current token. Resolves with the cancelled task;
   * rejects with a TaskStreamError (status 409 when it had already finished). The stream then
   * delivers the `cancelled` state and closes.
   */
  cancel: () => Promise<Record<string, unknown>>;
}

export type UseTaskProgressOptions = Omit<
  WatchOptionsBase,
  "token" | "getToken" | "onProgress" | "onStatus" | "onReady"
>;

/**
 * Live progress of one task; re-subscribes when taskId or baseUrl changes, or when the token
 * goes from absent to present. A token function is called before each new connection.
 */
export declare function useTaskProgress(
  taskId: string | null | undefined,
  token: string | (() => string | Promise<string>) | null | undefined,
  options?: UseTaskProgressOptions,
): TaskProgressState;

export interface GroupProgressState {
  /** Each task of the group seen so far: its latest progress. */
  tasks: Record<string, TaskProgress>;
  /** Each finished task: its `complete`, or `{ error }` when it was not found. */
  results: Record<string, TaskComplete | { error: string }>;
  /** True once the first snapshot is in hand. */
  ready: boolean;
  /** True once the group is closed and every task in it has ended. */
  isComplete: boolean;
  /** Set only when the watch ended for good (group not found, authentication refused). */
  error: string | null;
  errorKind: TaskStreamError["kind"] | null;
  status: ConnectionStatus;
  reason: StatusReason | null;
  transport: Transport | null;
}

/**
 * Live progress of every task of a group, including tasks that join it later; re-subscribes
 * when groupId or baseUrl changes, or when the token goes from absent to present.
 */
export declare function useGroupProgress(
  groupId: string | null | undefined,
  token: string | (() => string | Promise<string>) | null | undefined,
  options?: UseTaskProgressOptions,
): GroupProgressState;
