"""Runners: measure a model where a device profile says it runs, and return edgeq.bench/1 JSON.

One entry point, `profile_model(model, profile, request)`: the profile's `reach` picks the runner
from RUNNERS (local: this host, ssh: a board, adb: a phone), and `resolve()` fills what the request
leaves open (threads, warmup, runs, delegate, runtime, inputs) from the profile, in one place.
local and ssh run `device_bench.py` (DEVICE_BENCH) with `BenchOptions.args()` and read its JSON line
with `parse_bench_output`; adb runs TFLite's benchmark_model or the android_demo app.
"""

from __future__ import annotations

import enum
import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..errors import DeviceError, EdgeqError, ProfileError

if TYPE_CHECKING:
    from .adb import AdbOptions
    from .ssh import SshSettings

DEVICE_BENCH = Path(__file__).with_name("device_bench.py")
Progress = Callable[[str], None]


class InputSource(str, enum.Enum):
    RANDOM = "random"  # device_bench's valid random inputs (ids below the table size, 0/1 masks)
    FILE = "file"  # --inputs
    SAMPLES = "samples"  # the real samples convert kept next to the model (manifest "samples")


@dataclass(frozen=True)
class BenchOptions:
    """What one run is asked for, every field decided (see resolve())."""

    threads: int = 1
    warmup: int = 5
    runs: int = 50
    delegate: str = "xnnpack"  # device_bench: xnnpack | none | a delegate .so; adb: gpu | nnapi | xnnpack | none
    runtime: str = "auto"
    inputs: Path | None = None  # .npz of inputs; default random per input dtype
    seed: int = 0
    save_outputs: Path | None = None  # local .npz the outputs are copied to
    input_source: InputSource = InputSource.RANDOM

    def args(self) -> list[str]:
        """device_bench.py arguments (the inputs/outputs paths differ per runner: added there)."""
        return ["--threads", str(self.threads), "--warmup", str(self.warmup), "--runs", str(self.runs),
                "--delegate", self.delegate, "--runtime", self.runtime, "--seed", str(self.seed)]


@dataclass(frozen=True)
class ProfileRequest:
    """What the caller asks for. None means: take it from the device profile (or, with no profile,
    the BenchOptions default). `ssh`/`adb` hold the settings of that reach."""

    threads: int | None = None
    warmup: int | None = None
    runs: int | None = None
    delegate: str | None = None
    runtime: str | None = None  # device_bench runtime; default: the profile's on a board, auto here
    inputs: Path | None = None  # .npz; default: the model's samples (manifest), else random
    save_outputs: Path | None = None
    seed: int = 0
    ssh: SshSettings | None = None
    adb: AdbOptions | None = None


# Profile delegate -> what the runner of each reach is given. device_bench takes xnnpack | none |
# a delegate library (Coral's Edge TPU delegate is a shared library on Linux); adb takes the name and
# turns it into benchmark_model flags (adb.DELEGATE_FLAGS) or the app's `delegate` extra.
DELEGATE_ARGS = {
    "local": {"xnnpack": "xnnpack", "none": "none"},
    "ssh": {"xnnpack": "xnnpack", "none": "none", "edgetpu": "libedgetpu.so.1"},
    "adb": {"gpu": "gpu", "nnapi": "nnapi", "xnnpack": "xnnpack", "none": "none", "cpu": "none"},
}
# Each reach is one module of this package with run(model, profile, opts, request, progress) -> dict.
RUNNERS = {"local": "local", "ssh": "ssh", "adb": "adb"}


def _value(x) -> str:
    return str(getattr(x, "value", x)).lower()


def reach_of(profile) -> str:
    """The profile's reach; no profile (edgeq bench) is this host."""
    return _value(getattr(profile, "reach", "local")) if profile is not None else "local"


def delegate_arg(profile, reach: str, override: str | None = None) -> str:
    """The runner argument for the requested delegate (override) or the profile's."""
    table = DELEGATE_ARGS[reach]
    if override:
        if reach != "adb":  # a name the profiles use (edgetpu), else a delegate library path for device_bench
            return table.get(override.lower(), override)
        if override.lower() in table:
            return table[override.lower()]
        raise EdgeqError(f"--delegate {override} cannot be selected on an Android phone; use one of "
                         f"{', '.join(sorted(table))}")
    delegate = _value(getattr(profile, "delegate", "xnnpack")) if profile is not None else "xnnpack"
    if delegate not in table:
        how = ("it needs a vendor external delegate" if reach == "adb"
               else f"its delegate cannot be loaded over {reach}")
        raise ProfileError(f"profile {getattr(profile, 'id', '?')} uses delegate {delegate!r}, which edgeq "
                           f"cannot select in {'benchmark_model' if reach == 'adb' else 'device_bench'} yet "
                           f"({how}); use a {', '.join(sorted(table))} profile or pass --delegate")
    return table[delegate]


