"""edgeq.flash against a real OpenSSH server on loopback: bundle, verify, atomic switch, rollback,
interrupted and corrupted flashes, shared runtimes across model updates, and real faults: the
flashing process killed mid-upload (Ctrl-C and kill -9), the link cut mid-upload (LinkProxy), the
board's disk full (a small tmpfs), stale and live per-slot locks. After each fault the board still
serves the previous model and the next flash works. (The real aarch64 runtime wheels are covered
on the emulated arm64 device in tests/test_aarch64.py; here the runtime wheels are tiny real
wheels whose .pth points at the loopback device's LiteRT, so pip, the venv and the version the
runner reports are the flash's own.)
"""

import base64
import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

import edgeq.slot_lock as slot_lock
from edgeq.cli import main
from edgeq.errors import DeviceError, EdgeqError
from edgeq.bundle import build_bundle
from edgeq.flash import FlashOptions, flash, rollback
from edgeq.remote import Remote
from tests.conftest import missing_part
from tests.sshd_fixture import (LinkProxy, StubProfile, build_int8_model, fill_disk, small_tmpfs,  # noqa: F401
                                sshd)

PROFILE = StubProfile()


REPO = Path(__file__).resolve().parents[1]
STALL_AT = 1 << 20  # client bytes after which LinkProxy stalls: inside the 2.3 MB model's upload


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("flash-models")
    return [build_int8_model(d / f"m{i}.tflite", seed=i) for i in range(3)]


@pytest.fixture(scope="module")
def big_model(tmp_path_factory):
    """A 2.3 MB int8 model: its upload is long enough to be cut, stalled or to fill a disk."""
    return build_int8_model(tmp_path_factory.mktemp("flash-big") / "big.tflite", seed=7, classes=8192)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Device:
    """What is on the loopback device for one slot (read directly from its file system)."""

    def __init__(self, server, slot):
        self.base = server.home / ".local/share/edgeq" / slot

    def link(self, name):
        p = self.base / name
        return os.readlink(p).split("/")[-1] if p.is_symlink() else None

    def current_model_sha(self):
        return sha(self.base / "current" / "model.tflite")

    def releases(self):
        return sorted(p.name for p in (self.base / "releases").iterdir())

    def staging(self):
        d = self.base / "staging"
        return sorted(d.iterdir()) if d.exists() else []

    def runtimes(self):
        d = self.base / "runtimes"
        return sorted(p.name for p in d.iterdir()) if d.exists() else []

    def lock(self):
        """The lock's owner record, {} for an ownerless lock, None when the slot is not locked."""
        lock = self.base / ".lock"
        if not lock.exists():
            return None
        return json.loads((lock / "owner").read_text()) if (lock / "owner").exists() else {}


def served(server, known_hosts, slot, python=None) -> dict:
    """What the board serves: device_bench.py of `current` run on the board (over ssh, as the board
    user) with `current`'s runtime venv, or `python`."""
    cur = f"{server.home}/.local/share/edgeq/{slot}/current"
    with Remote(server.target(known_hosts)) as r:
        code, out, err = r.run([python or f"{cur}/venv/bin/python", f"{cur}/device_bench.py",
                                f"{cur}/model.tflite", "--runs", "1", "--warmup", "0"], 120)
    assert code == 0, out + err
    return json.loads(out.strip().splitlines()[-1])


def assert_serves(server, known_hosts, slot, model, python=None) -> dict:
    dev = Device(server, slot)
    assert dev.current_model_sha() == sha(model)
    got = served(server, known_hosts, slot, python or server.device_python)
    assert got["model_sha256"] == sha(model) and got["runs"]["count"] == 1
    assert dev.staging() == [] and dev.lock() is None  # nothing half-done left behind
    return got


def runtime_wheel(dest: Path, version: str, device_site: Path) -> Path:
    """A real, tiny ai-edge-litert wheel: its .pth adds the loopback device's LiteRT, so the venv
    flash builds imports and runs the real interpreter and reports `version` as its own."""
    dist = f"ai_edge_litert-{version}.dist-info"
    files = {"edgeq_test_litert.pth": f"{device_site}\n",
             f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: ai-edge-litert\nVersion: {version}\n",
             f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: edgeq-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = [f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b'=').decode()},"
              f"{len(text.encode())}" for name, text in files.items()] + [f"{dist}/RECORD,,"]
    dest.mkdir(parents=True, exist_ok=True)
    wheel = dest / f"ai_edge_litert-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
        z.writestr(f"{dist}/RECORD", "\n".join(record) + "\n")
    return wheel


