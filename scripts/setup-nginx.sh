#!/usr/bin/env bash
# Install nginx from Debian's packages for the two-instance integration test (tests/test_nginx.py).
# Idempotent: does nothing when an nginx binary is already there. The test runs nginx itself, in
# the foreground, with its own prefix and config; the Debian service is never started by us.
set -euo pipefail
if command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "setup-nginx: nginx is missing and installing it needs root (apt-get install nginx)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
# policy-rc.d 101 keeps the package from starting its own nginx on port 80 during install.
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
apt-get install -y -qq --no-install-recommends nginx >/dev/null
