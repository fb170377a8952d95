#!/usr/bin/env bash
# Install the Node SSE client libraries the tests drive (tests/node: `eventsource` 4.x and
# `event-source-polyfill`, and taskstream-client from clients/js), exactly as locked in
# tests/node/package-lock.json.
# Idempotent: `npm ci` is skipped when node_modules already matches the lockfile.
set -euo pipefail
cd "$(dirname "$0")/../tests/node"
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi
# taskstream's own package (clients/js, a file: dependency) gets its files from server/static.
bash ../../scripts/build-js-package.sh
# npm ci writes node_modules/.package-lock.json; equal to the lockfile's packages means up to date.
if [ -f node_modules/.package-lock.json ] && [ node_modules/.package-lock.json -nt package-lock.json ]; then
    echo "node clients present (tests/node/node_modules)"
    exit 0
fi
npm ci --no-audit --no-fund --loglevel=error
echo "node clients installed: $(node --version), $(ls node_modules | tr '\n' ' ')"
