// Compiled (never run) by tests/test_browser.py::test_type_declarations_compile with tsc --noEmit:
// the shipped .d.ts files must describe the API the README documents. Each @ts-expect-error line
// proves that a misuse is rejected.
import {
  isTerminal,
  SSEParser,
  TaskStreamError,
  watchTask,
  watchTasks,
  watchGroup,
  type ConnectionStatus,
  type StatusReason,
  type TaskComplete,
  type TaskProgress,
  type WatchHandle,
} from "../../server/static/taskstream.js";
import {
  useGroupProgress,
  useTaskProgress,
  type GroupProgressState,
  type TaskProgressState,
} from "../../server/static/react.js";
import { canShareConnection, shareConnection, type TabHub } from "../../server/static/shared.js";

const handle: WatchHandle = watchTask("task_abc123", {
  getToken: async () => "token",
  baseUrl: "http://localhost:8000",
  onProgress: (p: TaskProgress) => console.log(p.state, p.progress.toFixed(1), p.estimated_time),
  onComplete: (c: TaskComplete) => console.log(c.state === "failed" ? c.error : c.state),
  onError: (e: TaskStreamError) => console.log(e.kind, e.status, e.message),
  onTimeout: (t) => console.log(t.message),
  onStatus: (s: ConnectionStatus, d) => console.log(s, d.transport, d.reason),
  onReady: () => console.log("snapshot in hand, changes flowing"),
  refreshAhead: 5000,
  tickets: true,
});
const why: StatusReason | null = handle.reason;
console.log(why, handle.ready);
handle.close();
const status: ConnectionStatus | null = handle.status;

watchTasks(["a", "b"], {
  token: "token",
  transports: ["fetch", "poll"],
  onAllDone: (results) => {
    for (const [id, r] of Object.entries(results)) {
      console.log(id, r instanceof TaskStreamError ? r.kind : r.state);
    }
  },
});

// @ts-expect-error: the state is a string, the percentage a number
watchTask("t", { token: "x", onProgress: (p) => p.progress.toUpperCase() });
// @ts-expect-error: no such transport
watchTask("t", { token: "x", transports: ["websocket"] });
// @ts-expect-error: a task id is required
watchTask(undefined, { token: "x" });

if (isTerminal("success")) console.log("terminal");
const parser = new SSEParser((ev) => console.log(ev.type, ev.data, ev.id), (ms) => console.log(ms));
parser.push("data: x\n\n");
parser.end();

const state: TaskProgressState = useTaskProgress("task_abc123", () => "token", {
  baseUrl: "http://localhost:8000",
});
const percent: number | undefined = state.progress?.progress;
const done: boolean = state.isComplete;
console.log(status, percent, done, state.error, state.errorKind, state.status, state.result?.state);
const ready: boolean = state.ready;
const reason: StatusReason | null = state.reason;
void state.cancel().then((task) => console.log(ready, reason, task));
// @ts-expect-error: onReady belongs to the hook
useTaskProgress("t", "x", { onReady: () => undefined });

const hub: TabHub = shareConnection({ getToken: () => "token", name: "app" });
const sub = hub.watch("task_abc123", {
  onProgress: (p) => console.log(p.version),
  onStatus: (s, d) => console.log(s, d.reason, d.leader),
});
sub.close();
console.log(hub.isLeader, hub.shared, canShareConnection());
// @ts-expect-error: a hub needs a token or getToken... of the right type
shareConnection({ token: 42 });

// Groups: every task of a batch on one connection, with each task's metadata.
const group: WatchHandle = watchGroup("batch_1", {
  getToken: () => "token",
  onProgress: (p: TaskProgress) => console.log(p.task_id, p.metadata?.["file"]),
  onAllDone: (results) => console.log(Object.keys(results).length),
});
group.close();
// @ts-expect-error: tickets name task ids; they do not open group streams
watchGroup("batch_1", { token: "t", tickets: true });
function GroupView(): string {
  const g: GroupProgressState = useGroupProgress("batch_1", () => "token");
  return `${Object.keys(g.tasks).length} ${g.isComplete} ${g.status}`;
}
console.log(GroupView);
