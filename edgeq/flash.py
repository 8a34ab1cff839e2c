"""Deploy a model to a board over SSH: bundle, upload, verify, install, switch atomically, roll back.

Layout on the device (per deployment "slot", default "model"):

    ~/.local/share/edgeq/<slot>/
        .lock/owner                 the flash or rollback running now: host, pid, user, start; its
                                    mtime is the heartbeat (see edgeq/slot_lock.py)
        staging/<uuid>/             upload area; removed on success and on failure
        releases/<version>/         model.tflite, model.edgeq.json, device_bench.py, bundle.json,
                                    SHA256SUMS, and when the slot has a runtime:
                                    venv -> ../../runtimes/<runtime>/venv
        runtimes/<runtime>/         venv/, wheels/, runtime.json (written last: the install is complete)
        current  -> releases/<version>     switched with rename(2): never missing, never half-done
        previous -> releases/<older>       what `edgeq flash --rollback` restores

A runtime (`--with-runtime`) is installed once per distinct set of wheels (<runtime> = runtime name,
version and a hash of the wheels and the device python) and shared by the releases that link to it:
a model-only flash links the new release to the runtime `current` uses, so a model update keeps
the runtime, and since every release names its own runtime, a rollback restores a matching model +
runtime pair. Runtimes no kept release links to are pruned with the releases.

A flash only touches `current` after the upload is verified and the release is fully installed,
so an interrupted flash leaves the old version running. Releases beyond `keep` are pruned
(current and previous always stay).
"""

from __future__ import annotations

import datetime
import json
import posixpath
import re
import shlex
import tempfile
import time
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .bundle import FLASH_ROOT, MODEL_NAME, RUNTIME_MODULES, build_bundle
from .errors import DeviceError, EdgeqError, first_line
from .files import disk_full_error, human_bytes
from .interrupts import check as check_interrupted
from .remote import Progress, Remote, SshTarget
from .slot_lock import SlotLock

RUNTIME_DONE = "runtime.json"  # written last into runtimes/<id>/: the runtime is complete
_VENV_BYTES = 32 << 20  # a venv with pip and setuptools from ensurepip takes about 25 MB
_SPARE_BYTES = 1 << 20  # directories, symlinks, runtime.json, pip's temporary files


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
    lock_wait: float = 60.0  # how long to wait for another flash of the slot to finish
    lock_stale_after: float = 600.0  # a lock without heartbeat for this long was abandoned


@dataclass(frozen=True)
class FlashResult:
    action: str  # "flash" | "rollback"
    host: str
    slot: str
    version: str  # now current
    previous: str | None
    path: str  # remote release directory that `current` points to
    model_sha256: str | None
    runtime_python: str | None  # the release's venv python when the slot has a runtime
    releases: tuple[str, ...]
    unit: str | None = None
    notes: tuple[str, ...] = ()
    runtime: str | None = None  # runtimes/<id> the release links to

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["releases"], d["notes"] = list(self.releases), list(self.notes)
        return d


def _check_slot(slot: str) -> None:
    # the slot names a directory and a systemd unit: keep it to a safe, boring alphabet
    if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}", slot or ""):
        raise EdgeqError(f"invalid slot name {slot!r}; use up to 64 letters, digits, '-', '_' or '.'")


class _Slot:
    """Paths of one deployment slot on the device."""

    def __init__(self, remote: Remote, slot: str):
        self.base = remote.path(f"{FLASH_ROOT}/{slot}")
        self.releases = posixpath.join(self.base, "releases")
        self.runtimes = posixpath.join(self.base, "runtimes")
        self.staging = posixpath.join(self.base, "staging")
        self.current = posixpath.join(self.base, "current")
        self.previous = posixpath.join(self.base, "previous")

    def link_target(self, remote: Remote, link: str) -> str | None:
        try:
            return posixpath.basename(remote.sftp.readlink(link))
        except (FileNotFoundError, OSError):
            return None

    def set_link(self, remote: Remote, link: str, version: str) -> None:
        """Point link at releases/<version> atomically (symlink beside it, then rename over it)."""
        tmp = posixpath.join(self.base, f".link-{uuid.uuid4().hex}")
        remote.sftp.symlink(f"releases/{version}", tmp)
        remote.sftp.posix_rename(tmp, link)

    def runtime_link(self, remote: Remote, version: str) -> str | None:
        """What releases/<version>/venv points at (None: no runtime, or a venv directory in it)."""
        try:
            return remote.sftp.readlink(posixpath.join(self.releases, version, "venv"))
        except OSError:
            return None


