#!/bin/sh
# Debian's chromium and the fonts it renders text with, for the `edgeq report` rendering test
# (tests/test_report.py): the chromium group of .ci/packages. Idempotent; needs root when something
# is missing (CI runs as root).
set -eu
"$(dirname "$0")/apt-install" chromium
echo "chromium ready: $(chromium --version 2>/dev/null)"
