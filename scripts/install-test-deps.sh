#!/usr/bin/env bash
# Everything the whole test suite needs on a fresh Debian machine, idempotent:
# the Python test and bench extras (editable install), nginx, redis-server (the Celery test's
# broker), nats-server, Chromium and the Node SSE client libraries.
#
# Python packages come at the exact versions in constraints.txt, the set CI last proved, so a
# fresh install runs what CI ran and not whatever was released since. scripts/check-deps.sh
# points TASKSTREAM_CONSTRAINTS at another file (the lowest versions), or at nothing (the newest
# versions pyproject.toml allows).
set -euo pipefail
cd "$(dirname "$0")/.."
constraints=${TASKSTREAM_CONSTRAINTS-constraints.txt}
python3 -m pip install -q ${constraints:+-c "$constraints"} -e '.[test,bench]'
bash scripts/setup-nginx.sh
bash scripts/setup-redis.sh
bash scripts/setup-nats.sh
bash scripts/setup-node-clients.sh
bash scripts/setup-browser.sh
