// Types for shared.js: one stream connection for all tabs of an origin.
import type {
  ConnectionStatus,
  StatusReason,
  TaskComplete,
  TaskProgress,
  TaskStreamError,
  WatchOptionsBase,
} from "./taskstream.js";

export interface HubOptions
  extends Omit<WatchOptionsBase, "onProgress" | "onStatus" | "onReady" | "onTimeout"> {
  /** Tabs whose hubs have the same name share one connection. Default "default". */
  name?: string;
  /** False: never share; this tab streams on its own. Default true. */
  share?: boolean;
  /** Called with true when this tab becomes the one that holds the connection. */
  onLeader?: (isLeader: boolean) => void;
}

export interface HubListener {
  /** Each version once, in order, whichever tab holds the connection. */
  onProgress?: (progress: TaskProgress) => void;
  onComplete?: (result: TaskComplete) => void;
  /** The task is not found, or the shared watch ended for good (auth). */
  onError?: (
    error: Pick<TaskStreamError, "kind" | "message"> & { taskId: string | null },
  ) => void;
  onStatus?: (
    status: ConnectionStatus,
    detail: { reason: StatusReason | null; leader: boolean },
  ) => void;
}

export interface TabHub {
  /** Follow one task (no commas in the id). */
  watch(taskId: string, listener?: HubListener): { close(): void };
  /** Leave; if this tab held the connection, another tab takes over. */
  close(): void;
  readonly isLeader: boolean;
  /** False when Web Locks or BroadcastChannel are missing: this tab streams alone. */
  readonly shared: boolean;
  readonly status: ConnectionStatus;
}

export declare function shareConnection(options: HubOptions): TabHub;
export declare function canShareConnection(): boolean;
