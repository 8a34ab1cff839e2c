"""Profile a .tflite model on an Android phone over adb.

Two ways to measure, because phones disagree with themselves: TFLite's `benchmark_model`
binary (mode benchmark_model, the default) and the `android_demo` app (mode app), or both with
the difference reported. Either way the result is the edgeq.bench/1 dict the other runners
return, plus "runner": "adb", the device, and the delegate coverage, which is checked against
the profile's threshold so a delegate that silently left the graph on the CPU fails loudly.

Uses the `adb` executable (Debian's `adb` package, or the SDK's platform-tools) through the adb
server; ANDROID_SERIAL and ANDROID_ADB_SERVER_PORT are honoured as adb itself does.
Only the standard library is imported here.
"""

import enum
import json
import os
import posixpath
import secrets
import shlex
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import DeviceError, EdgeqError, ModelFormatError
from ..files import sha256_file
from . import benchmark_log

SCHEMA = "edgeq.bench/1"
DEVICE_ROOT = "/data/local/tmp/edgeq"
BIN_DIR = DEVICE_ROOT + "/bin"  # fixed, so the benchmark binary is pushed once and reused
APP_PACKAGE = "com.edgeq.demo"
APP_ACTIVITY = APP_PACKAGE + "/.MainActivity"
APP_FILES = "/sdcard/Android/data/%s/files" % APP_PACKAGE

# benchmark_model flags per delegate (runners.DELEGATE_ARGS["adb"] picks the delegate), and the
# names its "Replacing ..." lines and applied/not-executed statements use for it.
DELEGATE_FLAGS = {"gpu": ["--use_gpu=true"], "nnapi": ["--use_nnapi=true"],
                  "xnnpack": ["--use_xnnpack=true"], "none": ["--use_xnnpack=false"]}
DELEGATE_NAMES = {"gpu": ("gpu", "litert_cl"), "nnapi": ("nnapi",), "xnnpack": ("xnnpack",)}
# What android_demo's result must say about the delegate it ran (see docs/android.md).
APP_COVERAGE_FIELDS = ("delegate_coverage.execution", "delegate_coverage.delegated", "delegate_coverage.total")
# ELF e_machine per Android ABI, to refuse a benchmark binary built for another CPU.
ABI_ELF_MACHINE = {"arm64-v8a": 183, "armeabi-v7a": 40, "x86_64": 62, "x86": 3}
APP_REQUIRED = ("schema", "model", "delegate", "threads", "init_ms", "first_inference_ms",
                "warmup.avg_ms", "warmup.count", "runs.count", "runs.min_ms", "runs.max_ms",
                "runs.mean_ms", "runs.std_ms", "runs.p5_ms", "runs.median_ms", "runs.p95_ms",
                "device.model", "device.android_release", "device.sdk_int")
APP_NULLABLE = ("warmup.avg_ms",)  # null when the app ran with --ei warmup 0
COMPARED = ("init_ms", "first_inference_ms", "warmup.avg_ms", "runs.mean_ms", "runs.median_ms",
            "runs.p95_ms")


class Mode(str, enum.Enum):
    BENCHMARK_MODEL = "benchmark_model"
    APP = "app"
    BOTH = "both"  # benchmark_model, then the app, and the difference between them


@dataclass(frozen=True)
class AdbOptions:
    adb: str = "adb"
    serial: str | None = None  # None: ANDROID_SERIAL, else the only attached device
    mode: Mode = Mode.BENCHMARK_MODEL
    benchmark_binary: str | None = None  # TFLite benchmark_model for the phone's ABI
    app_apk: str | None = None  # android_demo APK, installed when missing or changed
    op_profiling: bool = False
    timeout_s: float = 600.0  # for one benchmark or app run
    keep_run_dir: bool = False  # debugging only: leave /data/local/tmp/edgeq/<run> on the phone


_MISSING = object()


def _get(d, dotted, default=None):
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return default
        d = d[part]
    return d