def _runtime_id(link: str | None) -> str | None:
    """runtimes/<id> named by a release's venv link (../../runtimes/<id>/venv)."""
    parts = (link or "").split("/")
    return parts[3] if len(parts) == 5 and parts[:3] == ["..", "..", "runtimes"] else None


# --------------------------------------------------------------------------- disk space
def _free_bytes(remote: Remote, path: str) -> int | None:
    """Bytes available to the login user on the filesystem holding path (POSIX `df`), or None
    when df does not say; connection errors propagate."""
    code, out, _ = remote.run(["df", "-Pk", path], 30)
    m = re.search(r"\s(\d+)\s+(\d+)\s+(\d+)\s+\d+%\s", out)
    return int(m.group(3)) * 1024 if code == 0 and m else None


def _bytes_needed(bundle_dir: Path, install_runtime: bool) -> int:
    need = sum(p.stat().st_size for p in bundle_dir.rglob("*") if p.is_file()) + _SPARE_BYTES
    if install_runtime:  # the wheels unpacked into a new venv (pip runs from its wheel, else ensurepip)
        wheels = sorted((bundle_dir / "wheels").glob("*.whl"))
        for w in wheels:
            if not _is_pip(w.name):
                with zipfile.ZipFile(w) as z:
                    need += sum(i.file_size for i in z.infolist())
        need += 0 if any(_is_pip(w.name) for w in wheels) else _VENV_BYTES
    return need


def _is_pip(wheel_name: str) -> bool:
    return wheel_name.startswith("pip-")


def _out_of_space(label: str, base: str, free: int, need: int, when: str) -> DeviceError:
    return DeviceError(f"the board {label} is out of space {when}: {human_bytes(free)} free on the file "
                       f"system of {base}, the flash needs about {human_bytes(need)}; free space there "
                       f"(df -h; old releases go with a lower --keep) and rerun. The current version is unchanged")


# --------------------------------------------------------------------------- flash
def _run_checked(remote: Remote, argv, timeout: float, what: str, progress: Progress) -> str:
    code, out, err = remote.run(argv, timeout, on_stderr=progress)
    if code != 0:
        tail = (err.strip().splitlines() or out.strip().splitlines() or ["no output"])[-1]
        raise DeviceError(f"{what} failed on {remote.target.label} (exit {code}): {tail}")
    return out


