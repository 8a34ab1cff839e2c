"""Profile a model on a board over SSH (Raspberry Pi and other Linux devices).

The model and the device-side runner (device_bench.py) go into a fresh per-run directory on the
device over SFTP, the runner is started with an argv quoted by shlex (no file name ever reaches a
shell unquoted), its JSON line comes back, and the directory is removed again, also on failure,
timeout or Ctrl-C. Host keys are checked against known_hosts; unknown hosts are refused unless the
caller trusts them (which records the key), changed keys are always refused.

paramiko is imported lazily so `edgeq --help` stays instant.
"""

from __future__ import annotations

import json
import os
import posixpath
import shlex
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from edgeq.errors import DeviceError, EdgeqError, IncompatibleModelError, ModelFormatError
from edgeq.remote import Progress, Remote, SshTarget

BENCH_SCRIPT = Path(__file__).with_name("device_bench.py")
RUNS_DIR = ".cache/edgeq/runs"  # relative to the remote home; one uuid subdirectory per run
# Where `edgeq flash` installs releases; a runtime venv lives inside the current release.
FLASH_ROOT = ".local/share/edgeq"
DEFAULT_SLOT = "model"
# profile delegate -> device_bench --delegate (Coral's delegate is a shared library on Linux)
_DELEGATE_ARG = {"xnnpack": "xnnpack", "none": "none", "edgetpu": "libedgetpu.so.1"}


@dataclass(frozen=True)
class SshProfileOptions:
    """Per-run settings. None means: take it from the device profile."""

    threads: int | None = None
    warmup: int | None = None
    runs: int | None = None
    delegate: str | None = None  # xnnpack | none | /path/lib.so
    runtime: str | None = None  # ai-edge-litert | tflite-runtime | auto
    inputs: str | None = None  # local .npz uploaded and fed to the model
    save_outputs: str | None = None  # local .npz the device's outputs are copied back to
    seed: int = 0
    remote_python: str | None = None  # None: the flashed venv if there is one, else python3
    flash_slot: str = DEFAULT_SLOT
    emulated: bool = False  # the "device" is an emulator: timings are labelled, not meaningful


def flashed_python(remote: Remote, slot: str = DEFAULT_SLOT) -> str | None:
    """The runtime venv python installed by `edgeq flash --with-runtime`, if present."""
    py = remote.path(f"{FLASH_ROOT}/{slot}/current/venv/bin/python")
    return py if remote.exists(py) else None


def profile_over_ssh(model_path, profile, target: SshTarget, options: SshProfileOptions | None = None,
                     progress: Progress | None = None) -> dict:
    """Run device_bench.py on the device and return its "edgeq.bench/1" dict plus ssh fields.

    `profile` needs .runtime.name, .threads, .bench.warmup, .bench.runs (an edgeq DeviceProfile).
    """
    options = options or SshProfileOptions()
    say = progress or (lambda msg: None)
    model = Path(model_path)
    if not model.is_file():
        raise ModelFormatError(f"model not found: {model}; pass the path of a .tflite file")
    if options.inputs and not Path(options.inputs).is_file():
        raise EdgeqError(f"inputs file not found: {options.inputs}; pass an existing .npz")
    if options.save_outputs and Path(options.save_outputs).resolve() == model.resolve():
        raise EdgeqError("--save-outputs must not overwrite the model; choose another file")
    runtime = options.runtime or profile.runtime.name
    threads = options.threads or profile.threads
    warmup = profile.bench.warmup if options.warmup is None else options.warmup
    runs = options.runs or profile.bench.runs
    delegate = options.delegate or _DELEGATE_ARG.get(str(getattr(profile, "delegate", "xnnpack")), "xnnpack")

    say(f"connecting to {target.label}")
    remote = Remote(target)
    run_dir = remote.path(f"{RUNS_DIR}/{uuid.uuid4().hex}")
    started = finished = False
    try:
        remote.makedirs(run_dir)
        python = options.remote_python or flashed_python(remote, options.flash_slot) or "python3"
        rmodel = posixpath.join(run_dir, model.name)
        rbench = posixpath.join(run_dir, "device_bench.py")
        say(f"uploading {model.name} ({model.stat().st_size} bytes) to {run_dir}")
        remote.sftp.put(str(model), rmodel)
        remote.sftp.put(str(BENCH_SCRIPT), rbench)
        argv = [python, rbench, rmodel, "--runtime", runtime, "--threads", str(threads),
                "--warmup", str(warmup), "--runs", str(runs), "--delegate", delegate,
                "--seed", str(options.seed)]
        if options.inputs:
            remote.sftp.put(options.inputs, posixpath.join(run_dir, "inputs.npz"))
            argv += ["--inputs", posixpath.join(run_dir, "inputs.npz")]
        if options.save_outputs:
            argv += ["--save-outputs", posixpath.join(run_dir, "outputs.npz")]
        say(f"running on {target.label} with {python} ({runtime}, {threads} threads, {runs} runs)")
        # `echo $$` records the pid so an interrupted run can be killed; exec keeps the pid.
        cmd = f"echo $$ > {shlex.quote(run_dir + '/pid')} && exec {shlex.join(argv)}"
        started = True
        code, out, err = remote.run(cmd, target.run_timeout, on_stderr=say)
        finished = True
        result = _parse_bench(out, err, code, python, runtime, target, profile)
        if options.save_outputs:
            say(f"fetching outputs to {options.save_outputs}")
            _fetch_atomic(remote, posixpath.join(run_dir, "outputs.npz"), options.save_outputs)
        result.update(runner="ssh", host=target.label, remote_python=python,
                      governor=remote.read_text("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor"),
                      temperature_c=_temperature(remote))
        if options.emulated:
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
    try:
        remote.run(cmd, timeout=30)
    except (DeviceError, OSError, EOFError):
        pass  # connection gone: nothing more can be done from here; the device keeps the dir
    except Exception:  # noqa: BLE001 - cleanup must never replace the original error
        pass


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
    """Turn device_bench's last JSON line (or its absence) into a result or an actionable error."""
    line = next((l for l in reversed(out.splitlines()) if l.strip().startswith("{")), None)
    data = None
    if line:
        try:
            data = json.loads(line)
        except json.JSONDecodeError:
            data = None
    if data is None:
        tail = (err.strip().splitlines() or ["no output"])[-1]
        if code == 127:
            raise DeviceError(f"{python!r} was not found on {target.label}; install python3 there, pass "
                              f"--remote-python, or run `edgeq flash MODEL --host {target.label} "
                              f"--with-runtime`")
        raise DeviceError(f"the device runner on {target.label} exited {code} without a result: {tail}")
    if "error" in data:
        kind, msg = data.get("kind"), data["error"]
        if kind == "no-runtime":
            pid = getattr(profile, "id", "PROFILE")
            raise DeviceError(
                f"{runtime} is not installed for {python} on {target.label} ({msg}); install it with "
                f"`edgeq flash MODEL.tflite --device {pid} --host {target.label} --with-runtime`")
        if kind == "model":
            raise IncompatibleModelError(f"{runtime} on {target.label} cannot load the model: {msg}; "
                                         f"convert for this device profile or update the runtime")
        if kind == "usage":
            raise EdgeqError(f"the device runner rejected the options: {msg}")
        raise DeviceError(f"the model failed on {target.label} ({kind}): {msg}")
    return data
