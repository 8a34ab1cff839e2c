#!/bin/sh
# Install Debian's adb (client + server) for the Android runner tests (tests/test_adb.py).
# Idempotent: does nothing when adb is already on PATH. Needs root (CI runs as root).
set -eu

if command -v adb >/dev/null 2>&1; then
    echo "adb present: $(adb version | head -n 1)"
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends adb
echo "installed: $(adb version | head -n 1)"
