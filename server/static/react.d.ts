// Types for react.js. It imports "react" itself, so your bundler or import map must resolve it.
import type {
  TaskComplete,
  TaskProgress,
  TaskStreamError,
  ConnectionStatus,
  WatchOptionsBase,
} from "./taskstream.js";

export interface TaskProgressState {
  /** The latest progress, or null before the first event. */
  progress: TaskProgress | null;
  /** True once the task reached a terminal state (see result.state for which). */
  isComplete: boolean;
  result: TaskComplete | null;
  /** Set only when the watch ended for good; transient connection errors show in status. */
  error: string | null;
  errorKind: TaskStreamError["kind"] | null;
  status: ConnectionStatus;
}

export type UseTaskProgressOptions = Omit<
  WatchOptionsBase,
  "token" | "getToken" | "onProgress" | "onStatus"
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
