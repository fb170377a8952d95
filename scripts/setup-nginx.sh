#!/usr/bin/env bash
# Install nginx from Debian's packages for the two-instance integration tests
# (tests/test_nginx.py, tests/test_bus_nginx.py), which run nginx in the foreground with their
# own prefix and config.
set -euo pipefail
exec bash "$(dirname "$0")/apt-service.sh" nginx nginx
