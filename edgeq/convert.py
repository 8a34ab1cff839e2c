"""`edgeq convert`: source model -> calibrated, planned, verified .tflite + manifest.

The straight line: load source -> calibration data -> plan (profile) -> quantize -> read ops back ->
fidelity on held-out samples -> (accuracy budget loop) -> runtime compatibility -> write atomically.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .calibration import CalibrationConfig, CalibrationData, calibration_texts, load_calibration
from .defaults import MIN_RECOMMENDED_CALIB
from .errors import CalibrationError, EdgeqError, IncompatibleModelError, QuantizationError
from .files import atomic_write, check_output
from .litert_quant import per_op_from_plan
from .manifest import ManifestParts, build_manifest, manifest_path, write_manifest
from .plan import default_scheme, integer_only, plan_precision, profile_io
from .precision import IoType, Scheme, check_io
from .progress import SILENT, Progress
from .quantize import LITERT_IO, QuantizeRequest, check_litert, check_litert_io, quantize, uses_converter
from .sources import SourceModel, detect_format, load_source
from .tflite_model import read_model
from .validate import looks_like_class_scores, fidelity, run_model


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
    scheme = opts.scheme or default_scheme(profile, fmt)
    io = opts.io or (profile_io(profile, scheme) if profile else IoType.FLOAT32)
    _check_options(opts, scheme, io)

    with progress.task(f"Loading {model.name} and converting it to float TFLite"):
        # With an accuracy budget ops may move to float, and the grouped graph's many small ops
        # would make the budget loop long: group only for a plain all-int8 target.
        all_int8 = integer_only(profile, scheme) and opts.budget is None
        source = load_source(model, **_source_options(opts, scheme, fmt, all_int8))
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
    mismatches = plan.mismatches(info) if plan else []
    stayed_float = [op for op in info.float_ops() if not (plan and plan.planned_off_int8(op))]
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

    manifest = build_manifest(ManifestParts(
        model=model, output=out, model_bytes=qbytes, source=source, scheme=scheme, io=io, device=opts.device,
        calibration=data, user_calibration=opts.calib is not None, range_method=opts.range_method, plan=plan,
        info=info, fidelity=fid, budget=budget_report, compatibility=compat, warnings=tuple(warnings)))
    atomic_write(out, qbytes)
    try:
        write_manifest(mpath, manifest)
    except BaseException:
        out.unlink(missing_ok=True)  # no model without its manifest
        raise
    return ConvertResult(out, mpath, manifest, warnings, source)


# Outlier channels (MiniLM's [CLS] drives FFN-down outputs to ~190 while 99.9% stay < 1.5) get their own
# Linear when activations are static int8; measured on MiniLM: cosine 0.944 -> 0.990 (docs/transformers.md).
DEFAULT_SPLIT_OUTLIERS = 8.0
# Magnitude-tier factor for outlier grouping (MiniLM all-int8, seq 128: factor 8 0.976, 2 0.985, 1.5 0.986).
DEFAULT_GROUP_OUTLIERS = 2.0


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


def usage_mistake(opts: ConvertOptions) -> str | None:
    """A combination of the options as given that cannot work, found without the model or the device
    profile (the CLI reports it as a usage error); None when the given options fit together."""
    try:
        _check_options(opts, opts.scheme, opts.io)
    except EdgeqError as e:
        return str(e)
    return None


def _check_options(opts: ConvertOptions, scheme: Scheme | None, io: IoType | None) -> None:
    """Option combinations that cannot work fail before any slow step. A None scheme/io is not known
    yet (the device profile or the model decides it): the checks that need it are skipped."""
    if scheme is not None and io is not None:
        check_io(scheme, io)
    if scheme is not None and scheme.needs_calibration and opts.calib is None:
        raise CalibrationError(f"--scheme {scheme.value} needs calibration data: pass --calib DIR|FILE.npy|"
                               "FILE.npz|FILE.txt (or --calib random for an uncalibrated model)")
    if opts.range_method != "minmax":
        if scheme is not None and not scheme.needs_calibration:
            raise CalibrationError(f"--calibration {opts.range_method} selects activation ranges; --scheme "
                                   f"{scheme.value} has none (use int8 or int16x8)")
        if io is not None:
            check_litert_io(io, f"--calibration {opts.range_method}")  # range selection needs the LiteRT quantizer
    if opts.budget is not None:
        if scheme is Scheme.FP16 or (io is not None and io not in LITERT_IO):  # the loop re-quantizes with LiteRT
            got = " ".join(f"{flag} {v.value}" for flag, v in (("--scheme", scheme), ("--io", io)) if v is not None)
            raise QuantizationError(f"--max-drop works with --scheme int8/int16x8/dynamic and --io float32/int8 "
                                    f"(got {got})")
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

