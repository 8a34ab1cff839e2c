#!/bin/sh
# Debian's adb (client + server) for the Android runner tests (tests/test_adb.py): the adb group of
# .ci/packages. Idempotent; needs root when something is missing (CI runs as root).
set -eu
"$(dirname "$0")/apt-install" adb
echo "adb ready: $(adb version | head -n 1)"
