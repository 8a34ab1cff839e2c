"""End to end on an emulated arm64 device: a Debian bookworm arm64 rootfs (tests/aarch64/) with the
real aarch64 wheels of ai-edge-litert and tflite-runtime, its own OpenSSH server running under
qemu-user (QEMU_CPU=cortex-a72) on a loopback port, and edgeq profiling / flashing a real int8 model
there over SSH. Outputs must match the host interpreter's; emulated timings are never asserted.

Needs root, binfmt_misc and the cached rootfs built by .ci/setup_aarch64.sh (this module runs it if
the cache is missing). Quick local runs skip it: pytest -m "not aarch64".
"""

import json
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

from edgeq.flash import FlashOptions, flash
from edgeq.remote import SshTarget
from edgeq.runners import ProfileRequest, profile_model, run_reach
from edgeq.runners.ssh import SshSettings
from tests.sshd_fixture import IN_CI, StubProfile, free_port, host_outputs, tiny_int8_model, wait_port  # noqa: F401

pytestmark = [pytest.mark.aarch64, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("EDGEQ_TEST_CACHE", Path.home() / ".cache" / "edgeq-test"))
# Reported: with qemu's default ("max") CPU model XNNPACK's int8 kernels can give wrong results
# (features such as SVE/i8mm are emulated imperfectly); a Pi 4's Cortex-A72 is also what we emulate.
QEMU_CPU = "cortex-a72"
USER = "pi"


def _unavailable(reason):
    if IN_CI:
        pytest.fail(reason)
    pytest.skip(reason)


def _rootfs_tar() -> Path:
    tar = CACHE / "arm64-rootfs.tar"
    if not tar.exists():
        if os.geteuid() != 0 or not shutil.which("mmdebstrap"):
            _unavailable("no cached arm64 rootfs and cannot build one here (needs root + mmdebstrap): "
                         "run .ci/setup_aarch64.sh")
        r = subprocess.run([str(REPO / ".ci" / "setup_aarch64.sh")], capture_output=True, text=True)
        if r.returncode != 0:
            _unavailable(f".ci/setup_aarch64.sh failed: {r.stderr.strip()[-500:]}")
    if not Path("/proc/sys/fs/binfmt_misc/qemu-aarch64").exists():
        _unavailable("qemu-aarch64 is not registered in binfmt_misc: run .ci/setup_aarch64.sh")
    return tar.resolve()


class Arm64Device:
    def __init__(self, root: Path, port: int, client_key: Path, known_hosts: Path):
        self.root, self.port, self.client_key, self.known_hosts = root, port, client_key, known_hosts
        self.home = root / "home" / USER

    def target(self, **kw) -> SshTarget:
        # qemu makes everything slow: generous connect/run timeouts
        return SshTarget(host="127.0.0.1", port=self.port, user=USER, identity=str(self.client_key),
                         known_hosts=str(self.known_hosts), connect_timeout=60, run_timeout=600, **kw)


@pytest.fixture(scope="module")
def arm64_device():
    tar = _rootfs_tar()
    work = Path(tempfile.mkdtemp(prefix="edgeq-arm64-"))
    root = work / "rootfs"
    root.mkdir()
    env = {**os.environ, "QEMU_CPU": QEMU_CPU}
    proc = None
    try:
        subprocess.run(["tar", "-xf", str(tar), "-C", str(root), "--numeric-owner"], check=True)
        # /proc is needed (sshd, cpuinfo); /sys is deliberately not mounted (see module docstring)
        subprocess.run(["mount", "-t", "proc", "proc", str(root / "proc")], check=True)
        subprocess.run(["chroot", str(root), "sh", "-c",
                        f"useradd -m -s /bin/sh {USER} && usermod -p '*' {USER}"], check=True, env=env)
        cfg = root / "etc/ssh/edgeq_test"
        cfg.mkdir(parents=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(cfg / "host")], check=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(work / "client")], check=True)
        shutil.copyfile(work / "client.pub", cfg / "authorized_keys")
        (cfg / "authorized_keys").chmod(0o644)
        port = free_port()
        (cfg / "sshd_config").write_text(f"""\
Port {port}
ListenAddress 127.0.0.1
HostKey /etc/ssh/edgeq_test/host
PidFile /run/sshd-edgeq-test.pid
AuthorizedKeysFile /etc/ssh/edgeq_test/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
Subsystem sftp internal-sftp
# sessions are new aarch64 processes: qemu reads the CPU model from their environment
SetEnv QEMU_CPU={QEMU_CPU}
""")
        (root / "run/sshd").mkdir(parents=True, exist_ok=True)
        kh = work / "known_hosts"
        kh.write_text(f"[127.0.0.1]:{port} {' '.join((cfg / 'host.pub').read_text().split()[:2])}\n")
        log = open(work / "sshd.log", "w")
        proc = subprocess.Popen(["chroot", str(root), "/usr/sbin/sshd", "-D", "-e", "-f",
                                 "/etc/ssh/edgeq_test/sshd_config"], env=env, stdout=log, stderr=log)
        wait_port(port, timeout=60)
        yield Arm64Device(root, port, work / "client", kh)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(3)  # sshd under qemu-user may not act on SIGTERM promptly
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        subprocess.run(["umount", "-l", str(root / "proc")], capture_output=True)
        if not os.path.ismount(root / "proc"):  # never rm -rf through a mounted /proc
            shutil.rmtree(work, ignore_errors=True)


