"""Accuracy levels (--optimize none|fast|best): which methods run after calibration, and what each bought.

Every step is measured on CALIBRATION samples (an evenly spread subset, `judge`), against the user's
float model, and kept only if it lowers the output error there; so a level can only match or beat
the one below it on those samples, and the held-out samples stay untouched for the fidelity report.

- none: the quantizer's own ranges (litert-quantizer's moving-average min-max), nothing else.
- fast (default; about the bare TFLite converter's time again): measured range selection per model
  (ranges.search_ranges), cross-layer equalization (equalize.py, re-measured ranges on the equalized
  model) and bias correction (bias_correction.py).
- best (minutes; MobileNetV2 on 2 cores within 10 minutes): fast plus per-tensor range refinement
  (before bias correction) and learned rounding (after it). Both fit many parameters, so they learn
  on the calibration samples outside `judge` and are judged on `judge`.

The quantizer is abstract: a SessionFactory binds it to a float model (litert_session() makes one
from a litert-quantizer recipe), so the same steps serve every recipe edgeq builds (uniform int8,
per-op device plans) and every source (Keras, SavedModel and float .tflite all arrive as a float
.tflite with a signature).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable, Sequence

from .ranges import Objective, Score, output_names, range_stats, refine_ranges, score, search_ranges, spread


class OptimizeLevel(str, Enum):
    NONE = "none"
    FAST = "fast"
    BEST = "best"


@dataclass(frozen=True)
class QuantSession:
    """The quantizer bound to one float model: a calibration result in its format and quantize(calibration)."""

    base: dict
    quantize: Callable[[dict], bytes]


SessionFactory = Callable[[bytes, Sequence[dict]], QuantSession]


def litert_session(recipe: list[dict], signature_key: str = "serving_default") -> SessionFactory:
    """A SessionFactory for litert-quantizer with `recipe` (litert_quant.build_recipe + I/O lines)."""

    def make(float_model: bytes, samples: Sequence[dict]) -> QuantSession:
        from litert_quantizer import Quantizer

        from .tfimport import quiet_native

        qt = Quantizer(bytearray(float_model))
        qt.load_quantization_recipe(recipe)
        with quiet_native():
            base = qt.calibrate({signature_key: list(samples)}, num_threads=2) if qt.need_calibration else {}

        def quantize(calibration: dict) -> bytes:
            with quiet_native():
                return bytes(qt.quantize(calibration, enable_progress_report=False).quantized_model)

        return QuantSession(base, quantize)

    return make


def uniform_recipe(precision: str = "int8", float_io: bool = True) -> list[dict]:
    """A litert-quantizer recipe putting every op at `precision` (edgeq's recipe lines), model inputs
    and outputs float when float_io."""
    from .litert_quant import recipe_lines

    io = [{"regex": ".*", "operation": op, "algorithm_key": "no_quantize", "op_config": {}} for op in ("INPUT", "OUTPUT")]
    return recipe_lines(".*", "*", precision) + (io if float_io else [])


@dataclass(frozen=True)
class Budget:
    """Time for the slow steps of level best (seconds); fast has no knobs."""

    refine_seconds: float = 90.0
    rounding_seconds: float = 300.0


@dataclass(frozen=True)
class StepReport:
    name: str  # ranges | equalize | bias_correction | refine_ranges | learned_rounding | quantize
    kept: bool
    before: Score | None
    after: Score
    seconds: float
    detail: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"step": self.name, "kept": self.kept, "before": self.before.to_json() if self.before else None,
                "after": self.after.to_json(), "seconds": round(self.seconds, 2), "detail": self.detail}

    def line(self, objective: Objective) -> str:
        """One human line: what the step did and what it bought on calibration samples."""
        b = f"{self.before.error(objective):.4g} -> " if self.before else ""
        top = f", top-1 {self.after.top1:.3f}" if self.after.top1 is not None else ""
        verdict = "kept" if self.kept else "dropped (no gain)"
        return f"{self.name}: {objective.value} {b}{self.after.error(objective):.4g}{top} [{verdict}, {self.seconds:.1f} s]"


@dataclass(frozen=True)
class OptimizeResult:
    model: bytes  # the quantized .tflite
    float_model: bytes  # the float model it was quantized from (equalized when that was kept)
    calibration: dict  # the activation ranges it was quantized with (litert-quantizer format)
    level: OptimizeLevel
    objective: Objective
    steps: tuple[StepReport, ...]
    samples: int  # calibration samples used
    judged_on: int  # of which the steps were judged on
    seconds: float

    @property
    def score(self) -> Score:
        kept = [s.after for s in self.steps if s.kept]
        return kept[-1] if kept else self.steps[0].after

    def to_json(self) -> dict:
        return {"level": self.level.value, "objective": self.objective.value, "calibration_samples": self.samples,
                "judged_on_calibration_samples": self.judged_on, "seconds": round(self.seconds, 1),
                "steps": [s.to_json() for s in self.steps], "final": self.score.to_json()}


# Steps are judged on at most this many calibration samples: the int8 model's run time is what the
# measuring costs (MobileNetV2: ~30 ms a sample on 2 cores).
JUDGE_SAMPLES = 32
# Activation statistics and bias-correction means come from at most this many (evenly spread)
# calibration samples (64k values of each tensor per sample: 2M values, enough for percentiles down
# to 99.999 % and for means); it keeps level fast within 2x the bare converter's time on MobileNetV2.
STATS_SAMPLES = 32
STRUCTURE_SAMPLES = 2  # the quantizer's calibrate() only supplies the result's layout; ranges.range_stats the values


def optimize(float_model: bytes, samples: Sequence[dict], session: SessionFactory,
             level: OptimizeLevel | str = OptimizeLevel.FAST, *, objective: Objective | str = Objective.REL_L2,
             budget: Budget = Budget(), judge_samples: int = JUDGE_SAMPLES,
             on_step: Callable[[str], None] | None = None) -> OptimizeResult:
    """Quantize float_model (a float .tflite with a signature) at `level`, on CALIBRATION samples.

    objective: Objective.KL for classifiers (their top-1 follows it), REL_L2 otherwise."""
    from .validate import run_model

    t0 = time.monotonic()
    level, objective = OptimizeLevel(level), Objective(objective)
    samples = list(samples)
    judge = spread(samples, judge_samples)
    stat_samples = spread(samples, STATS_SAMPLES)
    # Steps that fit many parameters (per-tensor ranges, learned rounding) learn on the calibration
    # samples outside `judge`, so judging them stays fair; with too few samples they share them.
    judged = {id(x) for x in judge}
    learn = [x for x in samples if id(x) not in judged]
    learn = learn if len(learn) >= 8 else samples
    note = on_step or (lambda _: None)
    reference = run_model(float_model, judge)
    steps: list[StepReport] = []

    if level is OptimizeLevel.NONE:
        note("quantizing with the quantizer's own ranges")
        s = session(float_model, samples)
        model = s.quantize(s.base)
        steps.append(StepReport("quantize", True, None, score(reference, model, judge), time.monotonic() - t0,
                                {"ranges": "minmax-ema"}))
        return OptimizeResult(model, float_model, s.base, level, objective, tuple(steps), len(samples), len(judge),
                              time.monotonic() - t0)

    def err(sc: Score) -> float:
        return sc.error(objective)

    # 1. Measured range selection on the float model as given.
    ts = time.monotonic()
    note("measuring activation ranges")
    sess = session(float_model, samples[:STRUCTURE_SAMPLES])
    stats = range_stats(float_model, stat_samples, sess.base)
    found = search_ranges(float_model, samples, sess.base, sess.quantize, stats=stats, objective=objective,
                          max_samples=judge_samples, on_step=note)
    plain = next(c.score for c in found.candidates if c.name == "minmax-ema")
    best = found.best
    steps.append(StepReport("ranges", found.chosen != "minmax-ema", plain, best, time.monotonic() - ts,
                            found.to_json()))
    current_float, calibration = float_model, found.calibration

    # 2. Cross-layer equalization, ranges measured again on the equalized model.
    ts = time.monotonic()
    from .equalize import equalize
    eq = equalize(float_model, samples, channel_stats=stats.channels, on_step=note)
    if eq.pairs:
        note(f"measuring ranges after equalizing {len(eq.pairs)} layer pairs")
        eq_sess = session(eq.model, samples[:STRUCTURE_SAMPLES])
        eq_stats = range_stats(eq.model, stat_samples, eq_sess.base)
        # The model's outputs are the same after equalization, so their ranges carry over; of the
        # range rules, the three that did best before are measured again.
        ranked = sorted(found.candidates, key=lambda c: c.score.error(objective))
        top = [c.name for c in ranked if "+" not in c.name][:3]
        outputs = {n: found.calibration[n] for n in output_names(float_model) if n in found.calibration}
        eq_found = search_ranges(eq.model, samples, eq_sess.base, eq_sess.quantize, stats=eq_stats,
                                 objective=objective, max_samples=judge_samples, only=top, fixed=outputs,
                                 on_step=note)
        keep = err(eq_found.best) < err(best)
        steps.append(StepReport("equalize", keep, best, eq_found.best, time.monotonic() - ts,
                                {**eq.to_json(), "ranges": eq_found.to_json()}))
        if keep:
            sess, stats, found, best = eq_sess, eq_stats, eq_found, eq_found.best
            current_float, calibration = eq.model, eq_found.calibration
    model = sess.quantize(calibration)
    from .bias_correction import correct_bias

    def bias_corrected(model: bytes, best: Score) -> tuple[bytes, Score, StepReport]:
        ts = time.monotonic()
        bc = correct_bias(model, current_float, stat_samples, on_step=note)
        after = score(reference, bc.model, judge)
        keep = err(after) < err(best)
        report = StepReport("bias_correction", keep, best, after, time.monotonic() - ts, bc.to_json())
        return (bc.model, after, report) if keep else (model, best, report)

    # 3. (best) Per-tensor refinement of the chosen ranges; bias correction after it (and, when it was
    #    kept, also without it: the better of the two goes on, so best never trails fast).
    if level is OptimizeLevel.BEST and budget.refine_seconds > 0:
        ts = time.monotonic()
        note("refining activation ranges tensor by tensor")
        refined = refine_ranges(current_float, learn, sess.base, sess.quantize, found, stats=stats,
                                seconds=budget.refine_seconds, max_samples=judge_samples, on_step=note)
        refined_model = sess.quantize(refined.calibration)
        after = score(reference, refined_model, judge)
        keep = err(after) < err(best)
        steps.append(StepReport("refine_ranges", keep, best, after, time.monotonic() - ts,
                                {"tensors_refined": refined.tensors_refined}))
        if keep:
            plain = bias_corrected(model, best)
            model, best, report = bias_corrected(refined_model, after)
            calibration = refined.calibration
            if err(plain[1]) < err(best):
                calibration = found.calibration
                model, best, report = plain[0], plain[1], StepReport(
                    "bias_correction", True, best, plain[1], report.seconds + plain[2].seconds,
                    {**plain[2].detail, "note": "on the unrefined ranges: better than on the refined ones"})
        else:
            model, best, report = bias_corrected(model, best)
    else:
        model, best, report = bias_corrected(model, best)
    steps.append(report)

    # 4. (best) Learned rounding, learned on calibration samples outside `judge`.
    if level is OptimizeLevel.BEST and budget.rounding_seconds > 0:
        from .learned_rounding import RoundingConfig, learn_rounding
        ts = time.monotonic()
        lr = learn_rounding(model, current_float, learn, config=RoundingConfig(seconds=budget.rounding_seconds),
                            on_step=note)
        after = score(reference, lr.model, judge)
        keep = err(after) < err(best)
        steps.append(StepReport("learned_rounding", keep, best, after, time.monotonic() - ts, lr.to_json()))
        if keep:
            model, best = lr.model, after
    return OptimizeResult(model, current_float, calibration, level, objective, tuple(steps), len(samples),
                          len(judge), time.monotonic() - t0)