def pip_wheel() -> Path:
    """The system python's own pip wheel (ensurepip's), bundled so the board runs pip from it."""
    import glob

    found = sorted(glob.glob("/usr/share/python-wheels/pip-*.whl") +
                   glob.glob(f"/usr/lib/python3.{sys.version_info.minor}/ensurepip/_bundled/pip-*.whl"))
    if not found:
        missing_part("no pip wheel for the system python (apt-get install python3-pip-whl)")
    return Path(found[-1])


def cli_flash(server, known_hosts, port, slot, model, *more: str) -> subprocess.Popen:
    """`edgeq flash` as a user runs it, in its own process (so it can be killed like one)."""
    argv = [sys.executable, "-c", "from edgeq.cli import main; main()", "flash", str(model), "--device", "rpi4",
            "--host", f"{server.user}@127.0.0.1:{port}", "--identity", str(server.client_key),
            "--known-hosts", str(known_hosts), "--slot", slot, "--json", *more]
    return subprocess.Popen(argv, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture
def slot(request):
    """A fresh deployment slot per test (and per parameter)."""
    return "".join(c if c.isalnum() else "-" for c in request.node.name.replace("test_", ""))[:60]


def test_build_bundle_checksums(models, tmp_path):
    m = tmp_path / "net.tflite"
    m.write_bytes(models[0].read_bytes())
    (tmp_path / "net.edgeq.json").write_text('{"schema": "edgeq.manifest/1", "plan": "int8"}\n')
    (tmp_path / "wh").mkdir()
    (tmp_path / "wh" / "fake-1.0-py3-none-any.whl").write_bytes(b"wheel bytes")
    info = build_bundle(m, PROFILE, FlashOptions(with_runtime=True, wheels_dir=str(tmp_path / "wh")),
                        tmp_path / "b")
    assert info["model_sha256"] == sha(m) and info["wheels"] == ["fake-1.0-py3-none-any.whl"]
    assert info["runtime"] == "ai-edge-litert" and info["profile"] == "rpi4"
    # the manifest written by `edgeq convert` travels unchanged
    assert (tmp_path / "b/model.edgeq.json").read_text() == (tmp_path / "net.edgeq.json").read_text()
    sums = dict(reversed(line.split("  ")) for line in (tmp_path / "b/SHA256SUMS").read_text().splitlines())
    assert set(sums) == {"model.tflite", "model.edgeq.json", "device_bench.py", "bundle.json",
                         "wheels/fake-1.0-py3-none-any.whl"}
    assert all(sums[name] == sha(tmp_path / "b" / name) for name in sums)
    # the runtime is named by its wheels and the device python: same wheels, same shared runtime
    assert re.fullmatch(r"ai-edge-litert-2\.3\.0-[0-9a-f]{12}", info["runtime_id"])
    again = build_bundle(m, PROFILE, FlashOptions(with_runtime=True, wheels_dir=str(tmp_path / "wh")), tmp_path / "c")
    other = build_bundle(m, PROFILE, FlashOptions(with_runtime=True, wheels_dir=str(tmp_path / "wh"),
                                                  device_python="python3.12"), tmp_path / "d")
    assert again["runtime_id"] == info["runtime_id"] != other["runtime_id"]


def test_flash_then_rollback(sshd, models, tmp_path, slot):
    target = sshd.target(sshd.known_hosts(tmp_path / "kh"))
    opts = FlashOptions(slot=slot)
    dev = Device(sshd, slot)
    with pytest.raises(EdgeqError, match="no previous version"):
        rollback(PROFILE, target, opts)

    r1 = flash(models[0], PROFILE, target, opts)
    assert r1.previous is None and r1.model_sha256 == sha(models[0])
    assert dev.link("current") == r1.version and dev.current_model_sha() == sha(models[0])
    manifest = json.loads((dev.base / "current/model.edgeq.json").read_text())
    assert manifest == {"model": "m0.tflite", "sha256": sha(models[0]), "bytes": models[0].stat().st_size}

    r2 = flash(models[1], PROFILE, target, opts)
    assert r2.previous == r1.version and dev.link("previous") == r1.version
    assert dev.current_model_sha() == sha(models[1])
    assert r2.runtime_python is None and r2.releases == (r1.version, r2.version)

    back = rollback(PROFILE, target, opts)
    assert (back.action, back.version, back.previous) == ("rollback", r1.version, r2.version)
    assert dev.current_model_sha() == sha(models[0]) and back.model_sha256 == sha(models[0])
    again = rollback(PROFILE, target, opts)  # a rollback can itself be undone
    assert again.version == r2.version and dev.current_model_sha() == sha(models[1])
    assert dev.staging() == []


@pytest.mark.parametrize("stage", ["uploading model.tflite", "verifying checksums", "switching"])
def test_interrupted_flash_keeps_old_version(sshd, models, tmp_path, slot, stage):
    target = sshd.target(sshd.known_hosts(tmp_path / "kh"))
    opts = FlashOptions(slot=slot)
    dev = Device(sshd, slot)
    old = flash(models[0], PROFILE, target, opts)

    def ctrl_c(msg):
        if msg.startswith(stage):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        flash(models[1], PROFILE, target, opts, progress=ctrl_c)
    assert dev.link("current") == old.version and dev.current_model_sha() == sha(models[0])
    assert dev.releases() == [old.version] and dev.staging() == []


def test_corrupted_upload_is_refused(sshd, models, tmp_path, slot):
    """The staged model is altered on the device before verification: the switch must not happen."""
    target = sshd.target(sshd.known_hosts(tmp_path / "kh"))
    opts = FlashOptions(slot=slot)
    dev = Device(sshd, slot)
    old = flash(models[0], PROFILE, target, opts)

    def corrupt(msg):
        if msg.startswith("verifying"):
            (staged,) = dev.staging()
            with open(staged / "model.tflite", "r+b") as f:
                f.seek(100)
                f.write(b"\xff\x00\xff")

    with pytest.raises(DeviceError, match="checksum verification failed.*model.tflite: FAILED.*unchanged"):
        flash(models[1], PROFILE, target, opts, progress=corrupt)
    assert dev.link("current") == old.version and dev.current_model_sha() == sha(models[0])
    assert dev.releases() == [old.version] and dev.staging() == []


def test_prune_keeps_current_previous_and_keep(sshd, models, tmp_path, slot):
    target = sshd.target(sshd.known_hosts(tmp_path / "kh"))
    dev = Device(sshd, slot)
    results = [flash(models[i % 3], PROFILE, target, FlashOptions(slot=slot, keep=1)) for i in range(5)]
    versions = [r.version for r in results]
    assert len(set(versions)) == 5
    assert dev.releases() == sorted(versions[-3:])  # newest spare + previous + current
    assert dev.link("current") == versions[-1] and dev.link("previous") == versions[-2]


def test_systemd_unit_written(sshd, models, tmp_path, slot):
    target = sshd.target(sshd.known_hosts(tmp_path / "kh"))
    r = flash(models[0], PROFILE, target, FlashOptions(slot=slot, systemd_exec="/usr/bin/my-app --model ${EDGEQ_MODEL}"))
    unit = sshd.home / f".config/systemd/user/edgeq-{slot}.service"
    assert r.unit == str(unit)
    text = unit.read_text()
    assert "ExecStart=/usr/bin/my-app --model ${EDGEQ_MODEL}\n" in text
    assert f'Environment="EDGEQ_MODEL={sshd.home}/.local/share/edgeq/{slot}/current/model.tflite"' in text
    assert "WantedBy=default.target" in text
    # no user systemd in this sandbox: the result says how to enable it by hand
    assert r.notes and "systemctl --user enable --now" in r.notes[0]


@pytest.mark.parametrize("bad", ["../x", "a b", "x;rm -rf ~", "", ".hidden", "a'b"])
def test_bad_slot_rejected(sshd, models, tmp_path, bad):
    with pytest.raises(EdgeqError, match="invalid slot name"):
        flash(models[0], PROFILE, sshd.target(tmp_path / "kh"), FlashOptions(slot=bad))


def test_flash_hostile_model_name(sshd, models, tmp_path, slot):
    name = "m o\"d'el;touch PWNED;$(touch PWNED).tflite"
    model = tmp_path / name
    model.write_bytes(models[2].read_bytes())
    r = flash(model, PROFILE, sshd.target(sshd.known_hosts(tmp_path / "kh")), FlashOptions(slot=slot))
    dev = Device(sshd, slot)
    assert json.loads((dev.base / "current/model.edgeq.json").read_text())["model"] == name
    assert dev.current_model_sha() == sha(models[2]) == r.model_sha256
    assert not list(sshd.home.rglob("PWNED"))


# --------------------------------------------------------------------------- runtime across updates
def test_model_update_keeps_runtime_and_rollback_restores_pairs(sshd, models, tmp_path, slot):
    kh = sshd.known_hosts(tmp_path / "kh")
    target = sshd.target(kh)
    dev = Device(sshd, slot)
    site = next(Path(sshd.device_python).parents[1].glob("lib/python3*/site-packages"))
    wheels_a = runtime_wheel(tmp_path / "a", "2.3.0", site).parent
    wheels_b = runtime_wheel(tmp_path / "b", "2.3.0.post1", site).parent
    for d in (wheels_a, wheels_b):  # as download_wheels bundles it: pip runs from its wheel
        (d / pip_wheel().name).write_bytes(pip_wheel().read_bytes())
    system_python = f"/usr/bin/python3.{sys.version_info.minor}"

    def runtime_opts(wheels):
        return FlashOptions(slot=slot, with_runtime=True, wheels_dir=str(wheels), device_python=system_python)

    r1 = flash(models[0], PROFILE, target, runtime_opts(wheels_a))
    assert r1.runtime and dev.runtimes() == [r1.runtime]
    assert r1.runtime_python == f"{dev.base}/releases/{r1.version}/venv/bin/python"
    assert os.readlink(dev.base / f"releases/{r1.version}/venv") == f"../../runtimes/{r1.runtime}/venv"
    done = json.loads((dev.base / "runtimes" / r1.runtime / "runtime.json").read_text())
    assert done["wheels"] == ["ai_edge_litert-2.3.0-py3-none-any.whl", pip_wheel().name]
    assert done["python"] == system_python
    # pip ran from its wheel into a venv made --without-pip: the runtime holds the runtime alone
    site_a = next((dev.base / "runtimes" / r1.runtime / "venv/lib").glob("python3*/site-packages"))
    assert sorted(p.name for p in site_a.iterdir()) == ["ai_edge_litert-2.3.0.dist-info", "edgeq_test_litert.pth"]
    assert served(sshd, kh, slot)["runtime"] == {"name": "ai-edge-litert", "version": "2.3.0"}

    # the common model update: no --with-runtime. The new release keeps the installed runtime.
    r2 = flash(models[1], PROFILE, target, FlashOptions(slot=slot))
    assert r2.runtime == r1.runtime and r2.runtime_python == f"{dev.base}/releases/{r2.version}/venv/bin/python"
    assert any(f"kept the runtime of {r1.version}" in n for n in r2.notes)
    got = served(sshd, kh, slot)  # `current/venv/bin/python` is what the ssh runner uses
    assert got["model_sha256"] == sha(models[1]) and got["runtime"]["version"] == "2.3.0"

    r3 = flash(models[2], PROFILE, target, runtime_opts(wheels_b))
    assert r3.runtime != r1.runtime and dev.runtimes() == sorted([r1.runtime, r3.runtime])

    back = rollback(PROFILE, target, FlashOptions(slot=slot))  # model 1 with runtime A again
    assert (back.version, back.runtime) == (r2.version, r1.runtime)
    got = served(sshd, kh, slot)
    assert got["model_sha256"] == sha(models[1]) and got["runtime"]["version"] == "2.3.0"
    fwd = rollback(PROFILE, target, FlashOptions(slot=slot))
    assert (fwd.version, fwd.runtime) == (r3.version, r3.runtime)
    assert served(sshd, kh, slot)["runtime"]["version"] == "2.3.0.post1"

    # the same wheels again: the installed runtime is reused, not rebuilt
    t0 = time.monotonic()
    r4 = flash(models[0], PROFILE, target, runtime_opts(wheels_a))
    assert r4.runtime == r1.runtime and time.monotonic() - t0 < 10
    assert not (dev.base / f"releases/{r4.version}/wheels").exists()
    # pruning to current + previous drops the release of model 1 and no runtime still in use
    r5 = flash(models[1], PROFILE, target, FlashOptions(slot=slot, keep=0))
    assert r5.releases == (r4.version, r5.version) and dev.runtimes() == [r1.runtime]
    r6 = flash(models[2], PROFILE, target, FlashOptions(slot=slot, keep=0))
    assert r6.runtime == r1.runtime and dev.runtimes() == [r1.runtime]
    assert_serves(sshd, kh, slot, models[2], python=f"{dev.base}/current/venv/bin/python")


# --------------------------------------------------------------------------- faults
@contextlib.contextmanager
def stalled_cli_flash(sshd, tmp_path, slot, model, *more: str):
    """(proxy, process) of an `edgeq flash` through a LinkProxy that froze mid-upload; on leaving,
    the proxy is closed and a flash still running is killed (a failed test leaves none behind)."""
    proxy, proc = LinkProxy(sshd.port), None
    try:
        proxy.stall_after(STALL_AT)
        proc = cli_flash(sshd, sshd.known_hosts(tmp_path / "kh-proxy", proxy.port), proxy.port, slot, model, *more)
        assert proxy.stalled.wait(60), proc.communicate(timeout=60)
        yield proxy, proc
    finally:
        proxy.close()
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["ctrl-c", "sigterm", "kill-9"])
def test_flash_killed_mid_upload(sshd, models, big_model, tmp_path, slot, sig):
    """Ctrl-C and SIGTERM (`timeout`, a cancelled CI job) clean up behind themselves on the device;
    kill -9 cannot, and the next flash takes the dead flash's lock over."""
    kh = sshd.known_hosts(tmp_path / "kh")
    dev = Device(sshd, slot)
    old = flash(models[0], PROFILE, sshd.target(kh), FlashOptions(slot=slot))
    with stalled_cli_flash(sshd, tmp_path, slot, big_model) as (proxy, proc):
        (staged,) = dev.staging()
        assert (staged / "model.tflite").stat().st_size < big_model.stat().st_size  # really mid-upload
        assert dev.lock()["pid"] == proc.pid
        proc.send_signal(sig)
        if sig != signal.SIGKILL:
            time.sleep(0.5)
            proxy.resume()  # the link is fine: the interrupted flash cleans up behind itself
        else:
            proc.wait(30)
            proxy.cut()  # the laptop is gone, and its connection with it
        out, err = proc.communicate(timeout=60)
    assert dev.link("current") == old.version and dev.releases() == [old.version]
    if sig != signal.SIGKILL:
        said = "interrupted" if sig == signal.SIGINT else "terminated by SIGTERM"
        assert proc.returncode == 1 and err.strip() == f"Error: {said}" and out == ""
        assert_serves(sshd, kh, slot, models[0])
    else:
        assert proc.returncode == -signal.SIGKILL
        assert dev.lock()["pid"] == proc.pid and len(dev.staging()) == 1  # what the dead flash left
        assert served(sshd, kh, slot, sshd.device_python)["model_sha256"] == sha(models[0])
    new = flash(models[1], PROFILE, sshd.target(kh), FlashOptions(slot=slot))
    if sig == signal.SIGKILL:  # its owner is gone on this host: the lock is taken over, saying so
        assert len(new.notes) == 1 and f"its process {proc.pid} on this host has ended" in new.notes[0]
        assert "took over the lock" in new.notes[0]
    else:
        assert new.notes == ()
    assert new.previous == old.version
    assert_serves(sshd, kh, slot, models[1])


