#!/bin/sh
# Prepare the loopback sshd used by tests/test_ssh.py, test_flash.py, test_fleet.py
# (fixture: tests/sshd_fixture.py): the sshd group of .ci/packages, i.e.
#  - Debian's OpenSSH server (the fixture starts /usr/sbin/sshd itself on 127.0.0.1; no service)
#  - python3.11 + venv: the "device" python the test user runs
# Idempotent and quick when already set up; needs root.
set -eu
"$(dirname "$0")/apt-install" sshd
mkdir -p /run/sshd  # sshd's privilege-separation directory
echo "sshd ready: $(/usr/sbin/sshd -V 2>&1 | head -1)"
