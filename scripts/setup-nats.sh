#!/usr/bin/env bash
# Install nats-server from Debian's packages for the bus tests (tests/test_bus*.py) and the
# fleet-cost bench. Idempotent: does nothing when a nats-server binary is already there. The
# tests start their own servers on free loopback ports; the Debian service is never started by us.
set -euo pipefail
if command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "setup-nats: nats-server is missing and installing it needs root (apt-get install nats-server)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
# policy-rc.d 101 keeps the package from starting its own server on port 4222 during install.
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
apt-get install -y -qq --no-install-recommends nats-server >/dev/null