def test_flash_interrupted_on_a_frozen_link(sshd, models, big_model, tmp_path, slot):
    """Ctrl-C while the link is frozen mid-upload: the flash's own connection cannot carry the
    cleanup (the server is still waiting for the rest of a half-sent packet; here nothing gets
    through at all), so it cleans up over a new connection at once instead of waiting its 60 s
    timeout on the old one first (which outlasted this test's limit once in CI). With
    --connect-timeout 40 a command on the frozen connection waits 40 s for its channel to open."""
    kh = sshd.known_hosts(tmp_path / "kh")
    dev = Device(sshd, slot)
    old = flash(models[0], PROFILE, sshd.target(kh), FlashOptions(slot=slot))
    with stalled_cli_flash(sshd, tmp_path, slot, big_model, "--connect-timeout", "40") as (_, proc):
        time.sleep(2)  # the flash fills its socket's send buffer and waits there
        proc.send_signal(signal.SIGINT)  # the frozen connection stays frozen; new ones pass
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1 and err.strip() == "Error: interrupted" and out == ""
    assert dev.link("current") == old.version and dev.releases() == [old.version] and dev.staging() == []
    assert dev.lock() is None
    assert_serves(sshd, kh, slot, models[0])
    assert flash(models[1], PROFILE, sshd.target(kh), FlashOptions(slot=slot)).notes == ()


