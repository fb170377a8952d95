#!/usr/bin/env bash
# Install nats-server from Debian's packages for the bus tests (tests/test_bus*.py) and the
# fleet-cost bench. The tests start their own servers on free loopback ports.
set -euo pipefail
exec bash "$(dirname "$0")/apt-service.sh" nats-server nats-server
