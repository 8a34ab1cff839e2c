"""`edgeq convert`: source model -> calibrated, planned, verified .tflite + manifest.

The straight line: load source -> calibration data -> plan (profile) -> quantize -> read ops back ->
fidelity on held-out samples -> (accuracy budget loop) -> runtime compatibility -> write atomically.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .calibration import CalibrationConfig, CalibrationData, load_calibration
from .errors import CalibrationError, IncompatibleModelError, QuantizationError
from .files import atomic_write, atomic_write_json, check_output
from .litert_quant import OpPrecision
from .manifest import SCHEMA, manifest_path, now, sha256, versions
from .progress import SILENT, Progress
from .quantize import IoType, QuantizeRequest, Scheme, check_io, quantize
from .sources import SourceModel, detect_format, load_source
from .tflite_model import ModelInfo, read_model
from .validate import Fidelity, fidelity, run_model


@dataclass(frozen=True)
class BudgetOptions:
    max_drop: float
    metric: str = "cosine"  # cosine | top1 | rel_l2
    max_steps: int = 12


@dataclass(frozen=True)
class ConvertOptions:
    output: Path
    scheme: Scheme | None = None  # None: the device profile's scheme, else int8
    io: IoType | None = None  # None: the device profile's I/O type, else float32
    calib: CalibrationConfig | None = None
    device: str | None = None
    devices_dir: str | None = None
    strict: bool = False
    force: bool = False
    allow_incompatible: bool = False
    budget: BudgetOptions | None = None
    range_method: str = "minmax"
    seq_len: int = 128
    pooling: str = "mean"


@dataclass
class ConvertResult:
    output: Path
    manifest_path: Path
    manifest: dict
    warnings: list[str] = field(default_factory=list)


def convert(model: Path | str, opts: ConvertOptions, progress: Progress = SILENT) -> ConvertResult:
    model = Path(model)
    out = Path(opts.output)
    mpath = manifest_path(out)
    check_output(out, [model], opts.force)
    check_output(mpath, [model], opts.force)
    detect_format(model)  # a wrong file fails before any slow work

    profile = _load_profile(opts) if opts.device else None
    scheme = opts.scheme or (_profile_scheme(profile) if profile else Scheme.INT8)
    io = opts.io or (_profile_io(profile, scheme) if profile else IoType.FLOAT32)
    check_io(scheme, io)
    if scheme.needs_calibration and opts.calib is None:
        raise CalibrationError(f"--scheme {scheme.value} needs calibration data: pass --calib DIR|FILE.npy|"
                               "FILE.npz|FILE.txt (or --calib random for an uncalibrated model)")

    with progress.task(f"Loading {model.name} and converting it to float TFLite"):
        source = load_source(model, seq_len=opts.seq_len, pooling=opts.pooling)
    calib_cfg = opts.calib or CalibrationConfig("random", samples=1, eval_samples=20)
    data = load_calibration(calib_cfg, source.inputs, source.make_text_samples)
    eval_samples = list(progress.iter(iter(data.evaluation()), "Loading held-out samples", len(data.eval_indices)))
    reference = run_model(source.float_tflite, eval_samples) if eval_samples else None
    float_info = read_model(source.float_tflite)

    plan = _plan(float_info, profile, None) if profile else None
    adjust = _range_hook(source, data, opts.range_method, progress)
    req = QuantizeRequest(scheme, io, _per_op(plan), adjust)

    def calibration():
        total = len(data.calib_indices)
        return progress.iter(data.calibration(), "Calibrating", total) if scheme.needs_calibration else iter(())

    with progress.task(f"Quantizing ({scheme.value})"):
        qbytes = quantize(source, req, calibration)
    fid = fidelity(source.float_tflite, qbytes, eval_samples, reference) if eval_samples else None

    budget_report = None
    if opts.budget is not None:
        from .budget import run_budget
        qbytes, plan, fid, budget_report = run_budget(
            source, float_info, profile, scheme, io, data, eval_samples, reference, qbytes, plan, fid,
            opts.budget, adjust, progress)

    info = read_model(qbytes)
    warnings = list(source.notes)
    mismatches = _plan_mismatches(plan, info) if plan else []
    stayed_float = [op for op in info.float_ops() if not _planned_off_int8(plan, op)]
    if scheme is Scheme.INT8 and stayed_float:
        names = ", ".join(f"#{op.index} {op.name}" for op in stayed_float[:8])
        msg = f"{len(stayed_float)} op(s) stayed float under --scheme int8: {names}"
        if opts.strict:
            raise QuantizationError(msg + " (--strict); plan them float/hybrid with --device, or drop --strict")
        warnings.append(msg)
    if mismatches:
        msg = "the produced model disagrees with the plan: " + "; ".join(mismatches[:6])
        if opts.strict:
            raise QuantizationError(msg + " (--strict)")
        warnings.append(msg)
    if not data.calibrated and scheme.needs_calibration:
        warnings.append("UNCALIBRATED: calibrated on random data (--calib random); ranges and fidelity "
                        "are not meaningful for real inputs")

    compat = None
    if profile is not None:
        from .compat import check_model
        compat = check_model(qbytes, profile)
        if not compat.ok:
            if not opts.allow_incompatible:
                raise IncompatibleModelError(f"{profile.id}: {compat.summary}; pass --allow-incompatible "
                                             "to write it anyway")
            warnings.append(f"written despite incompatibility with {profile.id}: {compat.summary}")

    manifest = _manifest(model, out, source, scheme, io, data, opts, plan, info, fid, budget_report,
                         compat, qbytes, warnings)
    atomic_write(out, qbytes)
    try:
        atomic_write_json(mpath, manifest)
    except BaseException:
        out.unlink(missing_ok=True)  # no model without its manifest
        raise
    return ConvertResult(out, mpath, manifest, warnings)


def _load_profile(opts: ConvertOptions):
    from .profiles import load_profile
    return load_profile(opts.device, devices_dir=opts.devices_dir)


def _profile_scheme(profile) -> Scheme:
    by_precision = {"int8": Scheme.INT8, "int16x8": Scheme.INT16X8, "hybrid": Scheme.DYNAMIC, "fp16": Scheme.FP16}
    if str(profile.scheme) not in by_precision:
        raise QuantizationError(f"{profile.id}: scheme {profile.scheme} is not a quantization scheme; pass --scheme")
    return by_precision[str(profile.scheme)]


def _profile_io(profile, scheme: Scheme) -> IoType:
    """The profile's I/O dtype where the scheme allows it (full-integer only), else float32."""
    want = str(profile.io.input)
    if scheme is Scheme.INT8 and want in ("int8", "uint8"):
        return IoType(want)
    if scheme is Scheme.INT16X8 and want == "int16":
        return IoType.INT16
    return IoType.FLOAT32


