"""Profile a model on a board over SSH (Raspberry Pi and other Linux devices).

The model and the device-side runner (device_bench.py) go into a fresh per-run directory on the
device over SFTP, the runner is started with an argv quoted by shlex (no file name ever reaches a
shell unquoted), its JSON line comes back, and the directory is removed again, also on failure,
timeout or Ctrl-C. Host keys are checked against known_hosts; unknown hosts are refused unless the
caller trusts them (which records the key), changed keys are always refused.

paramiko is imported lazily so `edgeq --help` stays instant.
"""

from __future__ import annotations

import os
import posixpath
import shlex
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..errors import DeviceError, EdgeqError, IncompatibleModelError, ModelFormatError
from ..bundle import FLASH_ROOT
from ..remote import Progress, Remote, SshTarget
from . import DEVICE_BENCH, BenchOptions, ProfileRequest, last_json_line, parse_bench_output

RUNS_DIR = ".cache/edgeq/runs"  # relative to the remote home; one uuid subdirectory per run
DEFAULT_SLOT = "model"


@dataclass(frozen=True)
class SshSettings:
    """How to reach the board and which python runs there (ProfileRequest.ssh)."""

    target: SshTarget | None = None
    remote_python: str | None = None  # None: the flashed venv if there is one, else python3
    flash_slot: str = DEFAULT_SLOT
    emulated: bool = False  # the "device" is an emulator: timings are labelled, not meaningful


def flashed_python(remote: Remote, slot: str = DEFAULT_SLOT) -> str | None:
    """The runtime venv python installed by `edgeq flash --with-runtime`, if present."""
    py = remote.path(f"{FLASH_ROOT}/{slot}/current/venv/bin/python")
    return py if remote.exists(py) else None


def run(model: Path, profile, opts: BenchOptions, request: ProfileRequest, progress: Progress | None = None) -> dict:
    """Run device_bench.py on the board and return its "edgeq.bench/1" dict plus ssh fields
    (the registry entry for reach "ssh"; runners.profile_model)."""
    settings = request.ssh or SshSettings()
    target = settings.target
    if target is None:
        raise EdgeqError(f"profile {getattr(profile, 'id', '?')} is reached over ssh: pass the board as "
                         f"--host user@host[:port] (or --fleet FILE)")
    say = progress or (lambda msg: None)
    if not model.is_file():
        raise ModelFormatError(f"model not found: {model}; pass the path of a .tflite file")

    say(f"connecting to {target.label}")
    remote = Remote(target)
    run_dir = remote.path(f"{RUNS_DIR}/{uuid.uuid4().hex}")
    started = finished = False
    try:
        remote.makedirs(run_dir)
        python = settings.remote_python or flashed_python(remote, settings.flash_slot) or "python3"
        rmodel = posixpath.join(run_dir, model.name)
        rbench = posixpath.join(run_dir, "device_bench.py")
        say(f"uploading {model.name} ({model.stat().st_size} bytes) to {run_dir}")
        remote.upload(model, rmodel)
        remote.upload(DEVICE_BENCH, rbench)
        argv = [python, rbench, rmodel, *opts.args()]
        if opts.inputs:
            remote.upload(opts.inputs, posixpath.join(run_dir, "inputs.npz"))
            argv += ["--inputs", posixpath.join(run_dir, "inputs.npz")]
        if opts.save_outputs:
            argv += ["--save-outputs", posixpath.join(run_dir, "outputs.npz")]
        say(f"running on {target.label} with {python} ({opts.runtime}, {opts.threads} threads, {opts.runs} runs)")
        # `echo $$` records the pid so an interrupted run can be killed; exec keeps the pid.
        cmd = f"echo $$ > {shlex.quote(run_dir + '/pid')} && exec {shlex.join(argv)}"
        started = True
        code, out, err = remote.run(cmd, target.run_timeout, on_stderr=say)
        finished = True
        result = _parse_bench(out, err, code, python, opts.runtime, target, profile)
        if opts.save_outputs:
            say(f"fetching outputs to {opts.save_outputs}")
            _fetch_atomic(remote, posixpath.join(run_dir, "outputs.npz"), str(opts.save_outputs))
        result.update(runner="ssh", host=target.label, remote_python=python,
                      governor=remote.read_text("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor"),
                      temperature_c=_temperature(remote))
        if settings.emulated:
            result["emulated"] = True
        return result
    finally:
        # Also on Ctrl-C/timeout: stop a still-running benchmark, then remove the run directory.
        say(f"cleaning up {run_dir}")
        _cleanup(remote, run_dir, kill=started and not finished)
        remote.close()


def _cleanup(remote: Remote, run_dir: str, kill: bool) -> None:
    q = shlex.quote
    cmd = f"rm -rf {q(run_dir)}"
    if kill:
        cmd = f"kill $(cat {q(run_dir + '/pid')}) 2>/dev/null; sleep 0.2; " + cmd
    remote.cleanup(cmd, timeout=30)


def _temperature(remote: Remote) -> float | None:
    raw = remote.read_text("/sys/class/thermal/thermal_zone0/temp")
    try:
        return int(raw) / 1000.0 if raw else None
    except ValueError:
        return None


def _fetch_atomic(remote: Remote, rpath: str, local: str) -> None:
    dest = Path(local)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".edgeq-", suffix=".npz", dir=dest.parent)
    os.close(fd)
    try:
        remote.sftp.get(rpath, tmp)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _parse_bench(out: str, err: str, code: int, python: str, runtime: str, target: SshTarget,
                 profile) -> dict:
    """device_bench's result, with the board-specific fixes for what goes wrong most on a board
    (no python, no runtime, a model the runtime cannot load); the rest as parse_bench_output says."""
    data = last_json_line(out) or {}
    if not data and code == 127:
        raise DeviceError(f"{python!r} was not found on {target.label}; install python3 there, pass "
                          f"--remote-python, or run `edgeq flash MODEL --host {target.label} --with-runtime`")
    kind, msg = data.get("kind"), data.get("error")
    if msg and kind == "no-runtime":
        pid = getattr(profile, "id", "PROFILE")
        raise DeviceError(
            f"{runtime} is not installed for {python} on {target.label} ({msg}); install it with "
            f"`edgeq flash MODEL.tflite --device {pid} --host {target.label} --with-runtime`")
    if msg and kind == "model":
        raise IncompatibleModelError(f"{runtime} on {target.label} cannot load the model: {msg}; "
                                     f"convert for this device profile or update the runtime")
    return parse_bench_output(out, f"the device runner on {target.label} (exit {code})", err)
