#!/usr/bin/env bash
# Build the npm package taskstream-client (clients/js) from the files the server serves: the ES
# modules in server/static are the source, with no build step, so "building" is copying them
# next to clients/js/package.json (the copies are not committed). `npm pack` runs this itself.
set -euo pipefail
cd "$(dirname "$0")/.."
for f in taskstream.js taskstream.d.ts react.js react.d.ts shared.js shared.d.ts; do
    cp "server/static/$f" "clients/js/$f"
done
echo "clients/js: taskstream-client $(node -p 'require("./clients/js/package.json").version')"
