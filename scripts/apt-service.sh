#!/usr/bin/env bash
# apt-service.sh PACKAGE BINARY: install a Debian package that ships a service (nginx,
# redis-server, nats-server) for tests that run BINARY themselves, on their own loopback ports.
# Idempotent: does nothing when BINARY is on PATH or in /usr/sbin. The package's own service is
# never started: policy-rc.d answers 101 ("action forbidden") while apt installs it.
set -euo pipefail
package=$1
binary=$2
if command -v "$binary" >/dev/null 2>&1 || [ -x "/usr/sbin/$binary" ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "$(basename "$0"): $binary is missing and installing it needs root (apt-get install $package)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
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
apt-get install -y -qq --no-install-recommends "$package" >/dev/null
