"""Command line: each command parses, calls one library function, prints (a table or --json).

Exit codes: 0 ok, 1 user error, 2 usage, 3 device/runtime failure. Heavy modules are imported
inside commands so `edgeq --help` and `edgeq devices list` stay instant.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import click

from . import __version__
from .cli_output import (emit_json, print_bench, print_convert, print_demo, print_flash, print_fleet, print_profile,
                         table)
from .defaults import DEFAULT_CALIB_SAMPLES, DEFAULT_EVAL_SAMPLES
from .errors import EdgeqError
from .precision import IoType, Scheme


class DeviceFailure(click.ClickException):
    exit_code = 3


class Finite(click.FloatRange):
    """A float in a range that is a number: click's FloatRange lets nan through (no comparison is
    true of it), so `--max-drop nan` ran the whole job to "needs >= nan" and `--connect-timeout nan`
    waited forever; inf wrote Infinity into the manifest's JSON."""

    def convert(self, value, param, ctx):
        import math

        v = super().convert(value, param, ctx)
        if not math.isfinite(v):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return v


SECONDS = Finite(min=0, min_open=True)  # a timeout: above 0 (0 and -5 were accepted, then failed oddly)
FLOAT32_MAX = 3.4028234e38  # --mean/--std are applied in float32: 1e39 is inf there