def flash(model_path, profile, target: SshTarget, options: FlashOptions | None = None,
          progress: Progress | None = None) -> FlashResult:
    """Deploy model_path to the device; `current` switches only when everything is in place."""
    import paramiko

    options = options or FlashOptions()
    say = progress or (lambda msg: None)
    _check_slot(options.slot)
    if options.systemd_exec is not None and ("\n" in options.systemd_exec or not options.systemd_exec.strip()):
        raise EdgeqError("--systemd-exec must be a single non-empty command line")
    with tempfile.TemporaryDirectory(prefix="edgeq-bundle-") as tmp:
        bundle_dir = Path(tmp) / "bundle"
        say("building bundle")
        try:
            info = build_bundle(model_path, profile, options, bundle_dir)
        except OSError as e:
            raise disk_full_error(e, bundle_dir, Path(model_path).stat().st_size) or e
        # UTC time to the microsecond first, so releases sort in flash order by name
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        version = f"{stamp}-{info['model_sha256'][:12]}"

        say(f"connecting to {target.label}")
        remote = Remote(target)
        slot = _Slot(remote, options.slot)
        lock = SlotLock(remote, posixpath.join(slot.base, ".lock"), options.lock_wait,
                        options.lock_stale_after, say)
        staging = posixpath.join(slot.staging, uuid.uuid4().hex)
        release = posixpath.join(slot.releases, version)
        switched, step, need, sent = False, "preparing the upload", 0, [0]
        try:
            remote.makedirs(slot.base)
            notes = lock.acquire(options.slot)
            # holding the lock, nothing else uploads here: staging leftovers are from dead flashes
            remote.run(["rm", "-rf", slot.staging], 60)
            runtime_dir = posixpath.join(slot.runtimes, info["runtime_id"] or "-")
            new_runtime = bool(info["runtime_id"]) and not remote.exists(posixpath.join(runtime_dir, RUNTIME_DONE))
            need = _bytes_needed(bundle_dir, new_runtime)
            free = _free_bytes(remote, slot.base)
            if free is not None and free < need:
                raise _out_of_space(target.label, slot.base, free, need, "before the upload")
            remote.makedirs(staging)
            remote.makedirs(slot.releases)
            for p in sorted(bundle_dir.rglob("*")):
                rel = p.relative_to(bundle_dir).as_posix()
                rp = posixpath.join(staging, rel)
                if p.is_dir():
                    remote.sftp.mkdir(rp, mode=0o755)
                    continue
                step = f"uploading {rel}"
                say(f"{step} ({p.stat().st_size} bytes)")
                remote.upload(p, rp, lock.beat)
                sent[0] += p.stat().st_size
            step = "verifying checksums on the device"
            say(step)
            code, out, err = remote.run(
                f"cd {shlex.quote(staging)} && sha256sum -c --quiet SHA256SUMS", options.verify_timeout)
            if code != 0:
                bad = (out.strip() or err.strip() or "sha256sum failed").splitlines()[0]
                raise DeviceError(f"checksum verification failed on {target.label} ({bad}); the upload "
                                  f"was corrupted or interrupted. The current version is unchanged; rerun flash")
            if remote.exists(release):  # same model flashed twice within a microsecond
                release += "-" + uuid.uuid4().hex[:6]
                version = posixpath.basename(release)
            remote.sftp.posix_rename(staging, release)
            lock.beat(force=True)
            old = slot.link_target(remote, slot.current)
            step = "installing the runtime"
            runtime = _attach_runtime(remote, slot, release, old, info, options, lock, say, notes)
            runtime_python = posixpath.join(release, "venv", "bin", "python") if runtime is not None else None
            # A Ctrl-C that something swallowed on its way up (once, on a loaded host, a flash
            # interrupted mid-upload went on and switched) stops here, before the one step the
            # cleanup cannot undo (interrupts.check: recorded by the signal handler itself).
            check_interrupted()
            step = f"switching {options.slot} to {version}"
            say(step)
            if old and old != version:
                slot.set_link(remote, slot.previous, old)
            slot.set_link(remote, slot.current, version)
            switched = True
            unit = None
            if options.systemd_exec:
                step = "installing the systemd unit"
                unit, unit_notes = _install_unit(remote, slot, options, runtime is not None, say)
                notes += unit_notes
            step = "pruning old releases"
            releases = _prune(remote, slot, options.keep, say)
            return FlashResult("flash", target.label, options.slot, version, old, release,
                               info["model_sha256"], runtime_python, releases, unit, tuple(notes),
                               None if runtime in (None, "") else runtime)
        except (OSError, EOFError, paramiko.SSHException) as e:
            raise _link_error(remote, target, step, e, switched, slot.base, need - sent[0], need) from None
        finally:
            # An interrupted or failed flash removes what it uploaded; `current` is untouched.
            q = shlex.quote
            cmds = []
            if not switched:
                say("cleaning up the unfinished upload")
                cmds.append(f"rm -rf {q(staging)}; [ \"$(readlink {q(slot.current)})\" = "
                            f"{q('releases/' + version)} ] || rm -rf {q(release)}")
            cmds.append(lock.release_cmd())
            remote.cleanup("; ".join(cmds))
            lock.forget()
            remote.close()


def _link_error(remote: Remote, target: SshTarget, step: str, e: BaseException, switched: bool, base: str,
                remaining: int, need: int) -> DeviceError:
    """One line for an SFTP/SSH failure: the link dropped, the board's disk filled, or else what failed."""
    state = ("the new version is already current" if switched else "the current version is unchanged")
    lost = DeviceError(f"the connection to {target.label} was lost while {step}; {state}. "
                       f"Check the board and the network, then rerun flash")
    if not _alive(remote):
        return lost
    try:  # a live link answers df; a dropped one fails it (also before paramiko noticed the drop)
        free = _free_bytes(remote, base)
    except Exception:  # noqa: BLE001 - no answer at all: the link is gone
        return lost
    if isinstance(e, OSError) and free is not None and free < max(remaining, 1):
        return _out_of_space(target.label, base, free, need, f"({step} failed: {first_line(e)})")
    return DeviceError(f"{step} failed on {target.label}: {first_line(e)}; {state}")


