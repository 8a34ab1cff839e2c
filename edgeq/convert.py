"""`edgeq convert`: source model -> calibrated, planned, verified .tflite + manifest.

The straight line: load source -> calibration data -> plan (profile) -> quantize -> read ops back ->
fidelity on held-out samples -> (accuracy budget loop) -> runtime compatibility -> write atomically.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .calibration import CalibrationConfig, CalibrationData, calibration_texts, load_calibration
from .defaults import MIN_RECOMMENDED_CALIB
from .errors import CalibrationError, IncompatibleModelError, QuantizationError
from .files import atomic_write, atomic_write_json, check_output, sha256_bytes
from .litert_quant import RECIPE_PRECISION, per_op_from_plan
from .plan import plan_precision
from .manifest import SCHEMA, manifest_path, now, versions
from .progress import SILENT, Progress
from .quantize import IoType, QuantizeRequest, Scheme, check_io, check_litert, quantize, uses_converter
from .sources import SourceModel, detect_format, load_source
from .tflite_model import ModelInfo, read_model
from .validate import Fidelity, looks_like_class_scores, fidelity, run_model


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
    percentile: float = 99.99
    # Hugging Face sources
    seq_len: int = 128
    pooling: str = "mean"
    split_outliers: float | None = None  # None: 8.0 when the scheme has static activations, 0: off
    smoothquant: float | None = None


@dataclass
class ConvertResult:
    output: Path
    manifest_path: Path
    manifest: dict
    warnings: list[str] = field(default_factory=list)
    source: SourceModel | None = None


def convert(model: Path | str, opts: ConvertOptions, progress: Progress = SILENT) -> ConvertResult:
    model = Path(model)
    out = Path(opts.output)
    mpath = manifest_path(out)
    inputs = [model, opts.calib.source if opts.calib and opts.calib.source != "random" else None,
              opts.calib.tokenizer if opts.calib else None]
    check_output(out, inputs, opts.force)
    check_output(mpath, inputs, opts.force)

    fmt = detect_format(model)  # a wrong file fails before any slow work
    profile = _load_profile(opts) if opts.device else None
    scheme = opts.scheme or _default_scheme(profile, fmt)
    io = opts.io or (_profile_io(profile, scheme) if profile else IoType.FLOAT32)
    _check_options(opts, scheme, io)

    with progress.task(f"Loading {model.name} and converting it to float TFLite"):
        # With an accuracy budget ops may move to float, and the grouped graph's many small ops
        # would make the budget loop long: group only for a plain all-int8 target.
        integer_only = _integer_only(profile, scheme) and opts.budget is None
        source = load_source(model, **_source_options(opts, scheme, fmt, integer_only))
    calib_cfg = opts.calib or CalibrationConfig("random", samples=1, eval_samples=20)
    data = load_calibration(calib_cfg, source.inputs, source.make_text_samples)
    eval_samples = list(progress.iter(data.evaluation(), "Loading held-out samples", len(data.eval_indices)))
    reference = run_model(source.float_tflite, eval_samples) if eval_samples else None
    if opts.budget and opts.budget.metric == "top1" and not any(
            looks_like_class_scores(n, r.reshape(r.shape[0], -1)) for n, r in reference.items()):
        raise QuantizationError("--metric top1 needs an output that looks like class scores; use --metric cosine")
    float_info = read_model(source.float_tflite)

    plan = plan_precision(list(float_info.ops), profile, min_weight_elements=0) if profile else None
    adjust = (_range_hook(source, data, opts.range_method, opts.percentile, progress)
              if scheme.needs_calibration else None)
    req = QuantizeRequest(scheme, io, per_op_from_plan(plan), adjust)
    if not uses_converter(source, req):
        check_litert(source, req, "--calibration " + opts.range_method if adjust else "")

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
    warnings = list(source.notes) + _data_warnings(data, scheme, opts)
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
    return ConvertResult(out, mpath, manifest, warnings, source)


# Outlier channels (MiniLM's [CLS] drives FFN-down outputs to ~190 while 99.9% stay < 1.5) get their own
# Linear when activations are static int8; measured on MiniLM: cosine 0.944 -> 0.990 (docs/transformers.md).
DEFAULT_SPLIT_OUTLIERS = 8.0
# Magnitude-tier factor for outlier grouping (MiniLM all-int8, seq 128: factor 8 0.976, 2 0.985, 1.5 0.986).
DEFAULT_GROUP_OUTLIERS = 2.0


def _default_scheme(profile, fmt: str) -> Scheme:
    if profile is not None:
        return _profile_scheme(profile)
    # Transformer encoders lose badly in plain full int8; dynamic-range keeps cosine 0.999 at ~3x.
    return Scheme.DYNAMIC if fmt == "hf" else Scheme.INT8


def _integer_only(profile, scheme: Scheme) -> bool:
    """Will every op be int8? Full int8 without a profile, or a profile whose accelerator and
    fallback take int8 only (Edge TPU). CPU/GPU profiles keep some ops float or hybrid."""
    if scheme is not Scheme.INT8:
        return False
    if profile is None:
        return True
    accel = profile.accelerator
    return accel is not None and {str(p) for p in accel.precisions} == {"int8"} and str(accel.fallback_precision) == "int8"


def _source_options(opts: ConvertOptions, scheme: Scheme, fmt: str, integer_only: bool = False) -> dict:
    if fmt != "hf":
        return {}
    split = opts.split_outliers
    if split is None:
        split = DEFAULT_SPLIT_OUTLIERS if scheme.needs_calibration else 0
    texts = calibration_texts(opts.calib) if opts.calib else None
    if (split or opts.smoothquant is not None) and not texts:
        if opts.split_outliers or opts.smoothquant is not None:
            raise CalibrationError("--split-outliers/--smoothquant need text calibration data: --calib FILE.txt")
        split = 0
    # In an all-int8 graph the residual adds and LayerNorms see the outliers too (sources/hf_grouping.py);
    # --split-outliers 0 turns both rewrites off.
    group = DEFAULT_GROUP_OUTLIERS if split and integer_only and opts.smoothquant is None else None
    return {"seq_len": opts.seq_len, "pooling": opts.pooling, "split_outliers": split or None,
            "group_outliers": group, "smoothquant": opts.smoothquant, "calib_texts": texts}


def _check_options(opts: ConvertOptions, scheme: Scheme, io: IoType) -> None:
    """Option combinations that cannot work fail before any slow step."""
    check_io(scheme, io)
    if scheme.needs_calibration and opts.calib is None:
        raise CalibrationError(f"--scheme {scheme.value} needs calibration data: pass --calib DIR|FILE.npy|"
                               "FILE.npz|FILE.txt (or --calib random for an uncalibrated model)")
    if opts.range_method != "minmax" and not scheme.needs_calibration:
        raise CalibrationError(f"--calibration {opts.range_method} selects activation ranges; --scheme "
                               f"{scheme.value} has none (use int8 or int16x8)")
    if opts.budget is not None:
        if scheme is Scheme.FP16 or io not in (IoType.FLOAT32, IoType.INT8):
            raise QuantizationError(f"--max-drop works with --scheme int8/int16x8/dynamic and --io float32/int8 "
                                    f"(got --scheme {scheme.value} --io {io.value})")
        if opts.calib is not None and opts.calib.eval_samples == 0:
            raise CalibrationError("--max-drop needs held-out samples: use --eval-samples > 0")


def _data_warnings(data: CalibrationData, scheme: Scheme, opts: ConvertOptions) -> list[str]:
    out = []
    if opts.calib is None:
        out.append(f"fidelity measured on {len(data.eval_indices)} random inputs (no --calib); pass --calib "
                   "DATA for numbers that mean something")
        return out
    if not data.calibrated and scheme.needs_calibration:
        out.append("UNCALIBRATED: calibrated on random data (--calib random); ranges and fidelity "
                   "are not meaningful for real inputs")
    n = len(data.calib_indices)
    if scheme.needs_calibration and data.calibrated and n < MIN_RECOMMENDED_CALIB:
        out.append(f"calibrated on only {n} sample(s); the TFLite docs recommend 100-500 representative samples")
    if not data.eval_indices:
        out.append("no held-out samples: fidelity was not measured (give more data or --eval-samples > 0)")
    return out


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


def _planned_off_int8(plan, op) -> bool:
    if plan is None:
        return False
    out = op.outputs[0].name if op.outputs else ""
    return any(e.output == out and RECIPE_PRECISION.get(str(e.precision)) in ("float", "hybrid")
               for e in plan.entries)


def _plan_mismatches(plan, info: ModelInfo) -> list[str]:
    """Every planned op, found by its output tensor name in the produced model, must match."""
    by_output = {op.outputs[0].name: op for op in info.ops if op.outputs}
    bad = []
    for e in plan.entries:
        want = RECIPE_PRECISION.get(str(e.precision), str(e.precision))
        op = by_output.get(e.output)
        if op is None or op.precision == "other" or want not in ("int8", "hybrid", "float", "int16x8"):
            continue
        if op.precision != want:
            bad.append(f"#{e.index} {e.op} planned {want}, file has {op.precision}")
    return bad


def _range_hook(source: SourceModel, data: CalibrationData, method: str, percentile: float, progress: Progress):
    if method in (None, "minmax"):
        return None
    from .ranges import RangeMethod, select_ranges

    m = RangeMethod(method)
    samples_cache: list = []

    def hook(base: dict) -> dict:
        if not samples_cache:  # histograms need every sample in memory once (range methods only)
            samples_cache.extend(data.calibration())
        with progress.task(f"Selecting activation ranges ({m.value})"):
            return select_ranges(source.float_tflite, samples_cache, m, base, percentile=percentile)

    return hook


def _manifest(model: Path, out: Path, source: SourceModel, scheme: Scheme, io: IoType, data: CalibrationData,
              opts: ConvertOptions, plan, info: ModelInfo, fid: Fidelity | None, budget, compat, qbytes: bytes,
              warnings: list[str]) -> dict:
    calib = data.describe() if opts.calib is not None else {"kind": "none", "calibrated": False,
                                                            "eval_kind": "random"}
    calib["range_method"] = opts.range_method
    if calib.get("source") and calib["source"] != "random":
        calib["source"] = str(Path(calib["source"]).resolve())
    return {
        "schema": SCHEMA,
        "created": now(),
        "edgeq_version": versions()["edgeq"],
        "output": {"path": out.name, "sha256": sha256_bytes(qbytes), "bytes": len(qbytes)},
        "source": {"path": str(model.resolve()), "format": source.format, "sha256": source.sha256,
                   "float_bytes": len(source.float_tflite), "float_sha256": sha256_bytes(source.float_tflite),
                   "description": source.description},
        "scheme": scheme.value,
        "calibrated": bool(data.calibrated) or not scheme.needs_calibration,
        "device": opts.device,
        "io": {"inputs": [t.to_json() for t in info.inputs], "outputs": [t.to_json() for t in info.outputs]},
        "calibration": calib,
        "plan": plan.to_json() if plan is not None else None,
        "ops": [op.to_json() for op in info.ops],
        "op_summary": info.op_summary(),
        "fidelity": ({**fid.to_json(), "inputs": "held-out" if opts.calib is not None else "random"}
                     if fid else None),
        "budget": budget,
        "compatibility": compat.to_json() if compat is not None else None,
        "sizes": {"float_bytes": len(source.float_tflite), "quantized_bytes": len(qbytes),
                  "ratio": len(source.float_tflite) / max(len(qbytes), 1)},
        "warnings": warnings,
        "versions": versions(),
    }
