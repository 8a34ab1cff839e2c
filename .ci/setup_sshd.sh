#!/bin/sh
# Prepare the loopback sshd used by tests/test_ssh.py, test_flash.py, test_fleet.py
# (fixture: tests/sshd_fixture.py). Needs root. Idempotent and quick when already set up.
#  - Debian's OpenSSH server (the fixture starts /usr/sbin/sshd itself on 127.0.0.1; no service)
#  - python3.11 + venv: the "device" python the test user runs (it sees the repo venv's packages)
set -eu
need=""
[ -x /usr/sbin/sshd ] || need="$need openssh-server"
command -v ssh-keygen >/dev/null || need="$need openssh-client"
[ -x /usr/bin/python3.11 ] || need="$need python3.11"
/usr/bin/python3.11 -c "import ensurepip" 2>/dev/null || need="$need python3.11-venv"
if [ -n "$need" ]; then
  apt-get install -y --no-install-recommends $need
fi
mkdir -p /run/sshd  # sshd's privilege-separation directory
echo "sshd ready: $(/usr/sbin/sshd -V 2>&1 | head -1)"