def _alive(remote: Remote) -> bool:
    transport = remote.client.get_transport()
    return transport is not None and transport.is_active()


def _attach_runtime(remote: Remote, slot: _Slot, release: str, old: str | None, info: dict,
                    options: FlashOptions, lock: SlotLock, say: Progress, notes: list[str]) -> str | None:
    """Link release/venv to its runtime: the bundled one (installed unless already there), else the
    one the current release uses. Returns the runtime id ("" for a venv inside an older release)."""
    venv = posixpath.join(release, "venv")
    rid = info["runtime_id"]
    if rid:
        rdir = posixpath.join(slot.runtimes, rid)
        if remote.exists(posixpath.join(rdir, RUNTIME_DONE)):
            say(f"runtime {rid} is already installed; using it")
            remote.run(["rm", "-rf", posixpath.join(release, "wheels")], 60)
        else:
            _install_runtime(remote, rdir, release, info, options, lock, say)
        link = f"../../runtimes/{rid}/venv"
    else:  # a model update keeps the runtime that is installed
        link = slot.runtime_link(remote, old) if old else None
        if link is None and old and remote.exists(posixpath.join(slot.releases, old, "venv")):
            link = f"../{old}/venv"  # a release from before shared runtimes holds its own venv
        if link is None:
            return None
        rid = _runtime_id(link) or ""
        notes.append(f"kept the runtime of {old} ({rid or link})")
        say(notes[-1])
    remote.sftp.symlink(link, venv)
    return rid


