"""A real OpenSSH server on 127.0.0.1 for the ssh/flash/fleet tests, plus a tiny int8 model.

The server is Debian's /usr/sbin/sshd with a generated ed25519 host key, a generated user key and
key-only auth for a dedicated local user (`edgeqtest<pid>`, removed afterwards; password field
'*' so it is not "locked").
The "device" python is a venv on the system python 3.11 whose site-packages points (.pth) at this
test process's site-packages, so the remote runner has numpy + ai_edge_litert without the test user
needing access to the (root-only) pyenv install.

Import the fixtures in a test module: `from tests.sshd_fixture import sshd, tiny_int8_model  # noqa`.
"""

from __future__ import annotations

import atexit
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

SSHD = "/usr/sbin/sshd"
USER = "edgeqtest"
IN_CI = bool(os.environ.get("CI"))


@dataclass(frozen=True)
class SshServer:
    root: Path  # world-traversable scratch dir (the user's home and the device python live here)
    port: int
    pid: int
    user: str
    home: Path
    client_key: Path
    host_pubkey: str  # "ssh-ed25519 AAAA..."
    device_python: str

    def known_hosts(self, path: Path) -> Path:
        """Write a known_hosts file that trusts this server; return its path."""
        path.write_text(f"[127.0.0.1]:{self.port} {self.host_pubkey}\n")
        return path

    def target(self, known_hosts: Path, **kw):
        from edgeq.remote import SshTarget

        kw.setdefault("connect_timeout", 10.0)
        kw.setdefault("run_timeout", 120.0)
        return SshTarget(host="127.0.0.1", port=self.port, user=self.user,
                         identity=str(self.client_key), known_hosts=str(known_hosts), **kw)

    def session_pids(self) -> list[int]:
        """Per-connection sshd processes (children of the listener) and everything under them."""
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text()
                except OSError:
                    continue
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
        out, todo = [], list(children.get(self.pid, []))
        while todo:
            p = todo.pop()
            out.append(p)
            todo.extend(children.get(p, []))
        return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                if s.recv(4).startswith(b"SSH-"):
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"sshd did not start listening on port {port}")


def _skip_or_fail(reason: str):
    if IN_CI:
        pytest.fail(reason + " (required in CI: run .ci/setup_sshd.sh)")
    pytest.skip(reason)


def _device_python(root: Path) -> str:
    """A venv the test user can run, seeing this process's packages through a .pth file."""
    base = "/usr/bin/python3.%d" % sys.version_info.minor
    if not os.access(base, os.X_OK):
        _skip_or_fail(f"{base} is missing; the loopback device needs a system python of the same version")
    venv = root / "device-venv"
    subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next(venv.glob("lib/python3*/site-packages"))
    (site / "edgeq-test-host.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return str(venv / "bin" / "python")


def start_sshd(root: Path) -> tuple[SshServer, subprocess.Popen]:
    if not os.path.exists(SSHD) or shutil.which("ssh-keygen") is None:
        _skip_or_fail("OpenSSH server is not installed (apt-get install openssh-server)")
    if os.geteuid() != 0:
        _skip_or_fail("the sshd fixture needs root (it creates a local test user)")
    root.chmod(0o755)
    home = root / "home"
    home.mkdir()
    # one user per test session, so concurrent sessions (two pytest runs) never share a home
    user = f"{USER}{os.getpid()}"
    subprocess.run(["useradd", "-M", "-d", str(home), "-s", "/bin/sh", user], check=True)
    subprocess.run(["usermod", "-p", "*", user], check=True)  # key-only, but not "locked"
    pw = pwd.getpwnam(user)
    os.chown(home, pw.pw_uid, pw.pw_gid)

    keys = root / "keys"
    keys.mkdir(mode=0o700)
    for name in ("host", "client"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f",
                        str(keys / name)], check=True)
    # sshd reads authorized_keys as the user, so it lives outside the root-only keys dir
    auth = root / "auth"
    auth.mkdir(mode=0o755)
    (auth / "authorized_keys").write_text((keys / "client.pub").read_text())
    port = free_port()
    config = keys / "sshd_config"
    config.write_text(f"""\
Port {port}
ListenAddress 127.0.0.1
HostKey {keys / 'host'}
PidFile {keys / 'sshd.pid'}
AuthorizedKeysFile {auth / 'authorized_keys'}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PermitRootLogin no
AllowUsers {user}
Subsystem sftp internal-sftp
LogLevel VERBOSE
""")
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # privilege-separation directory
    log = open(root / "sshd.log", "w")
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=log)
    wait_port(port)
    server = SshServer(root=root, port=port, pid=proc.pid, user=user, home=home,
                       client_key=keys / "client",
                       host_pubkey=" ".join((keys / "host.pub").read_text().split()[:2]),
                       device_python=_device_python(root))
    return server, proc