def test_a_heartbeat_on_a_frozen_link_gives_up(sshd, tmp_path, slot):
    """The lock's heartbeat (called between upload chunks) sent its utime on its own SFTP channel
    with no timeout: on a link gone silent it waited for the answer for good, inside the upload
    loop. Its watchdog closes the connection after BEAT_TIMEOUT_S, and the upload then fails as a
    lost link."""
    proxy = LinkProxy(sshd.port)
    target = sshd.target(sshd.known_hosts(tmp_path / "kh-proxy", proxy.port), port=proxy.port, connect_timeout=3.0)
    remote = Remote(target)
    try:
        remote.makedirs(remote.path(f".local/share/edgeq/model/{slot}"))
        lock = slot_lock.SlotLock(remote, remote.path(f".local/share/edgeq/model/{slot}/.lock"), wait=5)
        lock.acquire(slot)
        lock.beat(force=True)  # its channel is open: the channel open itself times out (--connect-timeout)
        proxy.freeze()
        done = threading.Event()
        t0 = time.monotonic()
        threading.Thread(target=lambda: (lock.beat(force=True), done.set()), daemon=True).start()
        assert done.wait(slot_lock.BEAT_TIMEOUT_S + 10)
        assert slot_lock.BEAT_TIMEOUT_S - 1 < time.monotonic() - t0
        assert remote.client.get_transport() is None  # the watchdog closed the connection
    finally:
        proxy.close()
        remote.close()
        Remote(sshd.target(sshd.known_hosts(tmp_path / "kh"))).cleanup(f"rm -rf ~/.local/share/edgeq/model/{slot}")