class Adb:
    """Thin wrapper over the adb executable for one device."""

    def __init__(self, exe, serial=None):
        self.exe, self.serial = exe, serial

    def run(self, *args, timeout=120.0, check=True):
        cmd = [self.exe] + (["-s", self.serial] if self.serial else []) + list(args)
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, errors="replace",
                               stdin=subprocess.DEVNULL, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise DeviceError("adb %s timed out after %.0f s; check the phone is awake and connected"
                              % (args[0], timeout)) from None
        if check and p.returncode != 0:
            msg = (p.stderr.strip() or p.stdout.strip() or "exit %d" % p.returncode).splitlines()[-1]
            raise DeviceError("adb %s failed: %s" % (args[0], msg))
        return p

    def shell(self, command, timeout=120.0, check=True):
        """Run a shell command on the phone; the exit code comes back through shell protocol v2."""
        p = self.run("shell", command, timeout=timeout, check=False)
        if check and p.returncode != 0:
            msg = (p.stderr.strip() or p.stdout.strip() or "no output").splitlines()[-1]
            raise DeviceError("command on the phone failed (exit %d): %s: %s"
                              % (p.returncode, command.split()[0], msg))
        return p

    def push(self, local, remote, timeout=300.0):
        self.run("push", str(local), remote, timeout=timeout)

    def pull(self, remote, local, timeout=120.0):
        self.run("pull", remote, str(local), timeout=timeout)


def find_adb(exe="adb"):
    path = shutil.which(exe)
    if not path:
        raise DeviceError("adb not found (%s); install it (Debian: apt-get install adb) or pass --adb PATH" % exe)
    return path


def list_devices(exe):
    """[(serial, state)] from `adb devices` (starts the adb server when needed)."""
    out = Adb(exe).run("devices", timeout=60).stdout
    devices = []
    for line in out.splitlines():
        parts = line.split("\t")
        if len(parts) == 2 and not line.startswith(("List of", "*")):
            devices.append((parts[0].strip(), parts[1].strip()))
    return devices


def select_device(exe, serial=None):
    """The serial to use: `serial`, else ANDROID_SERIAL, else the only attached device."""
    serial = serial or os.environ.get("ANDROID_SERIAL") or None
    devices = list_devices(exe)
    if serial:
        match = [d for d in devices if d[0] == serial]
        if not match:
            attached = ", ".join(s for s, _ in devices) or "none"
            raise DeviceError("device %s is not attached (attached: %s); check --serial / ANDROID_SERIAL"
                              % (serial, attached))
        devices = match
    if not devices:
        raise DeviceError("no Android device found; connect the phone with USB debugging on "
                          "(or `adb connect HOST:PORT`) and check `adb devices`")
    if len(devices) > 1:
        raise DeviceError("several Android devices attached (%s); choose one with --serial SERIAL "
                          "or ANDROID_SERIAL" % ", ".join(s for s, _ in devices))
    serial, state = devices[0]
    if state == "unauthorized":
        raise DeviceError("device %s is unauthorized; accept the USB debugging prompt on the phone "
                          "(tick 'Always allow'), then retry" % serial)
    if state.startswith("no permissions"):
        raise DeviceError("no USB permission for device %s; install udev rules (Debian: apt-get install "
                          "android-sdk-platform-tools-common), replug the phone and retry" % serial)
    if state != "device":
        raise DeviceError("device %s is %s; reconnect it (or run `adb reconnect`) and retry" % (serial, state))
    return serial


def device_info(adb):
    keys = ("ro.product.model", "ro.product.manufacturer", "ro.product.cpu.abi",
            "ro.build.version.release", "ro.build.version.sdk")
    out = adb.shell("; ".join("getprop %s" % k for k in keys)).stdout.splitlines()
    vals = dict(zip(keys, [v.strip() for v in out] + [""] * len(keys)))
    sdk = vals["ro.build.version.sdk"]
    return {"model": vals["ro.product.model"], "manufacturer": vals["ro.product.manufacturer"],
            "abi": vals["ro.product.cpu.abi"], "machine": vals["ro.product.cpu.abi"],
            "system": "Android", "android_release": vals["ro.build.version.release"],
            "sdk_int": int(sdk) if sdk.isdigit() else None, "serial": adb.serial}


