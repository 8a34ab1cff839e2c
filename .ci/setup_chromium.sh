#!/bin/sh
# Install Debian's chromium for the `edgeq report` rendering test (tests/test_report.py).
# Idempotent: does nothing when chromium is already on PATH. Needs root (CI runs as root).
set -eu

if command -v chromium >/dev/null 2>&1; then
    echo "chromium present: $(chromium --version 2>/dev/null)"
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# fonts: without a TrueType font the screenshot has boxes instead of text
apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core fonts-liberation
echo "installed: $(chromium --version 2>/dev/null)"