def test_link_lost_during_a_rollback(sshd, models, tmp_path, slot, monkeypatch):
    """The link drops right after the rollback switched `current` (a LinkProxy cut): one line that says
    the slot is already rolled back (a rerun would roll it forward), not a paramiko traceback."""
    import edgeq.flash as flash_module

    kh = sshd.known_hosts(tmp_path / "kh")
    dev = Device(sshd, slot)
    r1 = flash(models[0], PROFILE, sshd.target(kh), FlashOptions(slot=slot))
    r2 = flash(models[1], PROFILE, sshd.target(kh), FlashOptions(slot=slot))
    proxy = LinkProxy(sshd.port)
    real = flash_module._Slot.set_link

    def set_link(self, remote, link, version):
        real(self, remote, link, version)
        if link == self.previous:  # both links written: the network goes
            proxy.refuse = True
            proxy.cut()

    monkeypatch.setattr(flash_module._Slot, "set_link", set_link)
    target = sshd.target(sshd.known_hosts(tmp_path / "kh-proxy", proxy.port), port=proxy.port, connect_timeout=3.0)
    try:
        with pytest.raises(DeviceError, match=rf"^the connection to .* was lost during the rollback \(.*\); {slot} is "
                                              rf"already rolled back to {r1.version} \(a rerun would roll it forward") as e:
            rollback(PROFILE, target, FlashOptions(slot=slot))
    finally:
        proxy.close()
    assert "\n" not in str(e.value)
    assert dev.link("current") == r1.version and dev.link("previous") == r2.version


