// Drives one real SSE client library against a taskstream stream and reports what it sees as
// JSON lines on stdout, for the Python tests (tests/test_clients_node.py) to assert on.
//
//   node client.mjs URL TOKEN --lib eventsource|polyfill [--close-on-end] [--linger-ms N]
//                             [--max-ms N]
//
// Like an app that forgets close(), the client is NOT closed on `complete` unless --close-on-end
// is given; the process exits --linger-ms after the stream ended (or --max-ms after start), so
// the test can count the reconnects made meanwhile.
import { EventSource } from "eventsource";
import polyfill from "event-source-polyfill";

const [url, token, ...rest] = process.argv.slice(2);
const opt = (name, fallback) => {
  const i = rest.indexOf(name);
  return i === -1 ? fallback : rest[i + 1];
};
const lib = opt("--lib", "eventsource");
const closeOnEnd = rest.includes("--close-on-end");
const lingerMs = Number(opt("--linger-ms", "10000"));
const maxMs = Number(opt("--max-ms", "120000"));
const started = Date.now();

function report(record) {
  process.stdout.write(JSON.stringify({ t: Date.now() - started, ...record }) + "\n");
}

// The polyfill rethrows listener errors and logs transport errors asynchronously; in Node an
// uncaught throw would end the process, so report it instead.
process.on("uncaughtException", (err) => report({ type: "exception", message: String(err) }));
console.error = (...args) => report({ type: "console.error", message: args.map(String).join(" ") });

let source;
if (lib === "eventsource") {
  // eventsource 4.x takes a fetch wrapper to add headers.
  source = new EventSource(url, {
    fetch: (input, init) =>
      fetch(input, { ...init, headers: { ...init.headers, Authorization: `Bearer ${token}` } }),
  });
} else if (lib === "polyfill") {
  source = new polyfill.EventSourcePolyfill(url, {
    headers: { Authorization: `Bearer ${token}` },
  });
} else {
  report({ type: "usage", message: `unknown --lib ${lib}` });
  process.exit(2);
}

let exitTimer = setTimeout(finish, maxMs);
function finish() {
  report({ type: "done", readyState: source.readyState });
  source.close();
  process.exit(0);
}
function ended() {
  if (closeOnEnd) source.close();
  clearTimeout(exitTimer);
  exitTimer = setTimeout(finish, lingerMs);
}

source.onopen = () => report({ type: "open" });
for (const name of ["progress", "complete", "timeout"]) {
  source.addEventListener(name, (e) => {
    report({ type: "event", event: name, id: e.lastEventId, data: JSON.parse(e.data) });
    if (name === "complete") ended();
  });
}
// "error" is both the server's not-found event (it has data) and a connection error (no data).
source.addEventListener("error", (e) => {
  if (typeof e.data === "string") {
    report({ type: "event", event: "error", id: e.lastEventId, data: JSON.parse(e.data) });
    ended();
  } else {
    report({
      type: "error",
      status: e.status ?? e.code ?? null,
      message: e.message ?? (e.error ? String(e.error) : null),
      readyState: source.readyState,
    });
  }
});
