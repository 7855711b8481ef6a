#!/usr/bin/env bash
# Installs what tests/test_serve_browser.py needs (idempotent): Debian's chromium (as /usr/bin/chromium)
# and playwright-core from npm (pinned in package.json / package-lock.json). playwright's own browser
# download (`npx playwright install`) is not used: the system chromium is driven instead.
# Needs root (or sudo) for apt-get, and Node.js >= 20 with npm.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

if [ ! -x /usr/bin/chromium ]; then
  sudo=""
  if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
  $sudo apt-get update
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y chromium
fi

if [ ! -d "$here/node_modules/playwright-core" ]; then
  cd "$here"
  if [ -f package-lock.json ]; then
    npm ci --no-audit --no-fund
  else
    npm install --no-audit --no-fund
  fi
fi

/usr/bin/chromium --version 2>/dev/null  # (its wrapper script prints a harmless shell warning)
node -e "console.log('playwright-core', require('$here/node_modules/playwright-core/package.json').version)"
