#!/usr/bin/env bash
# Install redis-server from Debian's packages: the broker of the Celery integration test
# (tests/test_celery.py), which runs its own redis-server on a free loopback port.
set -euo pipefail
exec bash "$(dirname "$0")/apt-service.sh" redis-server redis-server