def sample_inputs(model: Path) -> Path | None:
    """The real samples `edgeq convert` kept next to the model: the manifest's "samples" entry (a
    file name, or {"file": name}) naming an .npz in the model's folder. None when there is none."""
    from ..manifest import manifest_path, read_manifest

    mpath = manifest_path(model)
    if not mpath.is_file():
        return None
    entry = read_manifest(mpath).get("samples")
    name = entry.get("file") if isinstance(entry, dict) else entry
    if not name:
        return None
    if not isinstance(name, str) or Path(name).name != name or not name.endswith(".npz"):
        raise EdgeqError(f"{mpath}: \"samples\" must name an .npz next to the model, got {name!r}; "
                         f"re-run edgeq convert")
    path = Path(model).with_name(name)
    if not path.is_file():
        raise EdgeqError(f"{mpath} names samples {name}, which is missing; copy it next to the model, "
                         f"pass --inputs FILE.npz, or re-run edgeq convert")
    return path


def resolve(model: Path, profile, request: ProfileRequest, reach: str) -> BenchOptions:
    """The one place where profile defaults fill the request."""
    bench = getattr(profile, "bench", None)
    d = BenchOptions()
    runtime = request.runtime or (_value(profile.runtime.name) if reach == "ssh" else d.runtime)
    if reach == "adb" and (request.inputs or request.save_outputs):
        raise EdgeqError("--inputs/--save-outputs are not supported on Android phones yet: benchmark_model "
                         "and android_demo feed their own random inputs; drop the option")
    inputs, source = request.inputs, InputSource.FILE
    if inputs is None and reach != "adb":
        inputs, source = sample_inputs(model), InputSource.SAMPLES
    if inputs is None:
        source = InputSource.RANDOM
    elif not Path(inputs).is_file():
        raise EdgeqError(f"inputs file not found: {inputs}; pass an existing .npz")
    if request.save_outputs and Path(request.save_outputs).resolve() == Path(model).resolve():
        raise EdgeqError("--save-outputs must not overwrite the model; choose another file")
    return BenchOptions(
        threads=request.threads or getattr(profile, "threads", None) or d.threads,
        warmup=request.warmup if request.warmup is not None else (bench.warmup if bench else d.warmup),
        runs=request.runs or (bench.runs if bench else d.runs),
        delegate=delegate_arg(profile, reach, request.delegate),
        runtime=runtime, inputs=Path(inputs) if inputs else None, seed=request.seed,
        save_outputs=Path(request.save_outputs) if request.save_outputs else None, input_source=source)


def run_reach(model, profile, request: ProfileRequest, reach: str, progress: Progress | None = None) -> dict:
    """profile_model() with the reach given (stand-in profiles without a `reach`)."""
    if reach not in RUNNERS:
        raise ProfileError(f"profile {getattr(profile, 'id', '?')} has reach {reach!r}; edgeq knows "
                           f"{', '.join(RUNNERS)}")
    model = Path(model)
    opts = resolve(model, profile, request, reach)
    runner = importlib.import_module(f"{__name__}.{RUNNERS[reach]}")
    result = runner.run(model, profile, opts, request, progress)
    if opts.input_source == InputSource.SAMPLES:
        result["input_source"] = InputSource.SAMPLES.value
        result["inputs_file"] = opts.inputs.name
    return result


def profile_model(model, profile=None, request: ProfileRequest = ProfileRequest(),
                  progress: Progress | None = None) -> dict:
    """Measure `model` where `profile` runs (None: this host, as `edgeq bench`); edgeq.bench/1 dict."""
    return run_reach(model, profile, request, reach_of(profile), progress)


def parse_bench_output(stdout: str, where: str, stderr: str = "") -> dict:
    """The last JSON line device_bench printed. Its error becomes an EdgeqError (bad arguments or
    inputs: exit 1) or a DeviceError (runtime, model load, invoke: exit 3)."""
    data = last_json_line(stdout)
    if data is None:
        tail = (stderr.strip().splitlines() or stdout.strip().splitlines() or ["(no output)"])[-1]
        raise DeviceError(f"{where}: the device runner printed no result; last output: {tail[-300:]}")
    if "error" in data:
        cls = EdgeqError if data.get("kind") == "usage" else DeviceError
        raise cls(f"{where}: {data['error']}")
    return data


def last_json_line(stdout: str) -> dict | None:
    """The last line of device_bench output that parses as a JSON object, else None."""
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None