def library_call(fn):
    """Turn library errors into one-line click errors with the documented exit codes."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .interrupts import check, install, reason, recording
        install()  # a Ctrl-C that lands in a gc callback (JAX's, during HF loading) still stops us
        try:
            with recording():
                try:
                    result = fn(*args, **kwargs)
                except Exception:
                    # Code that turned the Ctrl-C into its own error is still interrupted: torch.export's
                    # cleanup raised "Attempted to unset ProxyTorchDispatchMode" over it, and a Ctrl-C in
                    # a lazy import's class body comes out as "RuntimeError: Error calling __set_name__".
                    check()
                    raise
                check()  # a Ctrl-C something swallowed still ends the command as interrupted
                return result
        except EdgeqError as e:
            cls = DeviceFailure if e.exit_code == 3 else click.ClickException
            raise cls(str(e)) from None
        except KeyboardInterrupt:
            raise click.ClickException(reason()) from None
        except EOFError as e:  # click reports it as its Ctrl-D "Aborted!", which names nothing
            raise click.ClickException(f"a file ended before its end ({e or 'EOFError'}); check the input files "
                                       "are complete") from None

    return wrapper


def _progress(quiet: bool, as_json: bool):
    """No progress with --quiet; with --json only when EDGEQ_PROGRESS=plain asks for it (its lines go
    to stderr: stdout stays the one JSON document; a helper's logged --json runs showed nothing)."""
    from .progress import ENV, Progress
    plain = os.environ.get(ENV, "").strip().lower() == "plain"
    return Progress(False if quiet or (as_json and not plain) else None)


json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document to stdout, nothing else.")
quiet_option = click.option("--quiet", "-q", is_flag=True,
                            help="No progress output (shown on a terminal; EDGEQ_PROGRESS=plain: as lines in logs).")
force_option = click.option("--force", is_flag=True, help="Overwrite an existing output file.")


def output_option(help: str, required: bool = False):
    """-o/--output, shared by every command that writes a file (with --force to overwrite)."""
    return click.option("-o", "--output", type=click.Path(path_type=Path), required=required, help=help)


devices_dir_option = click.option("--devices-dir", type=click.Path(file_okay=False), envvar="EDGEQ_DEVICES_DIR",
                                  help="Extra device profile directory (env: EDGEQ_DEVICES_DIR).")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgeq")
def main():
    """edgeq: quantize models for phones and small boards, and prove how they run there."""


def _size(ctx, param, value):
    from .size_goal import parse_size
    try:
        return parse_size(value) if value is not None else None
    except EdgeqError as e:
        raise click.BadParameter(str(e)) from None


def _shapes(ctx, param, values):
    from .sources.shapes import parse_shape
    try:
        return tuple(parse_shape(v) for v in values)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


# --------------------------------------------------------------------------- convert
@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@output_option("Output .tflite path.", required=True)
@click.option("--calib", help="Calibration data: image dir, .npy, .npz, .txt (with --tokenizer), or 'random'.")
@click.option("--calib-samples", type=click.IntRange(min=1), default=DEFAULT_CALIB_SAMPLES, show_default=True)
@click.option("--eval-samples", type=click.IntRange(min=0), default=DEFAULT_EVAL_SAMPLES, show_default=True,
              help="Held-out samples for fidelity.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--preprocess", type=click.Choice(["unit", "symmetric", "imagenet", "raw"]),
              help="Image scaling: unit [0,1] (default), symmetric [-1,1], imagenet mean/std, raw 0..255.")
@click.option("--mean", help="Explicit per-channel mean on 0..255 pixels, e.g. 127.5 or 123.7,116.3,103.5.")
@click.option("--std", help="Explicit per-channel std on 0..255 pixels.")
@click.option("--layout", type=click.Choice(["nchw", "nhwc"]),
              help="Image input layout when the input shape fits both (e.g. 1x3x3x3) [default: from the shape].")
@click.option("--tokenizer", type=click.Path(exists=True, file_okay=False), help="Tokenizer dir for .txt data.")
@click.option("--seq-len", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--pooling", type=click.Choice(["mean", "cls", "none"]), default=None,
              help="Hugging Face encoders: output pooling [mean]. A text or token classifier (config.json's "
                   "architectures) keeps its head (output logits) unless this is given.")
@click.option("--scheme", type=click.Choice([s.value for s in Scheme]),
              help="Quantization scheme [default: the device's, else int8; dynamic for HF encoders].")
@click.option("--io", "io_type", type=click.Choice([t.value for t in IoType]),
              help="Model input/output dtype [default: the device's, else float32].")
@click.option("--calibration", "range_method", type=click.Choice(["minmax", "percentile", "mse"]),
              default="minmax", show_default=True, help="Activation range selection.")
@click.option("--percentile", type=Finite(50, 100, min_open=True, max_open=True), default=99.99,
              show_default=True, help="Tail kept by --calibration percentile.")
@click.option("--optimize", type=click.Choice(["none", "fast", "best"]),
              help="Accuracy methods, each kept if it helps on calibration samples: fast = measured ranges, "
                   "equalization, output-aware weight rounding, bias correction; best = + per-tensor ranges, "
                   "learned rounding (minutes) [default: fast for int8 with real --calib data, else none].")
@click.option("--max-size", callback=_size, metavar="SIZE",
              help="Size goal, e.g. 12MB: the first of int8, int4-b32, int4-b64, int4-b128, int4 (or only the --scheme or "
                   "--device's) whose file fits, its bytes left spent on the int4 layers whose 8-bit weights "
                   "buy the most fidelity per byte; else exit 1 with the smallest size reached. The accuracy "
                   "target's loop stays within it.")
@click.option("--split-outliers", type=Finite(min=0),
              help="HF encoders: give Linear output channels above RATIO x the median their own Linear "
                   "[default: 8 for int8/int16x8, 0 = off].")
@click.option("--smoothquant", type=Finite(0, 1), help="HF encoders: SmoothQuant alpha (default off).")
@click.option("--device", help="Device profile id: plan precision per op and check the runtime.")
@devices_dir_option
@click.option("--allow-incompatible", is_flag=True, help="Write even if the device runtime cannot run it.")
@click.option("--max-drop", type=Finite(min=0),
              help="Accuracy budget: max drop of --metric on every output (replaces the default fidelity floor).")
@click.option("--metric", type=click.Choice(["cosine", "top1", "rel_l2"]), default="cosine", show_default=True,
              help="What --max-drop bounds; top1: argmax agreement of every (batch, classes) output, or of the "
                   "--class-output ones.")
@click.option("--class-output", "class_outputs", multiple=True, metavar="NAME",
              help="Output NAME holds class scores (repeatable): fidelity reports its top-1 agreement and the "
                   "floor judges it by top-1. Softmax outputs are recognised without it.")
@click.option("--no-floor", is_flag=True,
              help="Write the result even below the default fidelity floor (held-out cosine 0.98 for embeddings, "
                   "0.95 for other outputs, top-1 agreement 0.90 for class scores), which otherwise runs the "
                   "budget loop and refuses what it cannot fix.")
@click.option("--input-shape", "input_shapes", multiple=True, callback=_shapes, metavar="SHAPE",
              help="Keras, SavedModel and torch.export models with dynamic dimensions: static shape per "
                   "input, in order (e.g. 1,224,224,3) [default: .npy/.npz calibration data's shape].")
@click.option("--trust-model", is_flag=True,
              help="Keras: load Lambda layers, Python code stored in the file (Keras' safe_mode=False); only "
                   "for files you trust.")
@click.option("--strict", is_flag=True, help="Fail if any op stayed float under --scheme int8.")
@force_option
@json_option
@quiet_option
@library_call
def convert(model, output, calib, calib_samples, eval_samples, seed, preprocess, mean, std, layout, tokenizer,
            seq_len, pooling, scheme, io_type, range_method, percentile, optimize, max_size, split_outliers,
            smoothquant, device, devices_dir, allow_incompatible, max_drop, metric, class_outputs, no_floor,
            input_shapes, trust_model, strict, force, as_json, quiet):
    """Quantize MODEL (Keras, SavedModel, HF dir, torch.export .pt2 or float .tflite) into OUTPUT .tflite
    + manifest (+ OUTPUT.samples.npz: a few real held-out inputs that bench/profile use by default).

    The result must reach a fidelity floor on held-out samples (see --no-floor) or the user's
    --max-drop; when it does not, ops leave int8 until it does, or nothing is written (exit 1)."""
    from .calibration import CalibrationConfig, Layout, Preprocess
    from .convert import BudgetOptions, ConvertOptions, convert as run, usage_mistake
    from .optimize import OptimizeLevel

    ctx = click.get_current_context()
    if not calib and (preprocess or mean or std or layout or tokenizer):  # they were ignored
        raise click.UsageError("--preprocess/--mean/--std/--layout/--tokenizer prepare --calib data; pass --calib "
                               "or drop them")
    given = ctx.get_parameter_source("percentile") is click.core.ParameterSource.COMMANDLINE
    if given and range_method != "percentile":  # it was ignored
        raise click.UsageError(f"--percentile sets the tail --calibration percentile keeps; --calibration "
                               f"{range_method} has none: drop --percentile or use --calibration percentile")

    def floats(s, option):
        import math

        try:
            values = tuple(float(v) for v in s.split(",")) if s else None
        except ValueError:
            raise click.BadParameter(f"{s!r} is not a comma-separated list of numbers", param_hint=option) from None
        # --std inf made every sample all zeros; 1e39 is inf in float32, where the pixels are normalised
        if values and not all(math.isfinite(v) and abs(v) <= FLOAT32_MAX for v in values):
            raise click.BadParameter(f"{s!r}: every value must be a finite number", param_hint=option)
        return values

    cal = CalibrationConfig(calib, calib_samples, eval_samples, seed, Preprocess(preprocess) if preprocess else None,
                            floats(mean, "--mean"), floats(std, "--std"), tokenizer, seq_len,
                            Layout(layout) if layout else None) if calib else None
    opts = ConvertOptions(output, Scheme(scheme) if scheme else None, IoType(io_type) if io_type else None, cal,
                          device, devices_dir, strict, force, allow_incompatible,
                          BudgetOptions(max_drop, metric) if max_drop is not None else None, range_method,
                          percentile, seq_len, pooling, split_outliers, smoothquant, floor=not no_floor,
                          class_outputs=tuple(class_outputs), input_shapes=tuple(input_shapes),
                          optimize=OptimizeLevel(optimize) if optimize else None, max_size=max_size,
                          trust_model=trust_model)
    mistake = usage_mistake(opts)  # options that cannot go together: a usage error, before any work
    if mistake:
        raise click.UsageError(mistake)
    result = run(model, opts, _progress(quiet, as_json))
    emit_json(result.manifest) if as_json else print_convert(result)



# --------------------------------------------------------------------------- bench
@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=5, show_default=True)
@click.option("--runs", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--delegate", default="xnnpack", show_default=True, help="xnnpack, none, or a delegate .so path.")
@click.option("--inputs", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help=".npz with one array per input [default: the samples MODEL's manifest names, else valid "
                   "random inputs].")
@output_option("Also save the JSON result here.")
@force_option
@json_option
@quiet_option
@library_call
def bench(model, threads, warmup, runs, delegate, inputs, output, force, as_json, quiet):
    """Benchmark MODEL on this host (the same runner script the devices use)."""
    from .runners import ProfileRequest, profile_model

    _check_result_path(output, [*_read_beside(model), inputs], force)
    with _progress(quiet, as_json).task(f"Benchmarking {Path(model).name}: {warmup} warmup + {runs} runs"):
        r = profile_model(model, None, ProfileRequest(threads, warmup, runs, delegate, inputs=inputs))
    _save_result(output, r)
    if as_json:
        emit_json(r)
    else:
        print_bench(r)


def _check_result_path(output, inputs, force) -> None:
    """Before any slow work: -o never replaces an input, an existing file only with --force."""
    if output:
        from .files import check_output
        check_output(Path(output), inputs, force)


def _read_beside(model) -> list[Path]:
    """MODEL and what bench/profile read beside it by default (its manifest and kept samples): -o and
    --save-outputs with --force replaced them, and every later bench, profile and flash then failed."""
    from .manifest import manifest_path, samples_path

    return [Path(model), manifest_path(model), samples_path(model)]


def _save_result(output, result) -> None:
    if output:
        from .files import atomic_write_json
        atomic_write_json(Path(output), result)



# --------------------------------------------------------------------------- devices
@main.group()
def devices():
    """Device profiles (devices/*.toml)."""


@devices.command("list")
@devices_dir_option
@json_option
@library_call
def devices_list(devices_dir, as_json):
    """List the known device profiles."""
    from .profiles import list_profiles

    profiles = list_profiles(devices_dir=devices_dir)
    if as_json:
        emit_json([p.to_json() for p in profiles])
        return
    columns = ["id", "name", "kind", "abi", "runtime", "delegate", "scheme", "reach"]
    table("Device profiles", columns, [[p.summary_row()[c] for c in columns] for p in profiles])


@devices.command("show")
@click.argument("device_id")
@devices_dir_option
@json_option
@library_call
def devices_show(device_id, devices_dir, as_json):
    """Show one device profile."""
    from .profiles import load_profile

    p = load_profile(device_id, devices_dir=devices_dir)
    emit_json(p.to_json()) if as_json else click.echo(p.describe())


@devices.command("check")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--device", required=True, help="Device profile id.")
@devices_dir_option
@json_option
@library_call
def devices_check(model, device, devices_dir, as_json):
    """Which ops of MODEL run int8 on DEVICE, which fall back, which cannot run."""
    from .compat import check_model
    from .profiles import load_profile

    report = check_model(model, load_profile(device, devices_dir=devices_dir))
    if as_json:
        emit_json(report.to_json())
    else:
        click.echo(report.describe())
    if not report.ok:
        sys.exit(1)


# --------------------------------------------------------------------------- profile / flash
ssh_options = [
    click.option("--host", help="user@host[:port] of the device (ssh devices)."),
    click.option("--fleet", "fleet_file", type=click.Path(dir_okay=False, path_type=Path),
                 help="Inventory TOML (name -> host, user, port, profile): run on every device."),
    click.option("--parallel", type=click.IntRange(min=1), default=4, show_default=True,
                 help="Fleet: devices at once."),
    click.option("--identity", type=click.Path(dir_okay=False), help="SSH private key (default: agent, ~/.ssh)."),
    click.option("--known-hosts", type=click.Path(dir_okay=False), help="known_hosts file (default ~/.ssh/known_hosts)."),
    click.option("--trust-new-host", is_flag=True, help="Accept and record an unknown host key."),
    click.option("--connect-timeout", type=SECONDS, default=10.0, show_default=True),
    click.option("--timeout", "run_timeout", type=SECONDS, default=600.0, show_default=True, help="Run timeout (s)."),
]


def _with(options):
    def deco(fn):
        for o in reversed(options):
            fn = o(fn)
        return fn
    return deco


def _ssh_kwargs(identity, known_hosts, trust_new_host, connect_timeout, run_timeout) -> dict:
    return {"identity": identity, "known_hosts": known_hosts, "trust_new_host": trust_new_host,
            "connect_timeout": connect_timeout, "run_timeout": run_timeout}


def _run_fleet(fleet_file, parallel, kwargs, fn, progress, as_json):
    from .fleet import load_inventory, run_fleet

    inv = load_inventory(fleet_file, **kwargs)
    result = run_fleet(inv, fn, max_parallel=parallel, progress=progress.note)
    emit_json(result.to_dict()) if as_json else print_fleet(result)
    if result.exit_code:
        sys.exit(result.exit_code)


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--device", help="Device profile id (its `reach` picks ssh, adb or this host).")
@devices_dir_option
@_with(ssh_options)
@click.option("--remote-python", help="Python on the device (default: the flashed venv, else python3).")
@click.option("--serial", envvar="ANDROID_SERIAL", help="Android device serial (env: ANDROID_SERIAL).")
@click.option("--adb", "adb_path", default="adb", show_default=True, help="adb executable.")
@click.option("--mode", type=click.Choice(["benchmark_model", "app", "both"]), default="benchmark_model",
              show_default=True, help="Android: benchmark_model binary, the android_demo app, or both.")
@click.option("--benchmark-binary", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="TFLite benchmark_model for the phone's ABI.")
@click.option("--app", "app_apk", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="android_demo APK.")
@click.option("--op-profiling", is_flag=True, help="Android: per-op profile (shows ops left on the CPU).")
@click.option("--delegate", help="xnnpack, none, a delegate .so path on a board, or gpu/nnapi on a phone "
              "[default: the profile's].")
@click.option("--slot", default="model", show_default=True, help="Pi: use this flashed slot's runtime venv.")
@click.option("--threads", type=click.IntRange(min=1), help="Default: the profile's.")
@click.option("--warmup", type=click.IntRange(min=0), help="Default: the profile's.")
@click.option("--runs", type=click.IntRange(min=1), help="Default: the profile's.")
@click.option("--inputs", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help=".npz inputs fed to the model [default: the samples MODEL's manifest names, else valid "
                   "random inputs].")
@click.option("--save-outputs", type=click.Path(dir_okay=False, path_type=Path),
              help="Copy the device's outputs to this .npz.")
@output_option("Also save the JSON result here.")
@force_option
@json_option
@quiet_option
@library_call
def profile(model, device, devices_dir, host, fleet_file, parallel, identity, known_hosts, trust_new_host,
            connect_timeout, run_timeout, remote_python, serial, adb_path, mode, benchmark_binary, app_apk,
            op_profiling, delegate, slot, threads, warmup, runs, inputs, save_outputs, output, force, as_json, quiet):
    """Measure MODEL on a device: a Pi over SSH, a phone over adb, or this host."""
    from dataclasses import replace

    from .profiles import load_profile
    from .remote import parse_target
    from .runners import ProfileRequest, profile_model, reach_of
    from .runners.adb import AdbOptions, Mode
    from .runners.ssh import SshSettings

    if not (device or fleet_file) or (device and fleet_file):
        raise click.UsageError("pass either --device ID (see `edgeq devices list`) or --fleet FILE")
    if fleet_file and (host or save_outputs):
        raise click.UsageError("--fleet FILE names every device: drop --host/--save-outputs")
    _check_result_path(output, [*_read_beside(model), inputs, fleet_file], force)
    _check_result_path(save_outputs, [*_read_beside(model), inputs, fleet_file, output], force)
    progress = _progress(quiet, as_json)
    kw = _ssh_kwargs(identity, known_hosts, trust_new_host, connect_timeout, run_timeout)
    request = ProfileRequest(threads, warmup, runs, delegate, inputs=inputs, save_outputs=save_outputs,
                             ssh=SshSettings(None, remote_python, slot),
                             adb=AdbOptions(adb=adb_path, serial=serial, mode=Mode(mode),
                                            benchmark_binary=benchmark_binary, app_apk=app_apk,
                                            op_profiling=op_profiling, timeout_s=run_timeout))
    if fleet_file:
        _run_fleet(fleet_file, parallel, kw, lambda d: profile_model(
            model, load_profile(d.profile, devices_dir=devices_dir),
            replace(request, ssh=replace(request.ssh, target=d.target)), progress.note), progress, as_json)
        return
    prof = load_profile(device, devices_dir=devices_dir)
    reach = reach_of(prof)
    if reach == "ssh" and not host:
        raise click.UsageError(f"{device} is reached over ssh: pass --host user@host[:port] (or --fleet FILE)")
    if host and reach != "ssh":
        raise click.UsageError(f"--host is for ssh devices; {device} is reached over {reach}")
    if reach == "adb" and (inputs or save_outputs):
        raise click.UsageError(f"--inputs/--save-outputs are not supported on Android phones yet ({device}); "
                               f"drop them")
    if host:
        request = replace(request, ssh=replace(request.ssh, target=parse_target(host, **kw)))
    where = {"ssh": host, "adb": "an Android phone over adb"}.get(reach, "this host")
    with progress.task(f"Profiling {Path(model).name} on {where}"):
        r = profile_model(model, prof, request, progress.note)
    _save_result(output, r)
    if as_json:
        emit_json(r)
        return
    print_profile(r)


@main.command()
@click.argument("model", type=click.Path(path_type=Path), required=False)
@click.option("--device", help="Device profile id.")
@devices_dir_option
@_with(ssh_options)
@click.option("--rollback", is_flag=True, help="Make the previous version current again.")
@click.option("--slot", default="model", show_default=True, help="Deployment name on the device.")
@click.option("--with-runtime", is_flag=True, help="Bundle runtime wheels and install them into a venv there.")
@click.option("--wheels-dir", type=click.Path(file_okay=False), help="Use these wheels (offline hosts).")
@click.option("--systemd-exec", help="Install a systemd --user unit that runs this command with the model.")
@click.option("--keep", type=click.IntRange(min=1), default=3, show_default=True,
              help="Old releases kept besides current and previous.")
@json_option
@quiet_option
@library_call
def flash(model, device, devices_dir, host, fleet_file, parallel, identity, known_hosts, trust_new_host,
          connect_timeout, run_timeout, rollback, slot, with_runtime, wheels_dir, systemd_exec, keep, as_json, quiet):
    """Deploy MODEL to a Raspberry Pi (atomic switch of a `current` link; --rollback restores)."""
    from .flash import FlashOptions
    from .flash import flash as do_flash
    from .flash import rollback as do_rollback
    from .profiles import load_profile
    from .remote import parse_target

    if rollback and (model is not None or with_runtime or wheels_dir or systemd_exec):
        raise click.UsageError("--rollback restores the previous release as it was: drop MODEL, "
                               "--with-runtime, --wheels-dir and --systemd-exec")
    if not rollback and model is None:
        raise click.UsageError("pass the MODEL to flash, or --rollback")
    if wheels_dir and not with_runtime:
        raise click.UsageError("--wheels-dir holds the runtime wheels: add --with-runtime")
    if fleet_file and (device or host):
        raise click.UsageError("--fleet FILE names every device and its profile: drop --device/--host")
    if not fleet_file and (not device or not host):
        raise click.UsageError("pass --device ID and --host user@host[:port] (or --fleet FILE)")
    progress = _progress(quiet, as_json)
    kw = _ssh_kwargs(identity, known_hosts, trust_new_host, connect_timeout, run_timeout)
    opts = FlashOptions(slot=slot, with_runtime=with_runtime, wheels_dir=wheels_dir, systemd_exec=systemd_exec,
                        keep=keep)

    def one(prof, target):
        if rollback:
            return do_rollback(prof, target, opts, progress.note).to_dict()
        return do_flash(model, prof, target, opts, progress.note).to_dict()

    if fleet_file:
        _run_fleet(fleet_file, parallel, kw, lambda d: one(load_profile(d.profile, devices_dir=devices_dir),
                                                           d.target), progress, as_json)
        return
    with progress.task(f"{'Rolling back' if rollback else 'Flashing'} {host}"):
        r = one(load_profile(device, devices_dir=devices_dir), parse_target(host, **kw))
    if as_json:
        emit_json(r)
    else:
        print_flash(r)


# --------------------------------------------------------------------------- report
@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@output_option("report.html path.", required=True)
@click.option("--title", help="Report title.")
@force_option
@json_option
@library_call
def report(inputs, output, title, force, as_json):
    """HTML report (+ Markdown summary) from manifests and run results."""
    from .report import build_report

    r = build_report(list(inputs), output, title=title, force=force)
    if as_json:
        emit_json(r.to_json())
    else:
        click.echo(f"wrote {r.html} and {r.markdown}")


# --------------------------------------------------------------------------- demo
@main.command()
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("out/demo"),
              show_default=True, help="Where the demo writes its model, data and results.")
@click.option("--runs", type=click.IntRange(min=1), default=200, show_default=True)
@json_option
@quiet_option
@library_call
def demo(out_dir, runs, as_json, quiet):
    """The main job on the embedded default: digits CNN -> int8, fidelity, float vs int8 latency."""
    from .demo import run_demo

    r = run_demo(out_dir, runs=runs, progress=_progress(quiet, as_json))
    if as_json:
        emit_json({k: v for k, v in r.items() if k != "convert_result"})
        return
    print_demo(r, runs)


if __name__ == "__main__":
    main()