_SHARED: dict = {}  # one server and one model per test process, however many modules import them


def _stop(root: Path, server: SshServer | None, proc: subprocess.Popen | None) -> None:
    if proc is not None:
        for pid in server.session_pids():
            _kill(pid)
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
    if server is not None:
        subprocess.run(["userdel", server.user], capture_output=True)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def sshd():
    """The shared loopback server. A fixture imported into several modules is instantiated once
    per module, so the server itself is a process-wide singleton stopped at interpreter exit."""
    if "sshd" not in _SHARED:
        root = Path(tempfile.mkdtemp(prefix="edgeq-sshd-"))
        server = proc = None
        try:
            server, proc = start_sshd(root)
        except BaseException:
            _stop(root, server, proc)
            raise
        atexit.register(_stop, root, server, proc)
        _SHARED["sshd"] = server
    return _SHARED["sshd"]


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def build_int8_model(path: Path, seed: int = 0) -> Path:
    """A tiny full-int8 conv+dense classifier (seeded), converted with the real TFLite converter."""
    import numpy as np
    import tensorflow as tf

    tf.keras.utils.set_random_seed(seed)
    model = tf.keras.Sequential([
        tf.keras.Input((8, 8, 3)),
        tf.keras.layers.Conv2D(8, 3, activation="relu"),
        tf.keras.layers.Flatten(),
        tf.keras.layers.Dense(10),
    ])
    rng = np.random.default_rng(seed)

    def representative():
        for _ in range(16):
            yield [rng.random((1, 8, 8, 3), dtype=np.float32)]

    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = representative
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = tf.int8
    conv.inference_output_type = tf.int8
    path.write_bytes(conv.convert())
    return path


@pytest.fixture(scope="session")
def tiny_int8_model(tmp_path_factory) -> Path:
    if "model" not in _SHARED:  # converting costs seconds: once per process (see sshd)
        _SHARED["model"] = build_int8_model(tmp_path_factory.mktemp("model") / "tiny_int8.tflite")
    return _SHARED["model"]


def host_outputs(model: Path, inputs: list):
    """Outputs of the host LiteRT interpreter for the given inputs (the reference)."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(model))
    it.allocate_tensors()
    for d, x in zip(it.get_input_details(), inputs):
        it.set_tensor(d["index"], x)
    it.invoke()
    return [it.get_tensor(d["index"]) for d in it.get_output_details()]


@dataclass(frozen=True)
class FakeRuntime:
    name: str = "ai-edge-litert"
    version: str = "2.3.0"


@dataclass(frozen=True)
class FakeBench:
    warmup: int = 1
    runs: int = 3


@dataclass(frozen=True)
class StubProfile:
    """Stand-in for edgeq.profiles.DeviceProfile with only the attributes the ssh runner reads."""

    id: str = "rpi4"
    kind: str = "linux"
    abi: str = "aarch64"
    threads: int = 1
    runtime: FakeRuntime = FakeRuntime()
    bench: FakeBench = FakeBench()
