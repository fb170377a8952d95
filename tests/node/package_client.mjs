// taskstream's own client, imported the way a user of the npm package does ("taskstream-client",
// installed from clients/js as a file: dependency), watching one task (or several) in Node.
//
//   node package_client.mjs BASE_URL TOKEN_FILE ID[,ID...] [REFRESH_AHEAD_MS]
//   node package_client.mjs BASE_URL TOKEN_FILE group:GROUP_ID [REFRESH_AHEAD_MS]
//
// The token is read from TOKEN_FILE at each getToken() (the test renews it there). Prints one
// JSON line per callback; exits when the watch closes.
import { readFileSync } from "node:fs";
import { jwtExpiresAt, watchGroup, watchTask, watchTasks } from "taskstream-client";
import pkg from "taskstream-client/package.json" with { type: "json" };

const [baseUrl, tokenFile, ids, refreshAhead = "10000"] = process.argv.slice(2);
const report = (record) => process.stdout.write(JSON.stringify(record) + "\n");
report({ type: "package", name: pkg.name, version: pkg.version });

const list = ids.split(",");
const options = {
  baseUrl,
  refreshAhead: Number(refreshAhead),
  getToken: () => {
    const token = readFileSync(tokenFile, "utf8").trim();
    report({ type: "token", expiresAt: jwtExpiresAt(token) });
    return token;
  },
  onProgress: (p) =>
    report({ type: "progress", task_id: p.task_id, version: p.version, metadata: p.metadata }),
  onComplete: (c) => report({ type: "complete", ...c }),
  onError: (e) => report({ type: "error", kind: e.kind, message: e.message }),
  onStatus: (status, { transport, reason }) => report({ type: "status", status, transport, reason }),
  onReady: () => report({ type: "ready" }),
  onAllDone: (results) => report({ type: "all_done", tasks: Object.keys(results).sort() }),
};
const handle = ids.startsWith("group:")
  ? watchGroup(ids.slice("group:".length), options)
  : list.length === 1
    ? watchTask(list[0], options)
    : watchTasks(list, options);
const timer = setInterval(() => {
  if (handle.status === "closed") {
    clearInterval(timer);
    report({ type: "exit" });
  }
}, 50);