@pytest.mark.parametrize("board_back", [True, False], ids=["link-back", "board-unreachable"])
def test_link_cut_mid_upload(sshd, models, big_model, tmp_path, slot, board_back):
    kh = sshd.known_hosts(tmp_path / "kh")
    dev = Device(sshd, slot)
    old = flash(models[0], PROFILE, sshd.target(kh), FlashOptions(slot=slot))
    proxy = LinkProxy(sshd.port)

    def cut():
        if proxy.stalled.wait(60):
            proxy.refuse = not board_back  # unreachable: the cleanup cannot reconnect either
            proxy.cut()

    proxy.stall_after(STALL_AT)
    cutter = threading.Thread(target=cut)
    cutter.start()
    try:
        target = sshd.target(sshd.known_hosts(tmp_path / "kh-proxy", proxy.port), port=proxy.port,
                             connect_timeout=3.0)
        with pytest.raises(DeviceError, match=r"connection to .* was lost while uploading model\.tflite; "
                                              r"the current version is unchanged") as e:
            flash(big_model, PROFILE, target, FlashOptions(slot=slot))
        assert e.value.exit_code == 3 and "\n" not in str(e.value)
    finally:
        cutter.join()
        proxy.close()
    assert dev.link("current") == old.version and dev.releases() == [old.version]
    if board_back:  # the cleanup reconnected: upload removed, lock released
        assert_serves(sshd, kh, slot, models[0])
    else:
        assert len(dev.staging()) == 1 and dev.lock()["pid"] == os.getpid()
        assert served(sshd, kh, slot, sshd.device_python)["model_sha256"] == sha(models[0])
    new = flash(models[1], PROFILE, sshd.target(kh), FlashOptions(slot=slot))
    taken = [n for n in new.notes if "took over the lock" in n]
    assert len(taken) == (0 if board_back else 1)
    assert board_back or "an earlier flash of this process ended without releasing it" in taken[0]
    assert_serves(sshd, kh, slot, models[1])


