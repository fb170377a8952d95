#!/usr/bin/env bash
# Install redis-server from Debian's packages: the broker of the Celery integration test
# (tests/test_celery.py). Idempotent: does nothing when a redis-server binary is already there.
# The test runs its own redis-server on a free loopback port; the Debian service is never
# started by us.
set -euo pipefail
if command -v redis-server >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "setup-redis: redis-server is missing and installing it needs root (apt-get install redis-server)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
# policy-rc.d 101 keeps the package from starting its own redis on port 6379 during install.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod +x "$policy"
    created_policy=1
fi
cleanup() { if [ "$created_policy" = 1 ]; then rm -f "$policy"; fi; }
trap cleanup EXIT
apt-get update -qq
apt-get install -y -qq --no-install-recommends redis-server >/dev/null