def _remote_sha256(adb, path):
    p = adb.shell("sha256sum %s 2>/dev/null" % shlex.quote(path), check=False)
    return p.stdout.split()[0] if p.returncode == 0 and p.stdout.strip() else None


def _check_elf_abi(binary, abi):
    head = Path(binary).read_bytes()[:20]
    if head[:4] != b"\x7fELF" or abi not in ABI_ELF_MACHINE:
        return  # not an ELF (a wrapper script) or an ABI we do not know: let the phone decide
    machine = int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")
    if machine != ABI_ELF_MACHINE[abi]:
        found = {v: k for k, v in ABI_ELF_MACHINE.items()}.get(machine, "e_machine %d" % machine)
        raise DeviceError("benchmark binary %s is built for %s but the phone is %s; download the "
                          "benchmark_model build for %s" % (binary, found, abi, abi))


def ensure_benchmark_binary(adb, binary, abi):
    """Push benchmark_model to BIN_DIR unless the phone already has the same bytes.

    Returns {"path", "sha256", "reused"}. The copy goes to a temp name first so a cut
    connection never leaves a half binary with the final name.
    """
    remote = BIN_DIR + "/benchmark_model"
    if binary is None:
        sha = _remote_sha256(adb, remote)
        if sha is None:
            raise DeviceError("no benchmark_model on the phone; download TFLite's benchmark_model for "
                              "%s and pass --benchmark-binary PATH" % (abi or "the phone's ABI"))
        return {"path": remote, "sha256": sha, "reused": True}
    if not Path(binary).is_file():
        raise EdgeqError("benchmark binary %s not found; pass the path of benchmark_model for %s"
                         % (binary, abi))
    _check_elf_abi(binary, abi)
    sha = sha256_file(binary)
    if _remote_sha256(adb, remote) == sha:
        return {"path": remote, "sha256": sha, "reused": True}
    adb.shell("mkdir -p %s" % BIN_DIR)
    adb.push(binary, remote + ".part")
    adb.shell("chmod 755 {0}.part && mv {0}.part {0}".format(remote))
    if _remote_sha256(adb, remote) != sha:
        raise DeviceError("benchmark_model on the phone does not match %s after the push; "
                          "check free space in /data/local/tmp and retry" % binary)
    return {"path": remote, "sha256": sha, "reused": False}


def _read_model(model_path):
    path = Path(model_path)
    if not path.is_file():
        raise ModelFormatError("model %s not found; pass the path of a .tflite file" % model_path)
    with open(path, "rb") as f:
        head = f.read(8)
    if head[4:8] != b"TFL3":
        raise ModelFormatError("%s is not a .tflite flatbuffer; convert the model to .tflite first" % model_path)
    return path


def benchmark_flags(opts, graph, op_profiling=False):
    """benchmark_model command-line flags for resolved options (exact run counts: min_secs=0)."""
    flags = ["--graph=%s" % graph, "--num_threads=%d" % opts.threads,
             "--warmup_runs=%d" % opts.warmup, "--num_runs=%d" % opts.runs,
             # without these, benchmark_model keeps running for 0.5 s / 1 s whatever the counts say
             "--warmup_min_secs=0", "--min_secs=0"]
    flags += DELEGATE_FLAGS[opts.delegate]
    if op_profiling:
        flags.append("--enable_op_profiling=true")
    return flags


def min_coverage(profile):
    """The delegated-node fraction a profile requires: DeviceProfile.accelerator.min_coverage,
    or a plain `min_delegate_coverage` attribute (small stand-in profiles)."""
    if hasattr(profile, "min_delegate_coverage"):
        return profile.min_delegate_coverage
    accel = getattr(profile, "accelerator", None)
    return getattr(accel, "min_coverage", None)