def _install_runtime(remote: Remote, rdir: str, release: str, info: dict, options: FlashOptions,
                     lock: SlotLock, say: Progress) -> None:
    """runtimes/<id>/venv (seeing system packages such as Debian's numpy) with the bundled wheels;
    runtime.json last, so a half-done install is never taken for a runtime (and is pruned).

    With a bundled pip wheel, pip runs from that wheel (`python pip-X.whl/pip install`, which pip
    supports) into a venv made --without-pip: seconds instead of ensurepip's install of pip and
    setuptools (25 MB, slow on a Pi), and no need for Debian's ensurepip. Without one (a
    --wheels-dir with no pip), ensurepip provides pip as before."""
    remote.run(["rm", "-rf", rdir], 60)  # an install a dead flash left unfinished
    remote.makedirs(rdir)
    wheels_dir = posixpath.join(rdir, "wheels")
    remote.sftp.posix_rename(posixpath.join(release, "wheels"), wheels_dir)
    venv = posixpath.join(rdir, "venv")
    py = posixpath.join(venv, "bin", "python")
    pip_wheel = next((w for w in info["wheels"] if _is_pip(w)), None)
    say(f"creating a venv with {options.device_python}")
    _run_checked(remote, lock.beating([options.device_python, "-m", "venv", "--system-site-packages",
                                       *(["--without-pip"] if pip_wheel else []), venv]),
                 options.verify_timeout, "creating the runtime venv (is python3-venv installed?)", say)
    pip = [py, posixpath.join(wheels_dir, pip_wheel, "pip")] if pip_wheel else [py, "-m", "pip"]
    wheels = [w for w in info["wheels"] if w != pip_wheel]
    say(f"installing {', '.join(wheels)}")
    # --ignore-installed: the bundled versions win over whatever the system site-packages has
    _run_checked(remote, lock.beating([*pip, "install", "--no-index", "--no-deps", "--ignore-installed",
                                       "--disable-pip-version-check", "--no-compile",
                                       *(posixpath.join(wheels_dir, w) for w in wheels)]),
                 options.verify_timeout * 5, "installing the runtime wheels", say)
    module = RUNTIME_MODULES.get(info["runtime"])
    if module:
        _run_checked(remote, [py, "-c", f"import {module}"], options.verify_timeout,
                     f"importing {info['runtime']} from the new venv", say)
    done = {key: info[key] for key in ("runtime_id", "runtime", "runtime_version", "wheels")}
    done.update(python=options.device_python, installed=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    tmp = posixpath.join(rdir, RUNTIME_DONE + ".tmp")
    with remote.sftp.open(tmp, "w") as f:
        f.write(json.dumps(done, indent=2) + "\n")
    remote.sftp.posix_rename(tmp, posixpath.join(rdir, RUNTIME_DONE))


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
    """Drop releases beyond keep (never current, previous, or an older release whose venv a kept
    one uses), then the runtimes no kept release links to (and unfinished installs)."""
    versions = sorted(remote.sftp.listdir(slot.releases))
    pinned = {slot.link_target(remote, slot.current), slot.link_target(remote, slot.previous)}
    spare = [v for v in versions if v not in pinned]
    drop = set(spare[:max(0, len(spare) - keep)])
    links = {v: slot.runtime_link(remote, v) for v in versions}
    drop -= {links[v].split("/")[1] for v in versions if v not in drop and links[v]
             and not links[v].startswith("../../")}
    used = {_runtime_id(links[v]) for v in versions if v not in drop}
    try:
        unused = [r for r in remote.sftp.listdir(slot.runtimes) if r not in used]
    except OSError:  # no runtime installed in this slot yet
        unused = []
    doomed = [posixpath.join(slot.releases, v) for v in sorted(drop)]
    doomed += [posixpath.join(slot.runtimes, r) for r in unused]
    if doomed:
        say(f"removing {', '.join(posixpath.relpath(d, slot.base) for d in doomed)}")
        remote.run(shlex.join(["rm", "-rf", *doomed]), 120)
    return tuple(v for v in versions if v not in drop)


def rollback(profile, target: SshTarget, options: FlashOptions | None = None,
             progress: Progress | None = None) -> FlashResult:
    """Make `previous` current again (and the rolled-back version previous, so it can be undone).
    Each release links its own runtime, so the model and runtime roll back together."""
    options = options or FlashOptions()
    say = progress or (lambda msg: None)
    _check_slot(options.slot)
    import paramiko

    switched = False
    with Remote(target) as remote:
        try:
            slot = _Slot(remote, options.slot)
            missing = EdgeqError(f"no previous version of {options.slot!r} on {target.label} to roll back to; "
                                 f"flash a model first (rollback needs two flashes)")
            if not remote.exists(slot.base):
                raise missing
            lock = SlotLock(remote, posixpath.join(slot.base, ".lock"), options.lock_wait,
                            options.lock_stale_after, say)
            try:
                notes = lock.acquire(options.slot)
                cur = slot.link_target(remote, slot.current)
                prev = slot.link_target(remote, slot.previous)
                if not prev or not remote.exists(posixpath.join(slot.releases, prev)):
                    raise missing
                say(f"rolling {options.slot} back from {cur} to {prev}")
                slot.set_link(remote, slot.current, prev)
                switched = True
                if cur:
                    slot.set_link(remote, slot.previous, cur)
            finally:
                remote.cleanup(lock.release_cmd())
                lock.forget()
            release = posixpath.join(slot.releases, prev)
            unit = f"edgeq-{options.slot}.service"
            if remote.exists(remote.path(f".config/systemd/user/{unit}")):
                code, _, _ = remote.run(f"systemctl --user restart {shlex.quote(unit)}", 60)
                if code != 0:
                    notes.append(f"could not restart {unit}; run: systemctl --user restart {unit}")
            info = remote.read_text(posixpath.join(release, "bundle.json"))
            sha = json.loads(info).get("model_sha256") if info else None
            py = posixpath.join(release, "venv", "bin", "python")
            link = slot.runtime_link(remote, prev)
            return FlashResult("rollback", target.label, options.slot, prev, cur, release, sha,
                               py if remote.exists(py) else None,
                               tuple(sorted(remote.sftp.listdir(slot.releases))), None, tuple(notes),
                               _runtime_id(link))
        except (OSError, EOFError, paramiko.SSHException) as e:  # one line, not a traceback
            what = (f"the connection to {target.label} was lost during the rollback" if not _alive(remote)
                    else f"the rollback failed on {target.label}")
            state = (f"{options.slot} is already rolled back to {prev} (a rerun would roll it forward again)"
                     if switched else "the current version is unchanged; check the board and the network, then rerun")
            raise DeviceError(f"{what} ({first_line(e)}); {state}") from None