def _flash_root(server) -> Path:
    """~/.local/share/edgeq on the board, owned by the board user (a mount point goes inside)."""
    import pwd

    pw = pwd.getpwnam(server.user)
    d = server.home
    for part in (".local", "share", "edgeq"):
        d = d / part
        d.mkdir(exist_ok=True)
        os.chown(d, pw.pw_uid, pw.pw_gid)
    return d


def test_board_disk_full(sshd, models, big_model, tmp_path, slot):
    kh = sshd.known_hosts(tmp_path / "kh")
    target = sshd.target(kh)
    dev = Device(sshd, slot)
    _flash_root(sshd)
    with small_tmpfs(dev.base, 8 << 20, owner=sshd.user):
        old = flash(models[0], PROFILE, target, FlashOptions(slot=slot))

        # 1 MB free, the flash needs 3.3 MB: refused before anything is uploaded (exit 3, one line)
        filler = fill_disk(dev.base, leave=1 << 20)
        r = CliRunner().invoke(main, ["flash", str(big_model), "--device", "rpi4", "--host",
                                      f"{sshd.user}@127.0.0.1:{sshd.port}", "--identity", str(sshd.client_key),
                                      "--known-hosts", str(kh), "--slot", slot])
        assert r.exit_code == 3 and r.output.count("\n") == 1 and "Traceback" not in r.output, r.output
        m = re.search(r"out of space before the upload: ([\d.]+) KB free on the file system of \S+, "
                      r"the flash needs about ([\d.]+) MB", r.output)
        assert m and 900 < float(m[1]) <= 1024, r.output
        assert 3.2 < float(m[2]) < 3.5  # the 2.3 MB model + runner + manifest + 1 MB spare
        assert "current version is unchanged" in r.output
        assert_serves(sshd, kh, slot, models[0])

        # room at the check, but the disk fills up during the upload (another writer on the board)
        filler.unlink()

        def fill(msg):
            if msg.startswith("uploading model.tflite"):
                fill_disk(dev.base)

        with pytest.raises(DeviceError, match=r"out of space \(uploading model\.tflite failed: .*\): "
                                              r"0 bytes free .* needs about 3\.\d MB") as e:
            flash(big_model, PROFILE, target, FlashOptions(slot=slot), progress=fill)
        assert e.value.exit_code == 3 and "\n" not in str(e.value)
        assert dev.link("current") == old.version and dev.releases() == [old.version]
        assert (dev.base / ".filler").exists() and dev.staging() == [] and dev.lock() is None
        (dev.base / ".filler").unlink()
        assert_serves(sshd, kh, slot, models[0])

        new = flash(big_model, PROFILE, target, FlashOptions(slot=slot))
        assert new.previous == old.version and new.notes == ()
        assert_serves(sshd, kh, slot, big_model)


@pytest.mark.parametrize("holder,age,taken", [
    ("other-host", 7200, True),  # a laptop that vanished two hours ago
    ("other-host", 5, False),  # someone else flashing right now
    ("dead-pid-here", 5, True),  # a flash of this host that was killed
    ("live-pid-here", 5, False),
    ("no-owner", 7200, True),  # died between mkdir and writing its owner
    ("no-owner", 5, False),
])
def test_stale_lock_taken_over_live_lock_blocks(sshd, models, tmp_path, slot, holder, age, taken):
    import pwd
    import socket

    kh = sshd.known_hosts(tmp_path / "kh")
    dev = Device(sshd, slot)
    old = flash(models[0], PROFILE, sshd.target(kh), FlashOptions(slot=slot))
    owner = {"host": "lost-laptop", "machine": "0123456789abcdef", "pid": 4242, "user": "alice",
             "started": "2026-01-01T00:00:00+00:00", "token": "feedface"}
    live = subprocess.Popen(["sleep", "60"])
    try:
        if holder.endswith("-here"):
            pid = live.pid
            if holder == "dead-pid-here":
                gone = subprocess.Popen(["true"])
                gone.wait()
                pid = gone.pid
            owner.update(host=socket.gethostname(), machine=slot_lock.this_machine(), pid=pid)
        lock = dev.base / ".lock"
        lock.mkdir()
        pw = pwd.getpwnam(sshd.user)
        os.chown(lock, pw.pw_uid, pw.pw_gid)
        then = time.time() - age
        if holder != "no-owner":
            (lock / "owner").write_text(json.dumps(owner) + "\n")
            os.utime(lock / "owner", (then, then))
        os.utime(lock, (then, then))
        opts = FlashOptions(slot=slot, lock_wait=1.0)
        if taken:
            new = flash(models[1], PROFILE, sshd.target(kh), opts)
            (note,) = new.notes
            assert note.startswith(f"took over the lock of slot {slot!r} held by ")
            why = {"other-host": "alice@lost-laptop pid 4242 (started 2026-01-01T00:00:00+00:00): no heartbeat for 7",
                   "dead-pid-here": f"pid {owner['pid']} (started 2026-01-01T00:00:00+00:00): its process "
                                    f"{owner['pid']} on this host has ended",
                   "no-owner": "an unknown flash (no owner recorded): no heartbeat for 7"}[holder]
            assert why in note, note
            assert_serves(sshd, kh, slot, models[1])
        else:
            with pytest.raises(DeviceError, match=r"is locked by a running flash of .*; wait for it to finish"):
                flash(models[1], PROFILE, sshd.target(kh), opts)
            assert dev.lock() == ({} if holder == "no-owner" else owner)  # a live lock is left alone
            assert dev.link("current") == old.version and dev.staging() == []
    finally:
        live.kill()
        live.wait()