def delegate_coverage(parsed, profile, delegate, op_profiling):
    """Coverage of the requested delegate, and a DeviceError message when below the threshold."""
    if delegate not in DELEGATE_NAMES:
        return None, None
    cov = benchmark_log.delegate_coverage(parsed, DELEGATE_NAMES[delegate])
    ops = parsed.get("op_profile") or []
    if cov is None and ops and not any(benchmark_log.is_delegate_node(r["node_type"]) for r in ops):
        cov = {"delegated": 0, "total": None, "delegate": delegate, "ratio": 0.0,  # profiled: nothing delegated
               "execution": "none", "kernels": 0}
    threshold = min_coverage(profile)
    if cov is not None:
        cov = dict(cov, threshold=threshold)
    if threshold is None or cov is None or cov["ratio"] is None or cov["ratio"] >= threshold:
        return cov, None
    required = "%.0f%% < %.0f%% required by profile %s" % (100 * cov["ratio"], 100 * threshold,
                                                           getattr(profile, "id", "?"))
    if cov.get("execution") == "none":
        accel = parsed.get("nnapi_accelerators") or []
        hint = ""
        if delegate == "nnapi" and accel and all(a == "nnapi-reference" for a in accel):
            hint = ("; this phone's NNAPI offers only nnapi-reference (its CPU reference implementation), "
                    "no NPU/DSP driver: profile with android-cpu or android-gpu instead")
        return cov, ("benchmark_model says the %s delegate runs no node (\"the model graph will not be "
                     "executed by the delegate\"): every node ran on the CPU, so these are CPU timings, "
                     "not %s ones (%s)%s" % (delegate, delegate, required, hint))
    what = ("%d of %d nodes" % (cov["delegated"], cov["total"])) if cov["total"] else "no node"
    if op_profiling and ops:
        cpu = ", ".join(benchmark_log.cpu_ops(ops)) or "none listed"
        tail = "ops left on the CPU: %s" % cpu
    else:
        tail = "rerun with op profiling on to list the ops left on the CPU"
    return cov, "the %s delegate took only %s (%s); %s" % (delegate, what, required, tail)


def app_coverage(app, profile, delegate, required):
    """Check the coverage android_demo reports (APP_COVERAGE_FIELDS); returns it with the threshold.

    `required`: the app run is the only measurement (mode app), so a missing report is an error
    when the profile sets a threshold for an accelerator delegate.
    """
    cov = app.get("delegate_coverage")
    threshold = min_coverage(profile)
    if not isinstance(cov, dict):
        if required and threshold is not None and delegate in ("gpu", "nnapi"):
            why = app.get("delegate_coverage_error")
            raise DeviceError("android_demo did not report delegate coverage (%s%s), so a %s run that silently "
                              "fell back to the CPU cannot be told apart; rebuild the app from this edgeq's "
                              "android_demo/" % (", ".join(APP_COVERAGE_FIELDS), ": %s" % why if why else "", delegate))
        return None
    cov = dict(cov, threshold=threshold)
    ratio = cov.get("ratio")
    if ratio is None and cov.get("total"):
        ratio = cov["ratio"] = (cov.get("delegated") or 0) / cov["total"]
    if cov.get("execution") == "none":
        ratio = cov["ratio"] = 0.0
    if threshold is not None and ratio is not None and ratio < threshold:
        where = ("every node ran on the CPU" if ratio == 0 else "%s of %s nodes ran on it" % (
            cov.get("delegated"), cov.get("total")))
        raise DeviceError("android_demo: the %s delegate covered %.0f%% of the graph, %s (%.0f%% required by "
                          "profile %s)" % (delegate, 100 * ratio, where, 100 * threshold,
                                           getattr(profile, "id", "?")))
    return cov


def parse_app_result(json_text):
    """Validate the android_demo result JSON (edgeq.bench/1) and return it as a dict."""
    try:
        data = json.loads(json_text)
    except ValueError as e:
        raise DeviceError("android_demo wrote a result that is not JSON (%s); rebuild the app from "
                          "android_demo/ and retry" % e) from None
    if not isinstance(data, dict):
        raise DeviceError("android_demo result is not a JSON object; rebuild the app from android_demo/")
    if data.get("error"):
        raise DeviceError("android_demo failed on the phone: %s" % data["error"])
    missing = [k for k in APP_REQUIRED if _get(data, k, _MISSING) is _MISSING
               or (_get(data, k) is None and k not in APP_NULLABLE)]
    if missing:
        raise DeviceError("android_demo result lacks %s; rebuild the app from this edgeq's android_demo/"
                          % ", ".join(missing))
    if data["schema"] != SCHEMA:
        raise DeviceError("android_demo result has schema %r, expected %r; rebuild the app from "
                          "android_demo/" % (data["schema"], SCHEMA))
    return data