def _plan(float_info: ModelInfo, profile, overrides):
    from .plan import plan_precision
    # min_weight_elements=0: the LiteRT quantizer (litert_quant.py) makes any weight hybrid, not only >= 1024
    return plan_precision(list(float_info.ops), profile, overrides, min_weight_elements=0)


_RECIPE_PRECISION = {"int8": "int8", "int16x8": "int16x8", "hybrid": "hybrid", "float": "float", "fp16": "float"}


def _per_op(plan) -> tuple[OpPrecision, ...]:
    """Plan entries as recipe lines (ops with nothing to quantize are left to the quantizer)."""
    if plan is None:
        return ()
    return tuple(OpPrecision(e.op, e.output, _RECIPE_PRECISION[str(e.precision)])
                 for e in plan.entries if e.output and str(e.precision) in _RECIPE_PRECISION)


def _val(x) -> str:
    return getattr(x, "value", x)


def _planned_off_int8(plan, op) -> bool:
    if plan is None:
        return False
    out = op.outputs[0].name if op.outputs else ""
    return any(e.output == out and _val(e.precision) in ("float", "hybrid") for e in plan.entries)


def _plan_mismatches(plan, info: ModelInfo) -> list[str]:
    """Every planned op, found by its output tensor name in the produced model, must match."""
    by_output = {op.outputs[0].name: op for op in info.ops if op.outputs}
    bad = []
    for e in plan.entries:
        want = _val(e.precision)
        op = by_output.get(e.output)
        want = _RECIPE_PRECISION.get(want, want)
        if op is None or op.precision == "other" or want not in ("int8", "hybrid", "float", "int16x8"):
            continue
        if op.precision != want:
            bad.append(f"#{e.index} {e.op} planned {want}, file has {op.precision}")
    return bad


def _range_hook(source: SourceModel, data: CalibrationData, method: str, progress: Progress):
    if method in (None, "minmax"):
        return None
    from .ranges import RangeMethod, select_ranges

    m = RangeMethod(method)
    samples_cache: list = []

    def hook(base: dict) -> dict:
        if not samples_cache:
            samples_cache.extend(data.calibration())
        with progress.task(f"Selecting activation ranges ({m.value})"):
            return select_ranges(source.float_tflite, samples_cache, m, base)

    return hook


def _manifest(model: Path, out: Path, source: SourceModel, scheme: Scheme, io: IoType, data: CalibrationData,
              opts: ConvertOptions, plan, info: ModelInfo, fid: Fidelity | None, budget, compat, qbytes: bytes,
              warnings: list[str]) -> dict:
    calib = data.describe() if opts.calib is not None else {"kind": "none", "calibrated": False,
                                                            "eval_kind": "random"}
    calib["range_method"] = opts.range_method
    return {
        "schema": SCHEMA,
        "created": now(),
        "edgeq_version": versions()["edgeq"],
        "output": {"path": out.name, "sha256": sha256(qbytes), "bytes": len(qbytes)},
        "source": {"path": str(model), "format": source.format, "sha256": source.sha256,
                   "float_bytes": len(source.float_tflite), "float_sha256": sha256(source.float_tflite),
                   "description": source.description},
        "scheme": scheme.value,
        "calibrated": bool(data.calibrated) or not scheme.needs_calibration,
        "device": opts.device,
        "io": {"inputs": [t.to_json() for t in info.inputs], "outputs": [t.to_json() for t in info.outputs]},
        "calibration": calib,
        "plan": plan.to_json() if plan is not None else None,
        "ops": [op.to_json() for op in info.ops],
        "op_summary": info.op_summary(),
        "fidelity": fid.to_json() if fid else None,
        "budget": budget,
        "compatibility": compat.to_json() if compat is not None else None,
        "sizes": {"float_bytes": len(source.float_tflite), "quantized_bytes": len(qbytes),
                  "ratio": len(source.float_tflite) / max(len(qbytes), 1)},
        "warnings": warnings,
        "versions": versions(),
    }
