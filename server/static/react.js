// react.js: the useTaskProgress hook of the design document, built on watchTask.
//
// No build step and no copy of React inside: the bare import below is resolved by whatever the
// application already uses to find "react":
//   - a bundler (Vite, webpack, esbuild, Next.js): nothing to do, import this file like any other;
//   - no bundler: an import map in the page, e.g.
//       <script type="importmap">{ "imports": {
//         "react": "/vendor/react.js",
//         "taskstream/react": "/static/react.js" } }</script>
//     where /vendor/react.js is your ES module build of React (or a one-line shim that re-exports
//     the UMD global: `export const { useEffect, useRef, useState } = window.React;`).
// Both ways, the hook runs on the application's own React instance, as hooks must.
//
//   const { progress, ready, status, reason, isComplete, result, error, cancel } =
//     useTaskProgress(taskId, getToken);
//
// Unlike the design document's example, a connection error does not close the stream: `error` is
// set only when the watch has ended for good (task not found, authentication refused), and
// `status` shows "reconnecting" or "polling" meanwhile, with `reason` saying why.
// A terminal state closes the stream: no request is made after it.
//
//   const { tasks, ready, status, isComplete, error } = useGroupProgress(groupId, getToken);
//
// follows every task of a group (tasks: task id -> latest progress, in the order they arrived);
// isComplete once the group is closed and every task in it has ended.
import { useEffect, useRef, useState } from "react";
import { TaskStreamError, watchGroup, watchTask } from "./taskstream.js";

const INITIAL = {
  progress: null,
  ready: false,
  isComplete: false,
  result: null,
  error: null,
  errorKind: null,
  status: "connecting",
  reason: null,
  transport: null,
};

/**
 * Live progress of one task. `token` is a string or a function returning a (promise of a) token,
 * called before each new connection. `options` are passed to watchTask (baseUrl, transports, …).
 * Returns { progress, ready, isComplete, result, error, errorKind, status, reason, transport,
 * cancel }. See react.d.ts.
 */
export function useTaskProgress(taskId, token, options = {}) {
  const [state, setState] = useState(INITIAL);
  // Read the latest token and options at connect time without re-opening the stream whenever
  // the caller passes a new function or object literal on each render.
  const latest = useRef({ token, options, taskId });
  latest.current = { token, options, taskId };
  const baseUrl = options.baseUrl ?? "";
  const hasToken = Boolean(token);
  // Stable functions that read the latest props (only useEffect, useRef and useState are used,
  // so a three-name shim of React's UMD build is enough).
  const stable = useRef(null);
  if (stable.current === null) {
    const currentToken = () => {
      const current = latest.current.token;
      return typeof current === "function" ? current() : current;
    };
    stable.current = { currentToken, cancel: () => cancelTask(latest.current, currentToken) };
  }
  const { currentToken, cancel } = stable.current;

  useEffect(() => {
    if (!taskId || !hasToken) {
      setState(INITIAL);
      return undefined;
    }
    setState(INITIAL);
    const { onTimeout, ...watchOptions } = latest.current.options;
    const handle = watchTask(taskId, {
      ...watchOptions,
      baseUrl,
      getToken: currentToken,
      onProgress: (progress) => setState((s) => ({ ...s, progress })),
      onReady: () => setState((s) => ({ ...s, ready: true })),
      onComplete: (result) => setState((s) => ({ ...s, isComplete: true, result })),
      onError: (error) => setState((s) => ({ ...s, error: error.message, errorKind: error.kind })),
      onTimeout: (data) => onTimeout?.(data),
      onStatus: (status, { transport, reason }) =>
        setState((s) => ({ ...s, status, reason: reason ?? null, transport })),
    });
    return () => handle.close();
  }, [taskId, hasToken, baseUrl, currentToken]);

  return { ...state, cancel };
}

async function cancelTask({ taskId, options }, currentToken) {
  if (!taskId) throw new TypeError("no task to cancel");
  const baseUrl = (options.baseUrl ?? "").replace(/\/+$/, "");
  const response = await fetch(`${baseUrl}/api/v1/tasks/${encodeURIComponent(taskId)}/cancel`, {
    method: "POST",
    headers: { Authorization: `Bearer ${await currentToken()}` },
    cache: "no-store",
  });
  const body = await response.json().catch(() => null);
  if (response.status === 200) return body;
  // 409: already finished. The stream delivers the final state either way.
  const message = typeof body?.error === "string" ? body.error : `HTTP ${response.status}`;
  const kind = response.status === 404 ? "not_found" : response.status === 401 ? "auth" : "server";
  throw new TaskStreamError(kind, message, { status: response.status, taskId });
}

const GROUP_INITIAL = {
  tasks: {},
  results: {},
  ready: false,
  isComplete: false,
  error: null,
  errorKind: null,
  status: "connecting",
  reason: null,
  transport: null,
};

/**
 * Live progress of every task of a group, including tasks that join it later. `token` as for
 * useTaskProgress; `options` are passed to watchGroup. Returns { tasks, results, ready,
 * isComplete, error, errorKind, status, reason, transport }: `tasks` maps each task id to its
 * latest progress, `results` each finished task to its `complete` (or per-task error message).
 */
export function useGroupProgress(groupId, token, options = {}) {
  const [state, setState] = useState(GROUP_INITIAL);
  const latest = useRef({ token, options });
  latest.current = { token, options };
  const baseUrl = options.baseUrl ?? "";
  const hasToken = Boolean(token);
  const stable = useRef(null);
  if (stable.current === null) {
    stable.current = () => {
      const current = latest.current.token;
      return typeof current === "function" ? current() : current;
    };
  }
  const currentToken = stable.current;

  useEffect(() => {
    setState(GROUP_INITIAL);
    if (!groupId || !hasToken) return undefined;
    const { onTimeout, ...watchOptions } = latest.current.options;
    const handle = watchGroup(groupId, {
      ...watchOptions,
      baseUrl,
      getToken: currentToken,
      onProgress: (progress) =>
        setState((s) => ({ ...s, tasks: { ...s.tasks, [progress.task_id]: progress } })),
      onReady: () => setState((s) => ({ ...s, ready: true })),
      onComplete: (result) =>
        setState((s) => ({ ...s, results: { ...s.results, [result.task_id]: result } })),
      onAllDone: () => setState((s) => ({ ...s, isComplete: true })),
      onError: (error) =>
        setState((s) =>
          error.taskId
            ? { ...s, results: { ...s.results, [error.taskId]: { error: error.message } } }
            : { ...s, error: error.message, errorKind: error.kind },
        ),
      onTimeout: (data) => onTimeout?.(data),
      onStatus: (status, { transport, reason }) =>
        setState((s) => ({ ...s, status, reason: reason ?? null, transport })),
    });
    return () => handle.close();
  }, [groupId, hasToken, baseUrl, currentToken]);

  return state;
}
