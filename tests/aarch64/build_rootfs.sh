#!/bin/sh
# Build the arm64 Debian bookworm rootfs the aarch64 end-to-end test runs sshd + edgeq's device
# runner in (under qemu-user). Output: a tar that the test extracts into a fresh directory per run.
#
#   tests/aarch64/build_rootfs.sh OUT.tar WHEEL_DIR
#
# WHEEL_DIR holds the aarch64 wheels of ai-edge-litert and tflite-runtime (downloaded on the host
# with `pip download --platform`, see .ci/setup_aarch64.sh); they are installed into the system
# python inside the rootfs without network access. numpy comes from Debian (1.24), which both
# runtimes accept (ai-edge-litert's interpreter only needs numpy; tflite-runtime 2.14 is built
# against numpy 1.x and would break under numpy 2).
# Needs root, mmdebstrap, and qemu-aarch64 registered in binfmt_misc (`arch-test arm64` says ok).
set -eu
out=$1
wheels=$(cd "$2" && pwd)
ls "$wheels"/ai_edge_litert-*aarch64.whl "$wheels"/tflite_runtime-*aarch64.whl >/dev/null

arch-test arm64 >/dev/null || { echo "arm64 binaries cannot run here: register qemu-aarch64 in binfmt_misc (see .ci/setup_aarch64.sh)" >&2; exit 1; }

# QEMU_CPU: with qemu's default CPU model XNNPACK's int8 kernels give wrong results.
export QEMU_CPU=cortex-a72
tmp="$out.partial"
rm -f "$tmp"
mmdebstrap --arch=arm64 --variant=apt --format=tar \
  --include=python3,python3-numpy,python3-venv,python3-pip,openssh-server,ca-certificates \
  --customize-hook="mkdir -p \"\$1/tmp/wheels\" && cp $wheels/*aarch64.whl \"\$1/tmp/wheels/\"" \
  --customize-hook='chroot "$1" sh -c "python3 -m pip install --break-system-packages --no-index --no-deps --no-compile /tmp/wheels/*.whl"' \
  --customize-hook='rm -rf "$1/tmp/wheels" "$1/var/cache/apt/archives/"*.deb "$1/var/lib/apt/lists/"*' \
  --customize-hook='chroot "$1" python3 -c "import ai_edge_litert.interpreter, tflite_runtime.interpreter; print(\"runtimes ok\")"' \
  bookworm "$tmp"
mv "$tmp" "$out"
