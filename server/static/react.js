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
//   const { progress, isComplete, result, error, status } = useTaskProgress(taskId, token);
//
// Unlike the design document's example, a connection error does not close the stream: `error` is
// set only when the watch has ended for good (task not found, authentication refused), and
// `status` shows "reconnecting" or "polling" meanwhile.
import { useEffect, useRef, useState } from "react";
import { watchTask } from "./taskstream.js";

const INITIAL = {
  progress: null,
  isComplete: false,
  result: null,
  error: null,
  errorKind: null,
  status: "connecting",
};

/**
 * Live progress of one task. `token` is a string or a function returning a (promise of a) token,
 * called before each new connection. `options` are passed to watchTask (baseUrl, transports, …).
 * Returns { progress, isComplete, result, error, errorKind, status }.
 */
export function useTaskProgress(taskId, token, options = {}) {
  const [state, setState] = useState(INITIAL);
  // Read the latest token and options at connect time without re-opening the stream whenever
  // the caller passes a new function or object literal on each render.
  const latest = useRef({ token, options });
  latest.current = { token, options };
  const baseUrl = options.baseUrl ?? "";
  const hasToken = Boolean(token);

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
      getToken: () => {
        const current = latest.current.token;
        return typeof current === "function" ? current() : current;
      },
      onProgress: (progress) => setState((s) => ({ ...s, progress })),
      onComplete: (result) => setState((s) => ({ ...s, isComplete: true, result })),
      onError: (error) => setState((s) => ({ ...s, error: error.message, errorKind: error.kind })),
      onTimeout: (data) => onTimeout?.(data),
      onStatus: (status) => setState((s) => ({ ...s, status })),
    });
    return () => handle.close();
  }, [taskId, hasToken, baseUrl]);

  return state;
}
