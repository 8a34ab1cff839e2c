"""`edgeq convert`: source model -> calibrated, planned, verified .tflite + manifest.

The straight line: load source -> calibration data -> (--max-size: the most accurate scheme whose
file fits) -> plan (the profile's; without one, an int4 scheme's) -> quantize (static int8: at the
--optimize level, measured on calibration samples) -> read ops back -> fidelity on held-out samples
-> accuracy target (the user's --max-drop, else the default fidelity floor; the budget loop when the
first result misses it) -> with little data, recalibrate on every sample -> runtime compatibility ->
write atomically. The target, plan and little-data parts live in convert_policy.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

from .accuracy_target import budget_target
from .blas import one_blas_thread
from .budget import ANALYSIS_SAMPLES, MAX_PROBES, BudgetContext, run_budget
from .calibration import CalibrationConfig, CalibrationData, calibration_texts, load_calibration
from .convert_policy import choose_target, conversion_plan, data_warnings, int4_notes, keep_refit, refit_data
from .errors import CalibrationError, EdgeqError, IncompatibleModelError, ModelFormatError, QuantizationError
from .fidelity import check_finite, fed_back, fidelity, run_model
from .files import check_output, write_all
from .float_joins import note as joins_note, written as float_joins_written
from .int8_hazards import INT8_ACTIVATIONS, divisor_hazards, note as hazard_note
from .litert_quant import Requantizer, per_op_from_plan
from .manifest import ManifestParts, build_manifest, manifest_path, manifest_text, samples_path
from .optimize import (OptimizeLevel, OptimizeResult, gptq_finisher, model_key, loop_requantizer, optimize_mistake,
                       optimize_report, resolve_level)
from .plan import default_scheme, int8_accelerator, integer_only, profile_io
from .precision import IoType, Scheme, check_io
from .pixel_scale import photo_scale
from .progress import SILENT, Progress
from .quantize import (LITERT_IO, KeptCalibration, QuantizeRequest, check_litert, check_litert_io, int8_hazard,
                       quantize, uses_converter)
from .signature import rename_signature
from .size_plan import SizeRequest, plan_for_size
from .sources import SourceModel, detect_format, for_int8_activations, for_int16_activations, load_source
from .sources.shapes import dims, dynamic_inputs_error, is_dynamic, pin_tflite
from .tflite_model import read_model


@dataclass(frozen=True)
class BudgetOptions:
    max_drop: float
    metric: str = "cosine"  # cosine | top1 | rel_l2
    max_steps: int = MAX_PROBES  # quantize-and-measure probes the loop may spend


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
    budget: BudgetOptions | None = None  # --max-drop; None: the default fidelity floor (unless floor=False)
    range_method: str = "minmax"
    percentile: float = 99.99
    # Hugging Face sources
    seq_len: int = 128
    pooling: str | None = None  # Hugging Face: None = the config's classification head, else mean
    split_outliers: float | None = None  # None: 8.0 when the scheme has static activations, 0: off
    smoothquant: float | None = None
    floor: bool = True  # without --max-drop: refuse a result below the default fidelity floor (--no-floor)
    class_outputs: tuple[str, ...] = ()  # outputs the user says are class scores (--class-output)
    input_shapes: tuple[tuple[int, ...], ...] = ()  # Keras, SavedModel, torch.export: static shape per input
    # --optimize: None = fast where the methods apply (static int8 on real calibration data with the
    # quantizer's own min-max ranges), else none; edgeq/optimize.py
    optimize: OptimizeLevel | None = None
    max_size: int | None = None  # --max-size in bytes: the most accurate scheme whose file fits (size_goal.py)
    trust_model: bool = False  # Keras: load Lambda layers (Python code in the file; Keras' safe_mode=False)

    def __post_init__(self):
        # A library caller's io="float32" compared unequal (`is`) to IoType.FLOAT32 and was dropped silently.
        for name, kind in (("scheme", Scheme), ("io", IoType), ("optimize", OptimizeLevel)):
            value = getattr(self, name)
            if value is not None and not isinstance(value, kind):
                object.__setattr__(self, name, kind(value))


@dataclass
class ConvertResult:
    output: Path
    manifest_path: Path
    manifest: dict
    warnings: list[str] = field(default_factory=list)
    source: SourceModel | None = None


@one_blas_thread
def convert(model: Path | str, opts: ConvertOptions, progress: Progress = SILENT) -> ConvertResult:
    model = Path(model)
    out = Path(opts.output)
    mpath = manifest_path(out)
    spath = samples_path(out)
    inputs = [model, opts.calib.source if opts.calib and opts.calib.source != "random" else None,
              opts.calib.tokenizer if opts.calib else None]
    check_output(out, inputs, opts.force)
    check_output(mpath, inputs, opts.force)
    check_output(spath, inputs, opts.force)

    fmt = detect_format(model)  # a wrong file fails before any slow work
    if opts.trust_model and fmt != "keras":
        raise ModelFormatError(f"--trust-model applies to Keras .keras/.h5 files (their Lambda layers); "
                               f"{model.name} is a {fmt} model")
    if opts.input_shapes and fmt not in PINNABLE:
        how = "--seq-len sets its sequence length" if fmt == "hf" else "its shapes were fixed when it was exported"
        raise CalibrationError(f"--input-shape applies to Keras, SavedModel and torch.export sources; "
                               f"{model.name} is a {fmt} model ({how})")
    profile = _load_profile(opts) if opts.device else None
    scheme = opts.scheme or default_scheme(profile, fmt)
    io = opts.io or (profile_io(profile, scheme) if profile else IoType.FLOAT32)
    _check_options(opts, scheme, io)

    with progress.task(f"Loading {model.name} and converting it to float TFLite"):
        # With an accuracy target ops may move to float, and the grouped graph's many small ops
        # make the budget loop's regions large: group only for an all-int8 target without --max-drop.
        all_int8 = integer_only(profile, scheme) and opts.budget is None
        source = load_source(model, **_source_options(opts, scheme, fmt, all_int8))
        if any(is_dynamic(s.shape) for s in source.inputs):
            source = _static_source(model, source, fmt, opts, _source_options(opts, scheme, fmt, all_int8))
        if scheme in (Scheme.INT8, Scheme.INT4X8):
            source = for_int8_activations(source, int8_accelerator(profile))
        elif scheme is Scheme.INT16X8:
            source = for_int16_activations(source)
    if profile is not None and not opts.allow_incompatible:
        from .compat import missing_custom_ops

        if missing := missing_custom_ops(source.float_tflite, profile):
            raise IncompatibleModelError(f"{profile.id}: custom op(s) {', '.join(missing)} are not built into "
                                         f"{profile.runtime.label}: the model cannot load there; choose another "
                                         "--device, or pass --allow-incompatible to write it anyway")
    class_outputs = _class_outputs(opts, source)
    calib_cfg = opts.calib or CalibrationConfig("random", samples=1, eval_samples=20)
    calib_cfg, pixel_note = photo_scale(calib_cfg, source)
    if pixel_note:
        source = dataclasses.replace(source, notes=source.notes + (pixel_note,))
    data = load_calibration(calib_cfg, source.inputs, source.make_text_samples)
    eval_samples = list(progress.iter(data.evaluation(), "Loading held-out samples", len(data.eval_indices)))
    reference = run_model(source.float_tflite, eval_samples) if eval_samples else None
    if reference is not None:
        check_finite(reference, labels=[f"{Path(data.source).name}[{i}]" for i in data.eval_indices])
        class_outputs, top1_note = _top1_outputs(opts, class_outputs, reference)
        if top1_note:
            source = dataclasses.replace(source, notes=source.notes + (top1_note,))
    source_outputs = _source_outputs(source, opts, data, eval_samples, reference, class_outputs)
    float_info = read_model(source.float_tflite)

    # int4 weights: the level is GPTQ rounding, applied to every quantization of the LiteRT path
    # (--max-size's mixes, the first result, the budget loop's probes, a refit) with one cache.
    gptq_reports: dict[bytes, dict] = {}
    gptq_finish = (gptq_finisher(source.float_tflite, lambda: list(data.calibration()), gptq_reports,
                                 progress.note)
                   if data.calibrated and opts.optimize is not OptimizeLevel.NONE else None)
    size_goal, size_mix = None, None
    range_hook = _range_hook(source, data, opts.range_method, opts.percentile, progress)
    if opts.max_size is not None:  # the most accurate scheme whose file fits, before the slow steps
        scheme, size_goal, size_mix = plan_for_size(
            SizeRequest(opts.max_size, opts.scheme is not None or profile is not None, scheme, io, range_hook,
                        gptq_finish, _budget_test(opts)),
            source, data, profile, float_info, eval_samples, reference, class_outputs, progress)
    plan = conversion_plan(float_info, profile, scheme, size_mix)
    adjust = range_hook if scheme.needs_calibration else None
    req = QuantizeRequest(scheme, io, per_op_from_plan(plan), adjust)
    converter = uses_converter(source, req)
    _refuse_loops(model, source, scheme)
    if not converter:
        check_litert(source, req, "--calibration " + opts.range_method if adjust else
                     "a DIV kept float (its divisor is computed from the input)" if int8_hazard(source, req) else "")
    level, level_why = resolve_level(opts.optimize, scheme, io, data.calibrated, opts.range_method)
    finish = gptq_finish if scheme.is_int4 and level is not OptimizeLevel.NONE else None
    # The LiteRT path calibrates once for the first result, the budget loop and a little-data refit.
    requant = _requantizer(source, scheme, io, data, adjust, progress, finish) if _loop_can_run(scheme, io) else None
    optimized: OptimizeResult | None = None
    superseded = None  # why the written model is not the optimized one

    def calibration():
        total = len(data.calib_indices)
        return progress.iter(data.calibration(), "Calibrating", total) if scheme.needs_calibration else iter(())

    qbytes = None
    if level is not OptimizeLevel.NONE and finish is None:
        optimized, unusable = _optimize(source, data, req, level, class_outputs, profile, progress)
        if optimized is None:  # never worse than without: the quantizer's own ranges
            level, level_why = OptimizeLevel.NONE, unusable
        else:
            qbytes, converter = optimized.model, False
    kept = KeptCalibration()  # a little-data refit feeds the converter's calibrator only the rest
    if qbytes is None and (converter or requant is None):
        with progress.task(f"Quantizing ({scheme.value})"):
            qbytes = quantize(source, req, calibration, kept)
    elif qbytes is None:
        if scheme.needs_calibration:
            requant.ranges()  # calibrates (its own progress bar)
        with progress.task(f"Quantizing ({scheme.value})"):
            qbytes = requant.quantize(req.per_op)
    fid = fidelity(source.float_tflite, qbytes, eval_samples, reference, class_outputs) if eval_samples else None

    warnings = list(source.notes) + (int4_notes(plan, scheme) if plan else [])
    if (level_why or "").startswith("--optimize"):  # the level ran but made a model the runtime refused
        warnings.append(level_why)
    target, skipped = choose_target(opts, fid, data)
    budget_report = None
    if target is not None:
        if io is not IoType.FLOAT32 and not target.met(fid):  # what no op precision wins back, first
            from .io_rounding import refuse_lost_in_io
            refuse_lost_in_io(target, source.float_tflite, qbytes, eval_samples, reference, class_outputs)
        if requant is None and not target.met(fid):
            raise QuantizationError(f"{'fidelity floor' if target.floor else 'accuracy budget'} not met, nothing "
                                    f"written: {target.reached(fid)}; "
                                    + (f"{silence}; " if (silence := target.silence(fid)) else "")
                                    + f"the budget loop that would move ops out of "
                                    f"{scheme.value} needs --scheme int8/int16x8/dynamic and --io float32/int8"
                                    + ("; or turn the floor off with --no-floor" if target.floor else ""))
        loop_requant = requant
        if optimized is not None:  # the loop moves ops from the level's model: its weights, ranges, biases
            loop_requant = loop_requantizer(optimized, scheme.op_precision, lambda: list(data.calibration()),
                                            keep_float_io=io is IoType.FLOAT32, progress=progress)
        ctx = BudgetContext(float_info, profile, scheme, loop_requant, eval_samples, reference, class_outputs,
                            _analysis_samples(data), opts.budget.max_steps if opts.budget else MAX_PROBES, progress,
                            size_goal["max_bytes"] if size_goal else None, size_mix or {})
        result = run_budget(ctx, target, qbytes, fid, not converter and optimized is None, plan)
        qbytes, fid, budget_report, plan = result.model, result.fidelity, result.report, result.plan
        req = dataclasses.replace(req, per_op=result.per_op)
        converter = converter and not result.report["loop"]
        if result.report["loop"] and optimized is not None:
            superseded = (f"missed the {'fidelity floor' if target.floor else 'accuracy budget'}; the budget loop "
                          "re-quantized the plans it tried with the level's ranges, weights and bias correction")
    elif skipped:
        budget_report = skipped
        if skipped.get("warning"):
            warnings.append(skipped["warning"])

    data_written, judged_first = data, qbytes
    refit = refit_data(data, opts.calib) if scheme.needs_calibration else None
    if refit is not None:  # little data: the written model is calibrated on every sample
        # The level's choices on every sample, and the loop's plan where it moved ops from the level's
        # model: recalibrating with the quantizer's own ranges wrote a model made unlike the twin judged
        # (resemblyzer: its ranges, rounding and bias correction dropped, and 75 s spent calibrating).
        if optimized is not None:
            optimized_all = _replay(source, refit, req, optimized, progress, len(data.calib_indices))
            if optimized_all is None:  # level best: the level again, measured on every sample
                progress.note(f"--optimize {level.value}: its refined ranges and learned rounding cannot be "
                              f"replayed on all {len(refit.calib_indices)} samples, so the level runs again "
                              f"(about {optimized.seconds:.0f} s more; --optimize fast replays in seconds)")
                optimized_all, _ = _optimize(source, refit, req, level, class_outputs, profile, progress)
            refit_model = optimized_all.model if optimized_all else judged_first
        else:
            refit_model = _recalibrate(source, req, refit, data, requant, converter, opts, progress, kept)
        qbytes, data_written, note = keep_refit(refit_model, refit, data, qbytes, target, fid, lambda m: fidelity(
            source.float_tflite, m, eval_samples, reference, class_outputs))
        if note:
            warnings.append(note)
        elif optimized is not None and superseded is None and optimized_all is not None:
            optimized = optimized_all

    if not converter:  # written by the LiteRT quantizer from the rewritten float model
        warnings += source.int8_rewrites
        if plan is not None and not (budget_report or {}).get("loop"):  # (the loop's plans say so already)
            plan = conversion_plan(float_info, profile, scheme, size_mix, litert=True)
    gptq = gptq_reports.get(model_key(qbytes)) if finish is not None else None  # the written model's GPTQ
    qbytes = rename_signature(qbytes, source.signature_key)  # the user's own name for it, back
    # What is written must satisfy the int8 kernels (shared scales, symmetric filters) whichever
    # backend produced it, and must have run under the target's runtime options.
    qbytes, verification, fid = _enforce_and_verify(qbytes, source.float_tflite, profile, eval_samples, data,
                                                    reference, fid, class_outputs, warnings, progress)
    # With little data the written model was calibrated on the held-out samples too: the source-model table
    # judges the twin, as the fidelity above does (PESTO read int8 cosine 1.0000 there under 0.9817).
    twin = judged_first if source_outputs is not None and data_written is not data else None
    fidelity_source = _source_fidelity(source, source_outputs, verification, class_outputs, twin, eval_samples,
                                       len(data.calib_indices))
    warnings += _source_drift(fidelity_source)
    info = read_model(qbytes)
    warnings += data_warnings(data_written, scheme, opts) + (fid.notes() if fid else [])
    hazards = divisor_hazards(source.float_tflite) if scheme.op_precision in INT8_ACTIVATIONS else {}
    kept_float = [op for op in info.float_ops() if op.outputs and op.outputs[0].name in hazards]
    joins = float_joins_written(info)
    for kept, text in ((kept_float, hazard_note(kept_float)), (joins, joins_note(joins))):
        if kept and opts.strict and scheme is Scheme.INT8:
            raise QuantizationError(text + " (--strict); drop --strict to write them float")
        if kept:
            warnings.append(text)
    stayed_float = [op for op in info.float_ops()
                    if not (plan and plan.planned_off_int8(op)) and op not in kept_float and op not in joins]
    mismatches = plan.mismatches(info, excused=frozenset(hazards)) if plan else []
    if scheme is Scheme.INT8 and stayed_float:
        names = ", ".join(f"#{op.index} {op.name}" for op in stayed_float[:8])
        names += f" and {len(stayed_float) - 8} more" if len(stayed_float) > 8 else ""
        msg = (f"{len(stayed_float)} op(s) stayed float under int8: {names}"
               + ("" if converter else _why_float(stayed_float)))
        if opts.strict:
            # The TFLite converter writes several ops the LiteRT quantizer has no int8 recipe for (MINIMUM, PRELU).
            other = ("--optimize none (the TFLite converter writes some of them int8), "
                     if source.converter is not None and not converter else "")
            raise QuantizationError(msg + f" (--strict); try {other}plan them float/hybrid with --device, or drop "
                                    "--strict")
        warnings.append(msg)
    if mismatches:
        msg = "the produced model disagrees with the plan: " + "; ".join(mismatches[:6])
        if opts.strict:
            raise QuantizationError(msg + " (--strict)")
        warnings.append(msg)

    if size_goal is not None and len(qbytes) > size_goal["max_bytes"]:
        raise QuantizationError(f"--max-size {size_goal['max_bytes'] / 1e6:.2f} MB: the {scheme.value} model is "
                                f"{len(qbytes) / 1e6:.2f} MB after the accuracy target moved ops off {scheme.value}; "
                                "raise --max-size or accept less (--max-drop)")
    compat = None
    if profile is not None:
        from .compat import check_model
        compat = check_model(qbytes, profile)
        if not compat.ok:
            if not opts.allow_incompatible:
                raise IncompatibleModelError(f"{profile.id}: {compat.summary}; pass --allow-incompatible "
                                             "to write it anyway")
            warnings.append(f"written despite incompatibility with {profile.id}: {compat.summary}")
        if compat.low_coverage:  # said in the manifest's notes only, before
            warnings.append(f"{profile.id}: {compat.low_coverage}")

    manifest = build_manifest(ManifestParts(
        model=model, output=out, model_bytes=qbytes, source=source, scheme=scheme, io=io, device=opts.device,
        calibration=data_written, user_calibration=opts.calib is not None, range_method=opts.range_method, plan=plan,
        info=info, fidelity=fid, budget=budget_report, compatibility=compat, warnings=tuple(warnings),
        verification=verification.to_json() if verification else None, fidelity_source=fidelity_source,
        samples={"file": spath.name, "count": min(len(eval_samples), KEPT_SAMPLES)} if eval_samples else None,
        optimize=optimize_report(level, opts.optimize, level_why, optimized, superseded, gptq), size_goal=size_goal))
    # All three or none (a --force rewrite keeps the earlier ones if a write fails): no model without its
    # manifest, no samples without either. The samples are real inputs next to the model:
    # bench/profile/flash feed these by default.
    write_all([(out, qbytes), *([(spath, samples_npz(qbytes, eval_samples[:KEPT_SAMPLES]))] if eval_samples else []),
               (mpath, manifest_text(mpath, manifest))])
    return ConvertResult(out, mpath, manifest, warnings, source)


KEPT_SAMPLES = 8  # held-out samples kept as OUT.samples.npz (enough to cycle through in a benchmark)


def samples_npz(model: bytes, samples: list[dict]) -> bytes:
    """Samples stacked per input ([N, *input shape]) and keyed by the interpreter's input tensor names,
    as device_bench --inputs reads them (on the device there may be no signature runner)."""
    import io

    import numpy as np

    from .signature import signature_runner
    tensor_names = {k: d["name"] for k, d in signature_runner(model).get_input_details().items()}
    buf = io.BytesIO()
    np.savez(buf, **{tensor_names.get(k, k): np.stack([s[k] for s in samples]) for k in samples[0]})
    return buf.getvalue()


def _refuse_loops(model: Path, source: SourceModel, scheme: Scheme) -> None:
    """A Keras/SavedModel graph with a WHILE/IF loop under a calibrated scheme, before any slow work:
    the TFLite converter's calibration segfaulted on a Keras LSTM over None steps (exit 139, no word),
    and the LiteRT quantizer reads nothing inside a loop. (.tflite sources are refused so at load.)"""
    from .litert_quant import control_flow_hint

    if not scheme.needs_calibration or source.converter is None or not (hint := control_flow_hint(source.float_tflite)):
        return
    steps = ("; a Keras LSTM/GRU over None steps is unrolled at the steps --input-shape gives"
             if source.format == "keras" else "")
    raise QuantizationError(f"{model.name}: --scheme {scheme.value} cannot be calibrated{hint}{steps}; or use "
                            "--scheme dynamic (int8 weights, float activations)")


def _why_float(ops) -> str:
    """Why ops stayed float, where the quantizer says: it has no int8 recipe for them."""
    from .litert_quant import quantizer_int8_ops

    try:
        known = quantizer_int8_ops()
    except Exception:  # noqa: BLE001 - a quantizer without this policy table: say nothing rather than fail
        return ""
    kinds = sorted({op.name for op in ops if op.name not in known and not op.is_custom})
    return f" ({', '.join(kinds)}: the LiteRT quantizer has no int8 recipe for them)" if kinds else ""


def _enforce_and_verify(qbytes, float_model, profile, eval_samples, data, reference, fid, class_outputs, warnings,
                        progress):
    from .fidelity import compare, join_parts
    from .int8_clamps import drop_noop_clamps
    from .int8_constraints import enforce
    from .verify import check_runs, runtime_options

    qbytes, enforced = enforce(qbytes)
    warnings.extend(enforced.notes())
    qbytes, _ = drop_noop_clamps(qbytes)  # the same integers, fewer XNNPACK partitions
    samples = eval_samples or list(islice(data.calibration(), 1))
    options = runtime_options(profile)
    with progress.task(f"Running the model under {options.label}"):
        run = check_runs(qbytes, samples, options, reference if eval_samples else None)
    warnings.extend(run.warnings())
    if enforced.changed and eval_samples:  # the parameters moved: judge what is written
        fid = compare(reference, run.outputs, class_outputs, join_parts(float_model), len(eval_samples),
                      fed_back(float_model))
    return qbytes, run, fid


def _source_outputs(source, opts: ConvertOptions, data: CalibrationData, eval_samples, reference,
                    class_outputs: frozenset[str]) -> tuple | None:
    """(the source framework's own outputs on the held-out samples, the float .tflite's fidelity to
    them) for PyTorch programs, or None.

    Where the fidelity floor applies and the float .tflite already misses it against them, the
    conversion to TFLite lost the accuracy, not quantization: refused before quantizing. (TesseraNet,
    through litert-torch: float .tflite cosine 0.49 to PyTorch; the level and the budget loop spent
    297 s, and the refusal then suggested --no-floor.)"""
    if source.reference is None or not eval_samples:
        return None
    import numpy as np

    from .fidelity import compare

    try:
        src = source.reference(eval_samples)
    except (KeyError, ValueError, RuntimeError):  # outputs litert-torch flattened otherwise: not compared
        return None
    if list(src) != list(reference) or any(
            np.asarray(a).size != np.asarray(b).size for a, b in zip(src.values(), reference.values())):
        return None
    fid = compare(src, reference, class_outputs, samples=len(eval_samples), not_class=fed_back(source.float_tflite))
    # The floor the int8 model would be held to (a --max-drop budget is the user's own target: the
    # budget loop and its refusal judge that one against the float .tflite).
    floor = choose_target(opts, fid, data)[0] if opts.budget is None else None
    if floor is not None and floor.floor and not floor.met(fid):
        raise QuantizationError(
            f"the float .tflite converted from the {source.format} model already misses the fidelity floor "
            f"against it, before quantizing: {floor.reached(fid)} on {fid.samples} held-out samples; the "
            "conversion to TFLite lost the accuracy: convert again or export the model differently, or "
            "pass --no-floor to quantize it anyway")
    return src, fid


def _source_fidelity(source, source_outputs, run, class_outputs: frozenset[str], twin: bytes | None = None,
                     eval_samples=(), twin_count: int = 0) -> dict | None:
    """Fidelity against the source framework's own model (PyTorch programs), float and quantized: the
    written model's (`run`), or where it saw the held-out samples, the twin's judged on them."""
    if source_outputs is None:
        return None
    from .fidelity import compare

    src, float_fid = source_outputs
    outputs = run_model(twin, eval_samples) if twin is not None else run.outputs
    out = {"reference": source.format, "float": float_fid.to_json(),
           "quantized": compare(src, outputs, class_outputs, samples=float_fid.samples,
                                not_class=fed_back(source.float_tflite)).to_json()}
    if twin is not None:
        out["quantized_model"] = f"the twin calibrated on the other {twin_count} samples (as fidelity)"
    return out


# The float .tflite itself this far from the source framework's model is a conversion problem, not a
# quantization one: litert-torch's conversion of PaddleOCR v4's text recognizer differed from PyTorch
# by 3e-6 to 0.16 rel. L2 from one process to the next (float cosine 0.929 on a bad draw), while the
# int8 fidelity, judged against that float .tflite, met the floor.
SOURCE_DRIFT_COSINE = 0.99


def _source_drift(fs: dict | None) -> list[str]:
    """A warning per output whose float .tflite is already far from the source model (fidelity_source)."""
    out = []
    for f, q in zip((fs or {}).get("float", {}).get("outputs", []), (fs or {}).get("quantized", {}).get("outputs", [])):
        if f["cosine"] < SOURCE_DRIFT_COSINE:
            out.append(f"output {f['name']}: the float .tflite already differs from the {fs['reference']} model "
                       f"(cosine {f['cosine']:.4f}; the int8 model {q['cosine']:.4f} to it): the conversion to "
                       "TFLite lost accuracy before quantizing, which fidelity vs float cannot show; convert "
                       "again or export the model differently")
    return out


# Outlier channels (MiniLM's [CLS] drives FFN-down outputs to ~190 while 99.9% stay < 1.5) get their own
# Linear when activations are static int8; measured on MiniLM: cosine 0.944 -> 0.990 (docs/transformers.md).
DEFAULT_SPLIT_OUTLIERS = 8.0
# Magnitude-tier factor for outlier grouping (MiniLM all-int8, seq 128: factor 8 0.976, 2 0.985, 1.5 0.986).
DEFAULT_GROUP_OUTLIERS = 2.0


def _source_options(opts: ConvertOptions, scheme: Scheme, fmt: str, integer_only: bool = False) -> dict:
    if fmt != "hf" and (opts.smoothquant is not None or opts.split_outliers or opts.pooling):  # they were ignored
        raise ModelFormatError("--pooling/--smoothquant/--split-outliers shape Hugging Face encoders; drop them for "
                               f"a {fmt} model")
    if fmt == "tflite":  # control flow is refused up front only for static-int8 schemes
        return {"scheme": scheme.value}
    if fmt == "keras":
        return {"input_shapes": opts.input_shapes, "trust_model": opts.trust_model}
    if fmt in PINNABLE:
        return {"input_shapes": opts.input_shapes}
    if fmt != "hf":
        return {}
    if opts.calib and opts.calib.tokenizer:  # ignored before: the directory's own tokenizer is the model's
        raise CalibrationError("a Hugging Face model tokenizes with its own tokenizer; drop --tokenizer")
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


# Formats whose loaders pin dynamic input dimensions (--input-shape); .tflite shapes are fixed at export.
PINNABLE = ("keras", "saved_model", "torch_export")
ARRAYS = (".npy", ".npz")


def _static_source(model: Path, source: SourceModel, fmt: str, opts: ConvertOptions, options: dict) -> SourceModel:
    """A Keras / SavedModel / .tflite source with inputs dynamic beyond the batch, pinned to the shape
    of its .npy/.npz calibration samples (one shape for all of them); any other case fails naming
    --input-shape (Keras, SavedModel) or a static re-export (.tflite). The converters' calibrators
    cannot size a convolution of unknown height and width (XNNPACK fails to prepare), and devices
    run static shapes."""
    cfg = opts.calib
    arrays = cfg is not None and cfg.source != "random" and Path(cfg.source).suffix.lower() in ARRAYS
    if fmt not in ("keras", "saved_model", "tflite") or not arrays:
        images = cfg is not None and cfg.source != "random" and Path(cfg.source).is_dir()
        fix = "re-export the .tflite with static shapes" if fmt == "tflite" else None
        raise CalibrationError(dynamic_inputs_error(source, model, images, fix))
    first = next(load_calibration(cfg, source.inputs).calibration())
    shapes = tuple(tuple(first[s.name].shape) for s in source.inputs)
    if fmt == "tflite":  # LiteRT's shape inference writes the shapes into the file
        from .signature import signature_specs

        data = pin_tflite(source.float_tflite, first)
        ins, outs = signature_specs(data)
        pinned = dataclasses.replace(source, float_tflite=data, inputs=ins, outputs=outs)
    else:
        pinned = load_source(model, **{**options, "input_shapes": shapes})
    fixed = ", ".join(f"{s.name} ({dims(s.shape)}) to {','.join(map(str, shape))}"
                      for s, shape in zip(source.inputs, shapes) if is_dynamic(s.shape))
    notes = tuple(n for n in pinned.notes if not n.startswith("dynamic dimensions of "))
    return dataclasses.replace(pinned, notes=notes + (
        f"dynamic input dimensions pinned to the calibration data's shape: {fixed}"
        + ("" if fmt == "tflite" else "; pass --input-shape to choose another"),))


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
    real_data = False if opts.calib is None or opts.calib.source == "random" else None
    mistake = optimize_mistake(opts.optimize, scheme, io, real_data, opts.range_method)
    if mistake:
        raise QuantizationError(mistake)
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


def _top1_outputs(opts: ConvertOptions, class_outputs: frozenset[str], reference) -> tuple[frozenset[str], str]:
    """--metric top1 without --class-output took every vector output for class scores: MTCNN O-Net's box
    offsets and landmarks were judged by their argmax, and NNAPI's plan moved 32 of its 34 ops to float
    for them. Where some of those outputs hold probabilities, top-1 judges those alone, and a note says
    which outputs it left out (--class-output names them)."""
    from .fidelity import OutputKind, output_kind

    if opts.budget is None or opts.budget.metric != "top1" or opts.class_outputs or len(class_outputs) < 2:
        return class_outputs, ""
    probs = frozenset(n for n in class_outputs
                      if n in reference and output_kind(n, reference[n]) is OutputKind.CLASS_SCORES)
    if not probs or probs == class_outputs:
        return class_outputs, ""
    rest = sorted(class_outputs - probs)
    return probs, (f"--metric top1 judges {', '.join(sorted(probs))} (probabilities); {', '.join(rest)} are not "
                   "held to it (--class-output NAME judges an output by top-1 too)")


def _class_outputs(opts: ConvertOptions, source: SourceModel) -> frozenset[str]:
    """Outputs judged by top-1 as class scores on the user's word: --class-output NAME, or with
    --metric top1 every output that is one score vector per sample."""
    shapes = {o.name: o.shape for o in source.outputs}

    def vector(shape) -> bool:
        return sum(d > 1 or d == -1 for d in shape[1:]) == 1

    for name in opts.class_outputs:
        if name not in shapes:
            raise QuantizationError(f"--class-output {name}: the model has no such output; its outputs are "
                                    f"{', '.join(shapes)}")
        if not vector(shapes[name]):
            raise QuantizationError(f"--class-output {name}: shape {shapes[name]} is not one score vector per "
                                    "sample; class scores are (batch, classes)")
    if opts.class_outputs:
        return frozenset(opts.class_outputs)
    if opts.budget is not None and opts.budget.metric == "top1":
        names = frozenset(n for n, shape in shapes.items() if vector(shape))
        if not names:
            raise QuantizationError("--metric top1 needs an output with one score vector per sample (batch, "
                                    "classes); use --metric cosine")
        return names
    return frozenset(n for n in source.class_outputs if n in shapes and vector(shapes[n]))


def _budget_test(opts: ConvertOptions):
    """--max-drop as a test of a Fidelity, or None without one. (Only the user's budget: under the
    default floor alone --max-size keeps the most accurate mix that fits.)"""
    if opts.budget is None:
        return None
    return lambda fid: budget_target(opts.budget.max_drop, opts.budget.metric, fid).met(fid)


def _loop_can_run(scheme: Scheme, io: IoType) -> bool:
    """The budget loop re-quantizes plans with the LiteRT quantizer."""
    return scheme is not Scheme.FP16 and io in LITERT_IO


def _requantizer(source: SourceModel, scheme: Scheme, io: IoType, data: CalibrationData, adjust, progress,
                 finish=None):
    return Requantizer(source.float_tflite, scheme.op_precision, data.calibration if scheme.needs_calibration
                       else None, count=len(data.calib_indices), keep_float_io=io is IoType.FLOAT32,
                       adjust_ranges=adjust, progress=progress, finish=finish)


def _analysis_samples(data: CalibrationData):
    """A few calibration samples (loaded once, when the budget loop asks) for its analysis."""
    cache: list = []

    def samples() -> list:
        if not cache:
            cache.extend(islice(data.calibration(), ANALYSIS_SAMPLES))
        return cache

    return samples


def _recalibrate(source, req, refit: CalibrationData, data: CalibrationData, requant, converter,
                 opts: ConvertOptions, progress, kept: KeptCalibration | None = None) -> bytes:
    """The model calibrated on every sample (`refit`), the way the first result was quantized; where
    the converter's calibrator was `kept` from it, fed only the samples it has not seen."""
    adjust = _range_hook(source, refit, opts.range_method, opts.percentile, progress) if req.adjust_ranges else None
    seen = set(data.calib_indices)
    added = dataclasses.replace(data, calib_indices=[i for i in refit.calib_indices if i not in seen])
    if converter or requant is None:
        rest = added if kept is not None and kept.fed else refit

        def calibration():
            return progress.iter(rest.calibration(), "Recalibrating on every sample" if rest is refit else
                                 "Calibrating on the held-out samples too", len(rest.calib_indices))
        with progress.task(f"Quantizing ({req.scheme.value}) with every sample"):
            return quantize(source, dataclasses.replace(req, adjust_ranges=adjust), calibration, kept)
    requant.recalibrate(added.calibration, len(added.calib_indices), adjust)
    return requant.quantize(req.per_op)