def test_heartbeat_during_a_pipelined_upload(sshd, big_model, tmp_path, slot, monkeypatch):
    """The lock's heartbeat runs on its own SFTP channel, so beating inside the upload's callback
    (every chunk here) cannot disturb the pipelined writes of the upload itself."""
    import paramiko

    beats = []
    utime = paramiko.SFTPClient.utime
    monkeypatch.setattr(slot_lock, "HEARTBEAT_S", 0.0)
    monkeypatch.setattr(paramiko.SFTPClient, "utime", lambda self, path, times: (beats.append(path),
                                                                                 utime(self, path, times)))
    kh = sshd.known_hosts(tmp_path / "kh")
    r = flash(big_model, PROFILE, sshd.target(kh), FlashOptions(slot=slot))
    assert len(beats) > big_model.stat().st_size // 32768  # one per 32 KB chunk at least
    assert set(beats) == {f"{Device(sshd, slot).base}/.lock/owner"}
    assert r.model_sha256 == sha(big_model)
    assert_serves(sshd, kh, slot, big_model)


@pytest.mark.parametrize("args,msg", [
    (["--rollback", "m.tflite", "--device", "rpi4", "--host", "pi@x"], "--rollback restores the previous release"),
    (["--device", "rpi4", "--host", "pi@x"], "pass the MODEL to flash, or --rollback"),
    (["m.tflite", "--device", "rpi4"], "pass --device ID and --host"),
    (["m.tflite", "--device", "rpi4", "--host", "pi@x", "--wheels-dir", "w"], "add --with-runtime"),
    (["m.tflite", "--fleet", "f.toml", "--host", "pi@x"], "drop --device/--host"),
])
def test_flash_usage_mistakes_exit_2(args, msg):
    r = CliRunner().invoke(main, ["flash", *args])
    assert r.exit_code == 2 and msg in r.output, r.output


def test_a_ctrl_c_something_swallowed_still_stops_the_switch(sshd, models, tmp_path, slot, monkeypatch):
    """Once on a loaded host a flash interrupted mid-upload went on and switched `current` (the
    KeyboardInterrupt lost on its way up). The signal handler records it (interrupts.recording), and
    the flash checks before the switch: here the interrupt arrives during the upload and is swallowed
    at once (a stand-in for whatever swallowed it), and the flash still stops and cleans up."""
    from edgeq import interrupts

    kh = sshd.known_hosts(tmp_path / "kh")
    dev = Device(sshd, slot)
    old = flash(models[0], PROFILE, sshd.target(kh), FlashOptions(slot=slot))
    real = slot_lock.SlotLock.beat

    def beat_then_swallow(self, force=False):
        try:
            interrupts._on_signal(signal.SIGINT, None)  # what Ctrl-C runs: record, then raise
        except KeyboardInterrupt:
            pass  # ...and something on the way up swallows it
        return real(self, force)

    monkeypatch.setattr(slot_lock.SlotLock, "beat", beat_then_swallow)
    with interrupts.recording(), pytest.raises(KeyboardInterrupt):
        flash(models[1], PROFILE, sshd.target(kh), FlashOptions(slot=slot))
    assert dev.link("current") == old.version and dev.releases() == [old.version] and dev.staging() == []
    assert dev.lock() is None
