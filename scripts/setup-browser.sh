#!/usr/bin/env bash
# Install the headless browser the browser tests drive: Debian's chromium (Playwright's own
# browser download is not used; the tests pass executable_path=/usr/bin/chromium).
# Idempotent: does nothing when chromium is already installed.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
    echo "chromium present: $(chromium --version 2>/dev/null || echo unknown version)"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    SUDO=sudo
else
    SUDO=
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# fonts-liberation gives screenshots readable Latin text; chromium pulls in the rest.
$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-liberation >/dev/null
echo "chromium installed: $(chromium --version)"
