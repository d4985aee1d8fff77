#!/usr/bin/env bash
# Test set-up: the headless browser the viewer and app tests drive (Debian's chromium and its
# chromedriver), installed from apt when missing, so Selenium never downloads a browser itself.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