def _optimize(source: SourceModel, data: CalibrationData, req: QuantizeRequest, level: OptimizeLevel,
              class_outputs: frozenset[str], profile, progress: Progress) -> tuple[OptimizeResult | None, str]:
    """Quantize at an accuracy level on the calibration samples (optimize.optimize_conversion)."""
    from .int8_islands import kept_float
    from .optimize import optimize_conversion, plan_recipe
    from .verify import runtime_options

    samples = list(progress.iter(data.calibration(), "Loading calibration samples", len(data.calib_indices)))
    recipe = plan_recipe(source.float_tflite, req.scheme.op_precision, req.per_op, req.io is IoType.FLOAT32)
    with progress.task(f"Optimizing accuracy (--optimize {level.value}, {len(samples)} calibration samples)"):
        return optimize_conversion(source.float_tflite, samples, recipe, level, class_outputs,
                                   runtime_options(profile), progress.note, kept_float(req.per_op))


def _replay(source: SourceModel, data: CalibrationData, req: QuantizeRequest, optimized: OptimizeResult,
            progress: Progress, seen: int) -> OptimizeResult | None:
    """The level's choices applied to every sample (optimize.replay; the level ran on the first
    `seen`), or None where it cannot replay."""
    from .int8_islands import kept_float
    from .optimize import litert_session, plan_recipe, replay
    from .signature import SIGNATURE_KEY

    samples = list(progress.iter(data.calibration(), "Loading calibration samples", len(data.calib_indices)))
    recipe = plan_recipe(optimized.float_model, req.scheme.op_precision, req.per_op, req.io is IoType.FLOAT32)
    with progress.task(f"Applying the level's choices to all {len(samples)} samples"):
        return replay(optimized, samples, litert_session(recipe, SIGNATURE_KEY, kept_float(req.per_op)), progress.note,
                      seen=seen)


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

