#!/bin/sh
# Prepare the aarch64 end-to-end test (tests/test_aarch64.py): register qemu-aarch64 with
# binfmt_misc, download the arm64 runtime wheels, and build the arm64 Debian rootfs tar once.
# The tar is cached under ~/.cache/edgeq-test/ keyed by a hash of the build script and the wheel
# list, so reruns take seconds. Needs root; installs the aarch64 group of .ci/packages if missing.
#
#   .ci/setup_aarch64.sh            # prints the path of the rootfs tar on its last line
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
python=${EDGEQ_PYTHON:-$here/.venv/bin/python}
cache=${EDGEQ_TEST_CACHE:-$HOME/.cache/edgeq-test}
mkdir -p "$cache/wheels-arm64"

"$here/.ci/apt-install" aarch64 >&2  # stdout's last line is the tar path

# binfmt: mount binfmt_misc if needed and register qemu-aarch64 with the F (fix-binary) flag so
# it also works inside the chroot. Debian's qemu-user-static ships the registration line.
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
  mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
fi
if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
  cat /usr/lib/binfmt.d/qemu-aarch64.conf > /proc/sys/fs/binfmt_misc/register
fi
arch-test arm64 >/dev/null || { echo "arm64 binaries still cannot run (binfmt_misc)" >&2; exit 1; }

# The device-side runtimes: the wheels the rootfs installs offline. pip --platform does not
# expand manylinux tags, so name the ones these wheels carry.
"$python" -m pip download -q --only-binary=:all: --no-deps --python-version 311 \
  --platform manylinux_2_27_aarch64 --platform manylinux_2_34_aarch64 \
  -d "$cache/wheels-arm64" ai-edge-litert==2.3.0 tflite-runtime==2.14.0

key=$( (cat "$here/tests/aarch64/build_rootfs.sh"; ls "$cache/wheels-arm64") | sha256sum | cut -c1-16)
tar="$cache/arm64-rootfs-$key.tar"
if [ ! -s "$tar" ]; then
  echo "building arm64 rootfs (a few minutes) -> $tar" >&2
  "$here/tests/aarch64/build_rootfs.sh" "$tar" "$cache/wheels-arm64" >&2
  find "$cache" -maxdepth 1 -name 'arm64-rootfs-*.tar' ! -name "$(basename "$tar")" -delete
fi
ln -sfn "$(basename "$tar")" "$cache/arm64-rootfs.tar"
echo "$tar"
