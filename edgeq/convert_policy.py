"""What a conversion aims at, and what it does with little data (edgeq convert).

- `conversion_plan` / `int4_notes`: the per-op plan for the target (the device profile's, or for an
  int4 scheme without a device the scheme's, ops without an int4 kernel on 8 bits) and what it warns.
- `choose_target`: the user's --max-drop, else the default fidelity floor (or why it is not applied).
- `refit_data` / `keep_refit`: with fewer samples than calibration + evaluation ask for, the held-out
  ones judge a twin calibrated on the rest, and the written model is calibrated on every sample unless
  that misses the target its twin met.
- `data_warnings`: what the user should know about the data a model was calibrated and judged on.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable

from .accuracy_target import budget_target, default_floor
from .calibration import CalibrationConfig, CalibrationData
from .defaults import MIN_RECOMMENDED_CALIB
from .plan import plan_precision
from .precision import INT4_PRECISIONS, Precision, Scheme

if TYPE_CHECKING:
    from .convert import ConvertOptions

# Held-out samples below which fidelity numbers are rough (95% interval of top-1 agreement
# ±2·sqrt(p(1-p)/n): ±0.13 at n = 20, p = 0.9).
SMALL_EVAL = 20


def conversion_plan(float_info, profile, scheme: Scheme, overrides=None, litert: bool = False):
    """The per-op plan: the profile's (with `scheme` for the ops its table leaves open), or without one for int4 schemes (ops without an int4 kernel
    take the 8-bit fallback, and the plan says so); None for uniform 8-bit schemes without a device.
    `overrides`: plan_precision's (op index -> (precision, reason)), e.g. --max-size's mix. `litert`:
    the LiteRT quantizer wrote the file (ops it has no int8 recipe for are float there); not before
    the backend is chosen, or a Keras model's MINIMUM planned float would take it off the TFLite
    converter, which writes it int8 (a Coral graph cut in half)."""
    if profile is not None or scheme.is_int4:
        return plan_precision(list(float_info.ops), profile, overrides, scheme=scheme, min_weight_elements=0,
                              litert=litert)
    return None


def int4_notes(plan, scheme: Scheme) -> list[str]:
    """The plan's warnings, and for an int4 scheme which weighted ops fall back to 8 bits."""
    notes = list(plan.warnings())
    if scheme.is_int4:
        fallback = [e for e in plan.entries if e.precision not in INT4_PRECISIONS and "so " in e.reason
                    and e.precision is not Precision.OTHER]
        if fallback:
            kinds = sorted({f"{e.op} -> {e.precision}" for e in fallback})
            notes.append(f"{len(fallback)} op(s) have no {scheme.value} kernel and take 8 bits or float: "
                         f"{', '.join(kinds[:6])} (see the plan's reasons)")
    return notes


def choose_target(opts: ConvertOptions, fid, data: CalibrationData):
    """(the accuracy target to meet, or None; the budget report when the floor is not applied)."""
    if opts.budget is not None:
        return (budget_target(opts.budget.max_drop, opts.budget.metric, fid) if fid is not None else None), None
    if not opts.floor:
        return None, {"floor": False, "applied": False, "why": "--no-floor"}
    if fid is None:
        return None, {"floor": True, "applied": False, "why": "no held-out samples to judge",
                      "warning": "the fidelity floor was not checked: no held-out samples (give more data or "
                                 "--eval-samples > 0)"}
    floor = default_floor(fid)
    if opts.calib is None or not data.calibrated:
        # Fidelity on random inputs says little about real ones: the floor must not block such a model.
        report = {**floor.to_json(), "applied": False, "met": floor.met(fid), "why": "judged on random inputs"}
        if not floor.met(fid):
            report["warning"] = (f"the fidelity floor was not applied: judged on random inputs, where "
                                 f"{floor.reached(fid)} says little about real data; pass --calib DATA")
        return None, report
    return floor, None


def refit_data(data: CalibrationData, cfg: CalibrationConfig | None) -> CalibrationData | None:
    """With fewer samples than calibration + evaluation ask for, the split held some out: the
    written model is calibrated on every sample (up to --calib-samples), the held-out ones judged a
    twin calibrated on the rest. None when the split left nothing out that calibration wanted."""
    if cfg is None or not data.calibrated or not data.eval_indices or len(data.calib_indices) >= cfg.samples:
        return None
    extra = data.eval_indices[:cfg.samples - len(data.calib_indices)]
    return dataclasses.replace(data, calib_indices=list(data.calib_indices) + list(extra))


def keep_refit(model: bytes, refit: CalibrationData, data: CalibrationData, judged: bytes, target, fid,
               judge: Callable[[bytes], object]) -> tuple[bytes, CalibrationData, str | None]:
    """(model bytes, the calibration data it used, a warning or None). The model calibrated on every
    sample is kept unless it misses the accuracy target its twin (`judged`) met on the held-out
    samples, which it has now seen: only more data hurting (an outlier sample) does that."""
    if target is None or fid is None or not target.met(fid):
        return model, refit, None
    if not target.met(judge(model)):
        return judged, data, (f"recalibrating on all {len(refit.calib_indices)} samples missed the accuracy "
                              f"target on the held-out ones; kept the model calibrated on {len(data.calib_indices)}")
    return model, refit, None


def data_warnings(data: CalibrationData, scheme: Scheme, opts: ConvertOptions) -> list[str]:
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
    elif data.calibrated and len(data.eval_indices) < SMALL_EVAL:
        n = len(data.eval_indices)
        asked = (f" (not the {opts.calib.eval_samples} of --eval-samples: {data.total} samples in all)"
                 if opts.calib.eval_samples > n else "")
        out.append(f"fidelity judged on only {n} held-out sample(s){asked}: a top-1 agreement of 0.9 is only known "
                   f"to ±{2 * (0.09 / n) ** 0.5:.2f} there (±0.08 on 50); give more data for firmer numbers")
    return out
