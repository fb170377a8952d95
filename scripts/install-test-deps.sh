#!/usr/bin/env bash
# Everything the whole test suite needs on a fresh Debian machine, idempotent:
# the Python test extras (editable install), nginx, Chromium and the Node SSE client libraries.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -e '.[test]'
bash scripts/setup-nginx.sh
bash scripts/setup-node-clients.sh
bash scripts/setup-browser.sh