def compare(bench, app):
    """Per metric: both numbers, app minus benchmark_model in ms and in % of benchmark_model."""
    out = {}
    for key in COMPARED:
        a, b = _get(bench, key), _get(app, key)
        if a is None or b is None:
            continue
        out[key] = {"benchmark_model": a, "app": b, "diff_ms": b - a,
                    "diff_pct": (100.0 * (b - a) / a) if a else None}
    return out


def _say(progress, msg):
    if progress:
        progress(msg)


def _run_benchmark(adb, profile, opts, options, run_dir, graph, info, progress):
    binary = ensure_benchmark_binary(adb, options.benchmark_binary, info["abi"])
    _say(progress, "benchmark_model %s" % ("reused" if binary["reused"] else "pushed"))
    flags = benchmark_flags(opts, graph, options.op_profiling)
    cmd = "cd %s && %s %s" % (shlex.quote(run_dir), binary["path"], " ".join(shlex.quote(f) for f in flags))
    _say(progress, "running benchmark_model (%s)" % " ".join(flags[1:]))
    p = adb.shell(cmd, timeout=options.timeout_s, check=False)
    log = p.stdout + p.stderr
    if p.returncode != 0:
        errors = [ln for ln in log.splitlines() if "ERROR" in ln or "Abort" in ln or "Fatal" in ln]
        why = "killed by signal %d" % (p.returncode - 128) if p.returncode > 128 else "exit %d" % p.returncode
        last = (errors or log.strip().splitlines() or ["no output"])[-1].strip()
        raise DeviceError("benchmark_model crashed on the phone (%s): %s; try another delegate or "
                          "fewer threads, or check the model converts for this device" % (why, last))
    parsed = benchmark_log.parse(log)
    cov, failure = delegate_coverage(parsed, profile, opts.delegate, options.op_profiling)
    parsed["delegate_coverage"] = cov
    parsed["benchmark_binary"] = binary
    parsed["command"] = flags
    return parsed, failure


def _ensure_app(adb, apk, progress):
    """Install android_demo when it is missing or its APK changed; the marker keeps the installed sha."""
    marker = BIN_DIR + "/android_demo.sha256"
    installed = adb.shell("pm path %s" % APP_PACKAGE, check=False).returncode == 0
    if apk is None:
        if not installed:
            raise DeviceError("android_demo is not installed on the phone; build it (see "
                              "android_demo/README.md) and pass --app PATH.apk")
        return {"installed": False}
    if not Path(apk).is_file():
        raise EdgeqError("APK %s not found; build it with ./gradlew assembleDebug in android_demo/" % apk)
    sha = sha256_file(apk)
    current = adb.shell("cat %s 2>/dev/null" % marker, check=False).stdout.strip()
    if installed and current == sha:
        return {"installed": False, "sha256": sha}
    _say(progress, "installing android_demo")
    remote = DEVICE_ROOT + "/android_demo.apk"
    adb.shell("mkdir -p %s" % BIN_DIR)
    adb.push(apk, remote)
    p = adb.shell("pm install -r -t %s" % remote, check=False, timeout=300)
    adb.shell("rm -f %s" % remote, check=False)
    if "Success" not in p.stdout:
        msg = (p.stdout.strip() or p.stderr.strip() or "no output").splitlines()[-1]
        raise DeviceError("installing android_demo failed: %s; uninstall the old app "
                          "(adb uninstall %s) and retry" % (msg, APP_PACKAGE))
    adb.shell("echo %s > %s" % (sha, marker))
    return {"installed": True, "sha256": sha}


def app_extras(opts, graph, out_name):
    """The intent extras android_demo reads (MainActivity.Config): the same settings as benchmark_model."""
    return ["--es", "model", graph, "--es", "delegate", opts.delegate, "--ei", "threads", str(opts.threads),
            "--ei", "warmup", str(opts.warmup), "--ei", "runs", str(opts.runs), "--ei", "seed", str(opts.seed),
            "--es", "out", out_name]


