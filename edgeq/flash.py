"""Deploy a model to a board over SSH: bundle, upload, verify, install, switch atomically, roll back.

Layout on the device (per deployment "slot", default "model"):

    ~/.local/share/edgeq/<slot>/
        staging/<uuid>/             upload area; removed on success and on failure
        releases/<version>/         model.tflite, model.edgeq.json, device_bench.py, bundle.json,
                                    SHA256SUMS, wheels/, venv/ (with --with-runtime)
        current  -> releases/<version>     switched with rename(2): never missing, never half-done
        previous -> releases/<older>       what `edgeq flash --rollback` restores

A flash only touches `current` after the upload is verified and the release is fully installed,
so an interrupted flash leaves the old version running. Releases beyond `keep` are pruned
(current and previous always stay).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from edgeq.errors import DeviceError, EdgeqError, ModelFormatError
from edgeq.files import sha256_file
from edgeq.remote import Progress, Remote, SshTarget
from edgeq.runners.ssh import BENCH_SCRIPT, FLASH_ROOT

BUNDLE_SCHEMA = "edgeq.bundle/1"
MODEL_NAME = "model.tflite"  # fixed name on the device: services and scripts find it without guessing
MANIFEST_NAME = "model.edgeq.json"
RUNTIME_MODULES = {"ai-edge-litert": "ai_edge_litert.interpreter", "tflite-runtime": "tflite_runtime.interpreter"}
# pip --platform does not expand manylinux tags downwards, so list the glibc levels a Pi may have.
_GLIBCS = ("manylinux2014", "manylinux_2_17", "manylinux_2_24", "manylinux_2_27", "manylinux_2_28",
           "manylinux_2_31", "manylinux_2_34", "manylinux_2_35")
ABI_ARCH = {"aarch64": "aarch64", "arm64": "aarch64", "arm64-v8a": "aarch64", "armv7l": "armv7l",
            "armv7": "armv7l", "armeabi-v7a": "armv7l", "x86_64": "x86_64"}


@dataclass(frozen=True)
class FlashOptions:
    slot: str = "model"  # deployment name on the device (one model per slot)
    with_runtime: bool = False  # bundle runtime wheels and install them into a venv on the device
    wheels_dir: str | None = None  # use these wheels instead of `pip download` (offline hosts)
    device_python: str = "python3"  # python on the device that creates the venv
    python_version: str = "311"  # the device's python, for `pip download --python-version`
    keep: int = 3  # releases kept besides current and previous
    systemd_exec: str | None = None  # install a systemd --user unit running this command
    verify_timeout: float = 120.0


@dataclass(frozen=True)
class FlashResult:
    action: str  # "flash" | "rollback"
    host: str
    slot: str
    version: str  # now current
    previous: str | None
    path: str  # remote release directory that `current` points to
    model_sha256: str | None
    runtime_python: str | None  # the venv python when a runtime was installed with the release
    releases: tuple[str, ...]
    unit: str | None = None
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["releases"], d["notes"] = list(self.releases), list(self.notes)
        return d


def _check_slot(slot: str) -> None:
    # the slot names a directory and a systemd unit: keep it to a safe, boring alphabet
    if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}", slot or ""):
        raise EdgeqError(f"invalid slot name {slot!r}; use up to 64 letters, digits, '-', '_' or '.'")


def download_wheels(profile, dest: Path, python_version: str = "311") -> list[Path]:
    """`pip download` the profile's runtime (+ numpy) for the device's platform into dest."""
    arch = ABI_ARCH.get(str(getattr(profile, "abi", "aarch64")).lower())
    if arch is None:
        raise EdgeqError(f"no wheel platform for ABI {profile.abi!r}; pass --wheels-dir with wheels for it")
    name, version = profile.runtime.name, profile.runtime.version
    if name not in RUNTIME_MODULES:
        raise EdgeqError(f"runtime {name!r} has no pip wheels; use ai-edge-litert or tflite-runtime")
    # tflite-runtime 2.14 is built against numpy 1.x and breaks under numpy 2
    numpy_req = "numpy<2" if name == "tflite-runtime" else "numpy"
    cmd = [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--no-deps",
           "--python-version", python_version, "-d", str(dest)]
    for tag in _GLIBCS:
        cmd += ["--platform", f"{tag}_{arch}"]
    cmd += [f"{name}=={version}" if version else name, numpy_req]
    dest.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise EdgeqError(f"could not download {name} wheels for {arch}/cp{python_version}: {tail}; "
                         f"download them elsewhere and pass --wheels-dir")
    return sorted(dest.glob("*.whl"))


def build_bundle(model_path, profile, options: FlashOptions, dest: Path) -> dict:
    """Write the bundle into dest (a local directory) and return its bundle.json content."""
    model = Path(model_path)
    if not model.is_file():
        raise ModelFormatError(f"model not found: {model}; pass the path of a .tflite file")
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model, dest / MODEL_NAME)
    sha = sha256_file(dest / MODEL_NAME)
    manifest = model.with_suffix(".edgeq.json")
    if manifest.is_file():
        shutil.copyfile(manifest, dest / MANIFEST_NAME)
    else:  # not converted by edgeq: record at least what identifies the model
        (dest / MANIFEST_NAME).write_text(json.dumps(
            {"model": model.name, "sha256": sha, "bytes": model.stat().st_size}, indent=2) + "\n")
    shutil.copyfile(BENCH_SCRIPT, dest / "device_bench.py")
    wheels: list[str] = []
    if options.with_runtime:
        wdir = dest / "wheels"
        if options.wheels_dir:
            src = sorted(Path(options.wheels_dir).glob("*.whl"))
            if not src:
                raise EdgeqError(f"no .whl files in {options.wheels_dir}; put the runtime wheels there")
            wdir.mkdir()
            for w in src:
                shutil.copyfile(w, wdir / w.name)
        else:
            download_wheels(profile, wdir, options.python_version)
        wheels = sorted(w.name for w in wdir.glob("*.whl"))
    from edgeq import __version__

    info = {"schema": BUNDLE_SCHEMA, "model": model.name, "model_sha256": sha,
            "profile": getattr(profile, "id", None), "runtime": profile.runtime.name,
            "runtime_version": profile.runtime.version, "wheels": wheels,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "edgeq": __version__}
    (dest / "bundle.json").write_text(json.dumps(info, indent=2) + "\n")
    files = sorted(p for p in dest.rglob("*") if p.is_file())
    # sha256sum -c format; names are our own fixed ones (no spaces/newlines)
    (dest / "SHA256SUMS").write_text("".join(f"{sha256_file(p)}  {p.relative_to(dest).as_posix()}\n"
                                             for p in files))
    return info


class _Slot:
    """Paths of one deployment slot on the device."""

    def __init__(self, remote: Remote, slot: str):
        self.base = remote.path(f"{FLASH_ROOT}/{slot}")
        self.releases = posixpath.join(self.base, "releases")
        self.current = posixpath.join(self.base, "current")
        self.previous = posixpath.join(self.base, "previous")

    def link_target(self, remote: Remote, link: str) -> str | None:
        try:
            return posixpath.basename(remote.sftp.readlink(link))
        except (FileNotFoundError, OSError):
            return None

    @contextlib.contextmanager
    def locked(self, remote: Remote, timeout: float = 60.0):
        """One flash/rollback per slot at a time: mkdir is atomic, so a lock directory serialises
        concurrent runs (two fleet entries naming one board, two operators)."""
        lock = posixpath.join(self.base, ".lock")
        remote.makedirs(self.base)
        deadline = time.monotonic() + timeout
        while True:
            try:
                remote.sftp.mkdir(lock, mode=0o700)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise DeviceError(f"another flash holds {lock} on the device; wait for it, or remove the "
                                      "directory if no flash is running") from None
                time.sleep(0.2)
        try:
            yield
        finally:
            try:
                remote.sftp.rmdir(lock)
            except OSError:
                pass

    def set_link(self, remote: Remote, link: str, version: str) -> None:
        """Point link at releases/<version> atomically (symlink beside it, then rename over it)."""
        tmp = posixpath.join(self.base, f".link-{uuid.uuid4().hex}")
        remote.sftp.symlink(f"releases/{version}", tmp)
        remote.sftp.posix_rename(tmp, link)


def _run_checked(remote: Remote, argv, timeout: float, what: str, progress: Progress) -> str:
    code, out, err = remote.run(argv, timeout, on_stderr=progress)
    if code != 0:
        tail = (err.strip().splitlines() or out.strip().splitlines() or ["no output"])[-1]
        raise DeviceError(f"{what} failed on {remote.target.label} (exit {code}): {tail}")
    return out


def flash(model_path, profile, target: SshTarget, options: FlashOptions | None = None,
          progress: Progress | None = None) -> FlashResult:
    """Deploy model_path to the device; `current` switches only when everything is in place."""
    options = options or FlashOptions()
    say = progress or (lambda msg: None)
    _check_slot(options.slot)
    if options.systemd_exec is not None and ("\n" in options.systemd_exec or not options.systemd_exec.strip()):
        raise EdgeqError("--systemd-exec must be a single non-empty command line")
    with tempfile.TemporaryDirectory(prefix="edgeq-bundle-") as tmp:
        bundle_dir = Path(tmp) / "bundle"
        say("building bundle")
        info = build_bundle(model_path, profile, options, bundle_dir)
        # UTC time to the microsecond first, so releases sort in flash order by name
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        version = f"{stamp}-{info['model_sha256'][:12]}"

        say(f"connecting to {target.label}")
        remote = Remote(target)
        slot = _Slot(remote, options.slot)
        staging = posixpath.join(slot.base, "staging", uuid.uuid4().hex)
        release = posixpath.join(slot.releases, version)
        switched = False
        try:
            remote.makedirs(staging)
            remote.makedirs(slot.releases)
            for p in sorted(bundle_dir.rglob("*")):
                rp = posixpath.join(staging, p.relative_to(bundle_dir).as_posix())
                if p.is_dir():
                    remote.sftp.mkdir(rp, mode=0o755)
                else:
                    say(f"uploading {p.relative_to(bundle_dir).as_posix()} ({p.stat().st_size} bytes)")
                    remote.sftp.put(str(p), rp)
            say("verifying checksums on the device")
            code, out, err = remote.run(
                f"cd {shlex.quote(staging)} && sha256sum -c --quiet SHA256SUMS", options.verify_timeout)
            if code != 0:
                bad = (out.strip() or err.strip() or "sha256sum failed").splitlines()[0]
                raise DeviceError(f"checksum verification failed on {target.label} ({bad}); the upload "
                                  f"was corrupted or interrupted. The current version is unchanged; rerun flash")
            if remote.exists(release):  # same model flashed twice within a second
                release += "-" + uuid.uuid4().hex[:6]
                version = posixpath.basename(release)
            remote.sftp.posix_rename(staging, release)
            runtime_python = None
            if options.with_runtime:
                runtime_python = _install_runtime(remote, release, info, options, say)
            with slot.locked(remote):
                old = slot.link_target(remote, slot.current)
                say(f"switching {options.slot} to {version}")
                if old and old != version:
                    slot.set_link(remote, slot.previous, old)
                slot.set_link(remote, slot.current, version)
                switched = True
                unit, notes = None, []
                if options.systemd_exec:
                    unit, notes = _install_unit(remote, slot, options, runtime_python is not None, say)
                releases = _prune(remote, slot, options.keep, say)
            return FlashResult("flash", target.label, options.slot, version, old, release,
                               info["model_sha256"], runtime_python, releases, unit, tuple(notes))
        finally:
            # An interrupted or failed flash removes what it uploaded; `current` is untouched.
            if not switched:
                say("cleaning up the unfinished upload")
                try:
                    doomed = [staging]
                    if slot.link_target(remote, slot.current) != posixpath.basename(release):
                        doomed.append(release)  # never delete what `current` already points at
                    remote.run(shlex.join(["rm", "-rf", *doomed]), 60)
                except Exception:  # noqa: BLE001 - never mask the original error
                    pass
            remote.close()


def _install_runtime(remote: Remote, release: str, info: dict, options: FlashOptions, say: Progress) -> str:
    """Create release/venv (seeing system packages such as Debian's numpy) and install the wheels."""
    venv = posixpath.join(release, "venv")
    say(f"creating a venv with {options.device_python}")
    _run_checked(remote, [options.device_python, "-m", "venv", "--system-site-packages", venv],
                 options.verify_timeout, "creating the runtime venv (is python3-venv installed?)", say)
    py = posixpath.join(venv, "bin", "python")
    wheels = [posixpath.join(release, "wheels", w) for w in info["wheels"]]
    say(f"installing {', '.join(info['wheels'])}")
    # --ignore-installed: the bundled versions win over whatever the system site-packages has
    _run_checked(remote, [py, "-m", "pip", "install", "--no-index", "--no-deps", "--ignore-installed",
                          "--disable-pip-version-check", "--no-compile", *wheels],
                 options.verify_timeout * 5, "installing the runtime wheels", say)
    module = RUNTIME_MODULES.get(info["runtime"])
    if module:
        _run_checked(remote, [py, "-c", f"import {module}"], options.verify_timeout,
                     f"importing {info['runtime']} from the new venv", say)
    return py


def _install_unit(remote: Remote, slot: _Slot, options: FlashOptions, has_venv: bool, say: Progress):
    """A systemd --user unit that runs the user's command with the current model's path in its env."""
    name = f"edgeq-{options.slot}.service"
    unit_dir = remote.path(".config/systemd/user")
    remote.makedirs(unit_dir)
    env = [f'Environment="EDGEQ_MODEL={slot.current}/{MODEL_NAME}"']
    if has_venv:
        env.append(f'Environment="EDGEQ_PYTHON={slot.current}/venv/bin/python"')
    text = "\n".join([
        "[Unit]", f"Description=edgeq model service ({options.slot})", "After=network.target", "",
        "[Service]", *env, f"ExecStart={options.systemd_exec}", "Restart=on-failure", "RestartSec=5", "",
        "[Install]", "WantedBy=default.target", ""])
    path = posixpath.join(unit_dir, name)
    tmp = path + ".tmp"
    with remote.sftp.open(tmp, "w") as f:
        f.write(text)
    remote.sftp.posix_rename(tmp, path)
    say(f"installed {path}")
    q = shlex.quote(name)
    code, _, err = remote.run(f"systemctl --user daemon-reload && systemctl --user enable {q} && "
                              f"systemctl --user restart {q}", 60)
    notes = []
    if code != 0:
        notes.append(f"unit written to {path} but systemctl --user failed ({err.strip()[:120] or code}); "
                     f"on the device run: systemctl --user enable --now {name} "
                     f"(and `loginctl enable-linger` to start it at boot)")
    return path, notes


def _prune(remote: Remote, slot: _Slot, keep: int, say: Progress) -> tuple[str, ...]:
    versions = sorted(remote.sftp.listdir(slot.releases))
    pinned = {slot.link_target(remote, slot.current), slot.link_target(remote, slot.previous)}
    spare = [v for v in versions if v not in pinned]
    drop = spare[:max(0, len(spare) - keep)]
    if drop:
        say(f"removing old releases {', '.join(drop)}")
        remote.run(shlex.join(["rm", "-rf", *(posixpath.join(slot.releases, v) for v in drop)]), 120)
    return tuple(v for v in versions if v not in drop)


def rollback(profile, target: SshTarget, options: FlashOptions | None = None,
             progress: Progress | None = None) -> FlashResult:
    """Make `previous` current again (and the rolled-back version previous, so it can be undone)."""
    options = options or FlashOptions()
    say = progress or (lambda msg: None)
    _check_slot(options.slot)
    with Remote(target) as remote:
        slot = _Slot(remote, options.slot)
        missing = EdgeqError(f"no previous version of {options.slot!r} on {target.label} to roll back to; "
                             f"flash a model first (rollback needs two flashes)")
        if not remote.exists(slot.base):
            raise missing
        with slot.locked(remote):
            cur = slot.link_target(remote, slot.current)
            prev = slot.link_target(remote, slot.previous)
            if not prev or not remote.exists(posixpath.join(slot.releases, prev)):
                raise missing
            say(f"rolling {options.slot} back from {cur} to {prev}")
            slot.set_link(remote, slot.current, prev)
            if cur:
                slot.set_link(remote, slot.previous, cur)
        release = posixpath.join(slot.releases, prev)
        notes = []
        unit = f"edgeq-{options.slot}.service"
        if remote.exists(remote.path(f".config/systemd/user/{unit}")):
            code, _, _ = remote.run(f"systemctl --user restart {shlex.quote(unit)}", 60)
            if code != 0:
                notes.append(f"could not restart {unit}; run: systemctl --user restart {unit}")
        info = remote.read_text(posixpath.join(release, "bundle.json"))
        sha = json.loads(info).get("model_sha256") if info else None
        py = posixpath.join(release, "venv", "bin", "python")
        return FlashResult("rollback", target.label, options.slot, prev, cur, release, sha,
                           py if remote.exists(py) else None,
                           tuple(sorted(remote.sftp.listdir(slot.releases))), None, tuple(notes))
