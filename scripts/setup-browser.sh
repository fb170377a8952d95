#!/usr/bin/env bash
# Install what the browser tests (tests/test_browser.py) need beyond the Python test extra:
#   - Debian's chromium, driven by Playwright through executable_path=/usr/bin/chromium
#     (Playwright's own browser download is never used);
#   - tests/browser/node_modules from its lockfile: React's UMD build for the hook test and
#     TypeScript for the .d.ts check.
# Safe to run again: chromium is installed only when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if command -v chromium >/dev/null 2>&1; then
    echo "chromium present"
else
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    # fonts-liberation: readable Latin text in screenshots; chromium pulls in the rest.
    $SUDO apt-get install -y -qq --no-install-recommends chromium fonts-liberation >/dev/null
    echo "chromium installed"
fi
# (Debian's /usr/bin/chromium wrapper prints a harmless "[: unexpected operator" on some hosts.)
chromium --version 2>/dev/null | grep -i chromium

# npm ci takes a second or two for these few packages; always run it so the lockfile rules.
(cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)
