"""A real OpenSSH server on 127.0.0.1 for the ssh/flash/fleet tests, plus a tiny int8 model.

The server is Debian's /usr/sbin/sshd with a generated ed25519 host key, a generated user key and
key-only auth for a dedicated local user (`edgeqtest<pid>`, removed afterwards; password field
'*' so it is not "locked").

The "device" python (`SshServer.device_python`) must work for that user wherever the checkout is:
a clone inside a folder other users cannot enter (mode 0700: /root, `mktemp -d`, Debian 12 homes)
holds a .venv the board user cannot read. So the fixture builds, once per test session, a venv on
the system python of the same version in its own world-readable scratch directory (under a
world-traversable temp dir) and puts the distributions the device runner needs (numpy and
ai-edge-litert, with their dist-info) into its site-packages: hard links to this process's
installed files where they are readable by others and on the same file system, else copies made
readable. No network, no pip, about a second.

`LinkProxy` puts a TCP forwarder between client and server that a test can stall or cut at an
exact byte count (a flaky or dropped link mid-upload); `small_tmpfs` mounts a size-limited file
system (a full disk). Import the fixtures in a test module:
`from tests.sshd_fixture import sshd, tiny_int8_model  # noqa`.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
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

    def known_hosts(self, path: Path, port: int | None = None) -> Path:
        """Write a known_hosts file that trusts this server (on `port`, e.g. a LinkProxy's); return its path."""
        path.write_text(f"[127.0.0.1]:{port or self.port} {self.host_pubkey}\n")
        return path

    def target(self, known_hosts: Path, **kw):
        from edgeq.remote import SshTarget

        kw.setdefault("connect_timeout", 10.0)
        kw.setdefault("run_timeout", 120.0)
        return SshTarget(host="127.0.0.1", port=kw.pop("port", self.port), user=self.user,
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


DEVICE_DISTS = ("numpy", "ai-edge-litert")  # all device_bench.py imports besides the standard library


def _device_python(root: Path) -> str:
    """A venv the board user can run from anywhere: its own site-packages holds DEVICE_DISTS (see
    the module docstring), nothing points back into this checkout."""
    import importlib.metadata

    base = "/usr/bin/python3.%d" % sys.version_info.minor
    if not os.access(base, os.X_OK):
        _skip_or_fail(f"{base} is missing; the loopback device needs a system python of the same version")
    venv = root / "device-venv"
    subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next(venv.glob("lib/python3*/site-packages"))
    for name in DEVICE_DISTS:
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            _skip_or_fail(f"{name} is not installed in the test environment (pip install -e '.[test]')")
        for rel in dist.files or ():
            src = Path(dist.locate_file(rel))
            if ".." in rel.parts or not src.is_file():  # console scripts live outside site-packages
                continue
            _share(src, site / rel)
    return str(venv / "bin" / "python")


def _share(src: Path, dst: Path) -> None:
    """dst readable by everyone: a hard link when src already is (and the file system allows), else a copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    mode = src.stat().st_mode
    if mode & 0o004:
        try:
            os.link(src, dst)
            return
        except OSError:  # another file system, or links refused: copy
            pass
    shutil.copyfile(src, dst)
    dst.chmod((mode | 0o444 | (0o111 if mode & 0o100 else 0)) & 0o777)


def _world_traversable(path: Path) -> bool:
    return all(p.stat().st_mode & 0o001 for p in (path, *path.parents))


def shared_tmp() -> str:
    """A temp dir other users can traverse (TMPDIR may point into a private folder)."""
    tmp = Path(tempfile.gettempdir())
    return str(tmp) if _world_traversable(tmp) else "/tmp"


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
    if server is not None:  # userdel refuses while a killed session of the user is still exiting
        for _ in range(50):
            if subprocess.run(["userdel", server.user], capture_output=True).returncode in (0, 6):
                break
            time.sleep(0.1)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def sshd():
    """The shared loopback server. A fixture imported into several modules is instantiated once
    per module, so the server itself is a process-wide singleton stopped at interpreter exit."""
    if "sshd" not in _SHARED:
        root = Path(tempfile.mkdtemp(prefix="edgeq-sshd-", dir=shared_tmp()))
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


class LinkProxy:
    """A TCP forwarder 127.0.0.1:port -> sshd, to break the link on purpose at an exact point:
    `stall_after(n)` freezes the next connection once the client has sent n bytes through it (both
    directions stop, like a link gone silent; `stalled` is set), `resume()` lets it go on, `cut()`
    drops every connection (a lost network), `refuse = True` turns new connections away."""

    def __init__(self, upstream_port: int):
        self.upstream = upstream_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.stalled = threading.Event()
        self.refuse = False
        self._go = threading.Event()
        self._go.set()
        self._stall_at: int | None = None
        self._frozen = False
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def stall_after(self, n: int) -> None:
        with self._lock:
            self._stall_at = n
        self.stalled.clear()
        self._go.clear()

    def freeze(self) -> None:
        """Freeze every connection open now, from its next chunk on (`resume()` lets them go on)."""
        self._go.clear()
        self._frozen = True

    def resume(self) -> None:
        self._frozen = False
        self._go.set()

    def cut(self) -> None:
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        self._go.set()

    def close(self) -> None:
        self.refuse = True
        self._listener.close()
        self.cut()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.refuse:
                client.close()
                continue
            server = socket.create_connection(("127.0.0.1", self.upstream))
            with self._lock:
                self._socks += [client, server]
                stall_at, self._stall_at = self._stall_at, None  # armed for one connection
            threading.Thread(target=self._pump, args=(client, server, stall_at), daemon=True).start()

    def _pump(self, client: socket.socket, server: socket.socket, stall_at: int | None) -> None:
        peer, sent = {client: server, server: client}, 0
        try:
            while True:
                if (stall_at is not None and sent >= stall_at) or self._frozen:
                    self.stalled.set()
                    self._go.wait()
                    stall_at = None
                ready, _, _ = select.select([client, server], [], [], 0.2)
                for sock in ready:
                    # upstream reads stop exactly at the stall point
                    room = 65536 if sock is server or stall_at is None else stall_at - sent
                    data = sock.recv(min(65536, room))
                    if not data:
                        raise EOFError
                    peer[sock].sendall(data)
                    if sock is client:
                        sent += len(data)
        except (OSError, ValueError, EOFError):
            for s in (client, server):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()


@contextlib.contextmanager
def small_tmpfs(path: Path, size: int, owner: str | None = None, options: str = ""):
    """Mount a tmpfs of `size` bytes on path (made if missing; owned by the user `owner`), a disk
    that fills up for real; unmounted afterwards. Needs root, like the sshd fixture."""
    if os.geteuid() != 0:
        _skip_or_fail("mounting a small file system needs root")
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size},mode=0755"
    if owner:
        pw = pwd.getpwnam(owner)
        opts = f"size={size},mode=0700,uid={pw.pw_uid},gid={pw.pw_gid}"
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts + (f",{options}" if options else ""), "edgeq-test", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        _skip_or_fail(f"cannot mount a tmpfs on {path}: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill_disk(path: Path, leave: int = 0) -> Path:
    """Write a file into path until its file system has only `leave` bytes (0: none) left."""
    filler = path / ".filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while shutil.disk_usage(path).free > leave and f.write(b"\0" * 4096):
                pass
        except OSError:  # ENOSPC: full
            pass
    return filler


def build_int8_model(path: Path, seed: int = 0, classes: int = 10) -> Path:
    """A tiny full-int8 conv+dense classifier (seeded), converted with the real TFLite converter.
    Its size grows with `classes` (288 int8 weights each): 8192 classes make a 2.3 MB model."""
    import numpy as np
    import tensorflow as tf

    tf.keras.utils.set_random_seed(seed)
    model = tf.keras.Sequential([
        tf.keras.Input((8, 8, 3)),
        tf.keras.layers.Conv2D(8, 3, activation="relu"),
        tf.keras.layers.Flatten(),
        tf.keras.layers.Dense(classes),
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
