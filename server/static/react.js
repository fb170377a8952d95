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
import { useEffect, useRef, useState } from "react";
import { TaskStreamError, watchTask } from "./taskstream.js";

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
