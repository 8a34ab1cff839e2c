"""edgeq.flash against a real OpenSSH server on loopback: bundle, verify, atomic switch, rollback,
interrupted and corrupted flashes. (Installing a runtime into a venv is covered on the emulated
arm64 device in tests/test_aarch64.py, where the real aarch64 wheels exist.)
"""

import hashlib
import json
import os
from pathlib import Path

import pytest

from edgeq.errors import DeviceError, EdgeqError
from edgeq.flash import FlashOptions, build_bundle, flash, rollback
from tests.sshd_fixture import StubProfile, build_int8_model, sshd  # noqa: F401

PROFILE = StubProfile()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("flash-models")
    return [build_int8_model(d / f"m{i}.tflite", seed=i) for i in range(3)]


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