@pytest.mark.parametrize("device,runtime,version", [("rpi5", "ai-edge-litert", "2.3.0"),
                                                     ("rpi4", "tflite-runtime", "2.14.0")])
def test_profile_int8_on_arm64_matches_host(arm64_device, tiny_int8_model, tmp_path, device, runtime, version):
    from edgeq.profiles import load_profile

    profile = load_profile(device)  # the runtime comes from the real device profile
    x = np.random.default_rng(7).integers(-128, 128, size=(1, 8, 8, 3)).astype(np.int8)
    np.savez(tmp_path / "in.npz", arr_0=x)
    res = profile_model(tiny_int8_model, profile,  # the profile's reach (ssh) picks the runner
                        ProfileRequest(runs=3, warmup=1, inputs=tmp_path / "in.npz", save_outputs=tmp_path / "out.npz",
                                       ssh=SshSettings(arm64_device.target(), emulated=True)))
    res = json.loads(json.dumps(res))  # the result is plain JSON
    assert res["schema"] == "edgeq.bench/1" and res["emulated"] is True
    assert res["device"]["machine"] == "aarch64"
    assert res["runtime"] == {"name": runtime, "version": version}
    assert res["runs"]["count"] == 3 and res["input_source"] == "file" and res["threads"] == profile.threads
    got = np.load(tmp_path / "out.npz")["arr_0"]
    want = host_outputs(tiny_int8_model, [x])[0]
    assert got.dtype == want.dtype == np.int8 and got.shape == want.shape
    # Tolerance: one int8 step. ARM (NEON) and x86 (AVX) int8 kernels requantize with different
    # fixed-point instruction sequences, which may round a value exactly halfway the other way;
    # anything larger than 1 step is a real numerical bug. (Observed here: 0, exactly equal.)
    assert np.abs(got.astype(np.int32) - want.astype(np.int32)).max() <= 1


def test_flash_with_runtime_then_profile_uses_flashed_venv(arm64_device, tiny_int8_model, tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for w in (CACHE / "wheels-arm64").glob("ai_edge_litert-*aarch64.whl"):
        shutil.copyfile(w, wheels / w.name)
    assert list(wheels.iterdir()), "run .ci/setup_aarch64.sh to download the aarch64 wheels"
    r = flash(tiny_int8_model, StubProfile(), arm64_device.target(),
              FlashOptions(with_runtime=True, wheels_dir=str(wheels)))
    assert r.runtime_python == f"/home/{USER}/.local/share/edgeq/model/releases/{r.version}/venv/bin/python"
    site = next((arm64_device.root / r.path.lstrip("/") / "venv/lib").glob("python3*/site-packages"))
    assert (site / "ai_edge_litert" / "interpreter.py").exists()  # installed into the release venv

    x = np.random.default_rng(8).integers(-128, 128, size=(1, 8, 8, 3)).astype(np.int8)
    np.savez(tmp_path / "in.npz", arr_0=x)
    res = run_reach(tiny_int8_model, StubProfile(),  # a stand-in profile: the reach is given
                    ProfileRequest(runs=2, warmup=0, inputs=tmp_path / "in.npz", save_outputs=tmp_path / "out.npz",
                                   ssh=SshSettings(arm64_device.target(), emulated=True)), "ssh")
    assert res["remote_python"] == f"/home/{USER}/.local/share/edgeq/model/current/venv/bin/python"
    assert res["runtime"]["name"] == "ai-edge-litert"
    got = np.load(tmp_path / "out.npz")["arr_0"].astype(np.int32)
    assert np.abs(got - host_outputs(tiny_int8_model, [x])[0].astype(np.int32)).max() <= 1
    assert not list((arm64_device.home / ".cache/edgeq/runs").iterdir())