def _run_app(adb, opts, options, run_name, graph, progress):
    app = _ensure_app(adb, options.app_apk, progress)
    out_name = "result-%s.json" % run_name
    remote_out = "%s/%s" % (APP_FILES, out_name)
    _say(progress, "starting android_demo")
    try:
        extras = " ".join(shlex.quote(e) for e in app_extras(opts, graph, out_name))
        p = adb.shell("am start -W -S -n %s %s" % (APP_ACTIVITY, extras), check=False)
        if p.returncode != 0 or "Error" in p.stdout:
            msg = (p.stdout.strip() or p.stderr.strip()).splitlines()[-1]
            raise DeviceError("could not start android_demo: %s; reinstall it with --app PATH.apk" % msg)
        deadline = time.monotonic() + options.timeout_s
        while True:
            # The app writes result.json via a temp file + rename, so a present file is complete.
            r = adb.shell("cat %s 2>/dev/null" % remote_out, check=False)
            if r.returncode == 0 and r.stdout.strip():
                break
            if time.monotonic() > deadline:
                raise DeviceError("android_demo wrote no result within %.0f s; check `adb logcat -s "
                                  "EDGEQ` and keep the screen on" % options.timeout_s)
            time.sleep(0.5)
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / out_name
            adb.pull(remote_out, local)
            result = parse_app_result(local.read_text())
    finally:
        adb.shell("rm -f %s" % remote_out, check=False)
    result["app"] = app
    return result


def run(model, profile, opts, request, progress=None):
    """Profile `model` on one Android phone with resolved options (the registry entry for reach
    "adb"; runners.profile_model); returns an edgeq.bench/1 dict.

    Raises DeviceError for device problems (none, several, unauthorized, crash) and when the
    delegate coverage is below the profile's threshold (min_coverage()), including a delegate
    that runs no node at all. The run directory on the phone (/data/local/tmp/edgeq/<run>) is
    removed afterwards, also on failure.
    """
    options = request.adb or AdbOptions()
    mode = Mode(options.mode)
    model = _read_model(model)
    exe = find_adb(options.adb)
    adb = Adb(exe, select_device(exe, options.serial))
    info = device_info(adb)
    _say(progress, "device %s (%s, Android %s)" % (adb.serial, info["model"], info["android_release"]))
    run_name = time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)
    run_dir = posixpath.join(DEVICE_ROOT, run_name)
    graph = run_dir + "/" + model.name
    try:
        adb.shell("mkdir -p %s && chmod 755 %s %s" % (run_dir, DEVICE_ROOT, run_dir))
        _say(progress, "pushing %s" % model.name)
        adb.push(model, graph)
        adb.shell("chmod 644 %s" % shlex.quote(graph))  # the app (another uid) reads it too
        bench = failure = app = None
        if mode in (Mode.BENCHMARK_MODEL, Mode.BOTH):
            bench, failure = _run_benchmark(adb, profile, opts, options, run_dir, graph, info, progress)
        if failure:
            raise DeviceError(failure)
        if mode in (Mode.APP, Mode.BOTH):
            app = _run_app(adb, opts, options, run_name, graph, progress)
            app["delegate_coverage"] = app_coverage(app, profile, opts.delegate, required=mode == Mode.APP)
    finally:
        if not options.keep_run_dir:
            adb.shell("rm -rf %s" % run_dir, check=False)
    result = bench if bench is not None else app
    result.update({
        "schema": SCHEMA, "runner": "adb", "mode": mode.value, "profile": getattr(profile, "id", None),
        "serial": adb.serial, "model": model.name, "model_sha256": sha256_file(model),
        "model_bytes": model.stat().st_size, "threads": opts.threads, "delegate": opts.delegate,
        "device": dict(info, **{k: v for k, v in (result.get("device") or {}).items() if v is not None}),
    })
    if bench is not None:
        # benchmark_model feeds its own random inputs and does not print single timings or outputs.
        result.setdefault("timings_ms", [])
        result.update({"input_source": "random", "outputs_sha256": None})
        result.setdefault("inputs", [])
    if bench is not None and app is not None:
        result["app"] = app
        result["app_vs_benchmark"] = compare(bench, app)
    return result
