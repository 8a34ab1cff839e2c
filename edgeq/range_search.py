"""Measured range choice (RangeMethod.AUTO, --optimize fast/best): quantize with every range
candidate (ranges.py: the quantizer's min-max, true min-max, percentiles, MSE), run each on the
CALIBRATION samples and keep the one whose output is closest to the float model's; optionally refine
tensor by tensor (coordinate descent within a time budget). Held-out samples are never looked at,
so the fidelity reported on them stays honest.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import Enum
from typing import Callable, Sequence

import numpy as np

from .errors import CalibrationError
from .ranges import RangeMethod, RangeStats, with_range, range_stats, ranges_from_stats


class Objective(str, Enum):
    """What "closest to float" means when choosing. Output rel. L2 suits embeddings and regressors;
    for class scores it is dominated by the hundreds of small logits, and ranks range choices against
    top-1 agreement (MobileNetV2, 100 calibration photos: the lowest-L2 candidate had the lowest
    agreement on other photos, 0.70 vs 0.82), while the KL divergence of the softmax ranks them like
    agreement does."""

    REL_L2 = "rel_l2"
    KL = "kl"


# How far below the quantizer's own ranges any output's cosine may end: COSINE_TOLERANCE (sampling
# noise on 32 calibration samples near 1), or where the quantizer's own ranges already leave the output
# far from float, FLOOR_SHARE of that distance (its error 1 - cosine may grow by a tenth). A real loss
# is far larger: BlazeFace's anchor logits 0.976 -> 0.659 is 14x the error. With the absolute 0.002
# alone, MediaPipe's hand landmarks (world landmarks at 0.808) dropped equalization for 0.808 -> 0.800
# though it lowered the error over all outputs, and ended at 0.925 instead of 0.969 on held-out photos.
COSINE_TOLERANCE = 0.002
FLOOR_SHARE = 0.1


@dataclass(frozen=True)
class Score:
    """How close a quantized model's outputs are to the float model's on some samples (outputs paired
    by order; worst output counts)."""

    rel_l2: float  # ||q - f|| / ||f|| over all samples
    cosine: float  # mean over samples
    top1: float | None  # argmax agreement for vector outputs (fidelity.is_vector_output), else None
    # (CRAFT's 160x160x2 text map read "top-1 0.69" in the manifest: an argmax over a map means nothing)
    kl: float | None  # mean KL(softmax(f) || softmax(q)) over score-vector outputs (is_score_vector)
    samples: int
    cosines: tuple[float, ...] = ()  # mean cosine of each output, in the reference's order
    # top-1 agreement on the samples float is sure about (top softmax >= SURE) of score-vector
    # outputs; None when there are none
    top1_sure: float | None = None
    sure: int = 0  # how many samples top1_sure is over
    failed: str = ""  # LiteRT could not run the model (fidelity.ModelRunError): worse than any score

    @classmethod
    def run_failed(cls, why: str, samples: int) -> Score:
        return cls(float("inf"), -1.0, None, None, samples, failed=why)

    def error(self, objective: Objective | str = Objective.REL_L2) -> float:
        if self.failed:
            return float("inf")
        if Objective(objective) is Objective.KL and self.kl is not None:
            return self.kl
        return self.rel_l2

    def keeps(self, floor: Score | None, tolerance: float = COSINE_TOLERANCE) -> bool:
        """No output's cosine more than `tolerance`, or FLOOR_SHARE of its distance from 1, below
        floor's (the quantizer's own ranges): a lower KL or L2 must not be bought with another output
        (BlazeFace: the KL choice took its anchor logits from cosine 0.976 to 0.659)."""
        if floor is None or self.failed:
            return not self.failed
        return all(c >= f - max(tolerance, FLOOR_SHARE * (1 - f)) for c, f in zip(self.cosines, floor.cosines))

    def to_json(self) -> dict:
        if self.failed:  # no numbers (and no Infinity in the manifest's JSON)
            return {"failed": self.failed, "samples": self.samples}
        return {"rel_l2": self.rel_l2, "cosine": self.cosine, "top1_agreement": self.top1, "kl": self.kl,
                "samples": self.samples, "cosines": list(self.cosines), "top1_agreement_sure": self.top1_sure,
                "sure_samples": self.sure}


def is_score_vector(ref: np.ndarray) -> bool:
    """One vector of >= 2 scores per sample on the last axis ([N, C], [N, 1, C]): what a softmax KL is
    taken over. [N, anchors, 1] (one sigmoid logit per anchor) or [N, anchors, 16] are not."""
    return ref.ndim >= 2 and ref.shape[-1] >= 2 and all(d == 1 for d in ref.shape[1:-1])


# Float's top softmax probability from which a sample's top-1 counts as sure (Score.top1_sure): below
# it float hesitates between classes, and int8 flips its answer there by chance (docs/accuracy.md).
SURE = 0.5

# Floor for probabilities an output already holds: int8 softmax outputs step by 1/256, so small
# probabilities come out as exactly 0 and would make KL infinite (dominated by classes nobody picks).
PROBABILITY_FLOOR = 1e-3


def _softmax(z: np.ndarray, probabilities: bool) -> np.ndarray:
    if probabilities:
        p = np.maximum(z, PROBABILITY_FLOOR)
        return p / p.sum(1, keepdims=True)
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def anchor_logits(ref: np.ndarray) -> bool:
    """One logit per anchor or pixel ([N, anchors, 1]), mostly far below 0: a detector's scores before
    their sigmoid. Their relative L2 is judged after the sigmoid: raw, the empty anchors' -100..-300
    (which decide nothing) dominated it, and the range search widened MediaPipe's sparse BlazeFace's
    score range to [-286, 0], a step of 1.12 logits at the 0.5 decision point (docs/accuracy.md)."""
    return (ref.ndim >= 3 and ref.shape[-1] == 1 and ref[0].size >= 16 and float(np.mean(ref < -4)) >= 0.5
            and float(np.max(ref)) > DECISION_NEAR)


# A detector's score logits on real photos reach near the 0.5 decision point somewhere (BlazeFace's on
# photos without faces: up to 0.5-0.65; the palm and pose detectors' 1.6-1.7). An output that never
# does is a measurement in negative units (a level in dB, -77..-17): after a sigmoid only its largest
# values would count, and any clip of them read as the whole error (1.0 for every range candidate).
DECISION_NEAR = -2.0


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.tanh(0.5 * z))  # no overflow warning for logits of -300


def compare_outputs(reference: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> Score:
    rel, cos, top1, kl, n, cosines, sure, n_sure = 0.0, 1.0, None, None, 0, [], None, 0
    from .fidelity import float64_blocks, is_vector_output, joined_norm

    for ref, cand in zip(reference.values(), got.values()):
        r32, c32 = ref.reshape(len(ref), -1), cand.reshape(len(cand), -1)
        n = len(r32)
        diff, size, row_cos = [], [], []
        logits = anchor_logits(ref)
        for r, c in float64_blocks(r32, c32):  # a block of samples at a time (fidelity.BLOCK_BYTES)
            # the error is taken where the detector's decision is: after the sigmoid (cosines stay raw,
            # as the fidelity floor judges them)
            d, s = (_sigmoid(r) - _sigmoid(c), _sigmoid(r)) if logits else (r - c, r)
            diff.append(np.linalg.norm(d))
            size.append(np.linalg.norm(s))
            den = np.linalg.norm(r, axis=1) * np.linalg.norm(c, axis=1)
            row_cos.append(np.where(den > 0, (r * c).sum(1) / np.maximum(den, 1e-30), 1.0))
        rel = max(rel, joined_norm(diff) / max(joined_norm(size), 1e-12))
        cosines.append(float(np.mean(np.concatenate(row_cos))))
        cos = min(cos, cosines[-1])
        if is_vector_output(ref):  # argmax of the float32 values: the same as of their float64 copies
            agree = float((r32.argmax(1) == c32.argmax(1)).mean())
            top1 = agree if top1 is None else min(top1, agree)
        if is_score_vector(ref):  # a class-score vector: small
            r, c = r32.astype(np.float64), c32.astype(np.float64)
            probs = bool((r >= 0).all() and np.allclose(r.sum(1), 1.0, atol=1e-3))
            p, q = _softmax(r, probs), _softmax(c, probs)
            d = float(np.mean(np.sum(p * (np.log(p + 1e-12) - np.log(q + 1e-12)), axis=1)))
            kl = d if kl is None else max(kl, d)
            confident = p.max(1) >= SURE
            if confident.any():
                agree = float((r.argmax(1) == c.argmax(1))[confident].mean())
                if sure is None or agree < sure:
                    sure, n_sure = agree, int(confident.sum())
    return Score(rel, cos, top1, kl, n, tuple(cosines), sure, n_sure)


class PartedReference(dict):
    """Float outputs with each output joined from parts of very different size (fidelity.join_parts:
    a detector's pixel boxes and 0..1 scores) split into its parts, judged as outputs of their own:
    NudeNet's scores were 0.03 of the error a level minimised, the boxes the rest."""

    def __init__(self, values: dict, parts: dict):
        super().__init__(values)
        self.parts = parts


def judge_reference(float_model: bytes, judge: Sequence[dict]) -> dict[str, np.ndarray]:
    """The float outputs the judging samples are compared with (split into parts where needed)."""
    from .fidelity import check_finite, join_parts, run_model

    outputs = run_model(float_model, judge)
    check_finite(outputs, "calibration samples")  # NaN there would read as int8's error
    return split_parts(outputs, join_parts(float_model))


def split_parts(outputs: dict[str, np.ndarray], parts: dict) -> dict[str, np.ndarray]:
    """`outputs` with each output in `parts` whose parts differ in size by fidelity.PART_RATIO or more
    replaced by its parts ("name[a:b]"); a PartedReference when any was split."""
    from .fidelity import first_uneven

    out, used = {}, {}
    for name, v in outputs.items():
        found = first_uneven(v, parts.get(name, ()))
        if found:
            axis, bounds, pieces = found
            out.update({f"{name}[{a}:{b}]": p for a, b, p in pieces})
            used[name] = (axis, bounds)
        else:
            out[name] = v
    return PartedReference(out, used) if used else out


def score(reference: dict[str, np.ndarray], model: bytes, samples: Sequence[dict]) -> Score:
    """Run `model` on samples and compare with the float outputs `reference` (fidelity.run_model, or
    judge_reference); a model LiteRT cannot run on them scores worse than any other
    (Score.run_failed): a range candidate or step that makes one is dropped, not the conversion."""
    from .fidelity import ModelRunError, run_model

    try:
        got = run_model(model, samples)
    except ModelRunError as e:
        return Score.run_failed(str(e), len(samples))
    if isinstance(reference, PartedReference):  # the same parts of the same outputs
        from .fidelity import slices

        got = {key: part for name, v in got.items() for key, part in
               ([(f"{name}[{a}:{b}]", p) for a, b, p in slices(v, *reference.parts[name])]
                if name in reference.parts else [(name, v)])}
    return compare_outputs(reference, got)


@dataclass(frozen=True)
class RangeCandidate:
    name: str
    score: Score

    def to_json(self) -> dict:
        return {"name": self.name, **self.score.to_json()}


@dataclass(frozen=True)
class RangeSearch:
    """The chosen calibration (litert-quantizer format) and what every candidate measured."""

    calibration: dict
    chosen: str
    candidates: tuple[RangeCandidate, ...]
    objective: Objective = Objective.REL_L2
    tensors_refined: int = 0  # tensors whose range per-tensor refinement changed
    refined_score: Score | None = None
    seconds: float = 0.0
    baseline: Score | None = None  # the quantizer's own ranges (minmax-ema as calibrated): the floor


    @property
    def best(self) -> Score:
        return self.refined_score or next(c.score for c in self.candidates if c.name == self.chosen)

    @property
    def improved(self) -> bool:
        """Whether the chosen calibration measured better than the quantizer's own ranges. Not the same
        as choosing another rule: for class scores even `minmax-ema` keeps the outputs' true maximum
        (torchvision MobileNetV2 on Commons photos: KL 0.197 -> 0.026 with no other change)."""
        if self.chosen == OWN_RANGES or self.baseline is None:
            return self.chosen not in ("minmax-ema", OWN_RANGES)
        return self.best.error(self.objective) < self.baseline.error(self.objective)

    def to_json(self) -> dict:
        return {"chosen": self.chosen, "objective": self.objective.value, "candidates": [c.to_json() for c in self.candidates],
                "tensors_refined": self.tensors_refined,
                "refined": self.refined_score.to_json() if self.refined_score else None,
                "baseline": self.baseline.to_json() if self.baseline else None,
                "seconds": round(self.seconds, 2)}


DEFAULT_PERCENTILES = (99.9, 99.99, 99.999)
# Candidate outputs are measured on at most this many calibration samples (evenly spread): the int8
# model's run time is what the search costs, and 64 samples rank range choices stably.
MAX_SEARCH_SAMPLES = 64


def spread(samples: Sequence, limit: int) -> list:
    """At most `limit` of samples, evenly spread (deterministic)."""
    samples = list(samples)
    if len(samples) <= limit:
        return samples
    return [samples[int(i)] for i in np.linspace(0, len(samples) - 1, limit).round().astype(int)]


OWN_RANGES = "quantizer-own"  # the chosen name when no candidate keeps every output's cosine


def candidate_calibrations(base: dict, stats: RangeStats,
                           percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> dict[str, dict]:
    """name -> calibration: the quantizer's own rule (moving-average min-max, recomputed here, so
    base may come from a quick calibrate() on a few samples), the true min-max, each percentile and
    the MSE choice."""
    ema = dict(base)
    for name, r in stats.moving.items():
        if name in base:
            ema[name] = with_range(base[name], *r)
    out = {"minmax-ema": ema, "minmax": ranges_from_stats(base, stats, RangeMethod.MINMAX)}
    for p in percentiles:
        out[f"percentile-{p:g}"] = ranges_from_stats(base, stats, RangeMethod.PERCENTILE, percentile=p)
    out["mse"] = ranges_from_stats(base, stats, RangeMethod.MSE)
    return out


def search_ranges(float_model: bytes, samples: Sequence[dict], base: dict, quantize: Callable[[dict], bytes], *,
                  stats: RangeStats | None = None, percentiles: Sequence[float] = DEFAULT_PERCENTILES,
                  refine_seconds: float = 0.0, max_samples: int = MAX_SEARCH_SAMPLES,
                  objective: Objective | str = Objective.REL_L2, signature_key: str | None = None,
                  only: Sequence[str] | None = None, fixed: dict[str, dict] | None = None,
                  reference: dict[str, np.ndarray] | None = None,
                  on_step: Callable[[str], None] | None = None) -> RangeSearch:
    """Choose activation ranges by measuring the quantized model on CALIBRATION samples.

    `quantize(calibration) -> .tflite bytes` is the quantizer with its recipe (litert-quantizer's
    Quantizer.quantize, ~0.2 s for MobileNetV2); `base` its calibrate() result. Every candidate of
    candidate_calibrations() is quantized and scored (`objective`: relative L2 of the outputs vs
    float, or the softmax KL divergence for classifiers); the lowest wins among those that keep every
    output's cosine near the quantizer's own ranges' (Score.keeps; `RangeSearch.baseline`;
    when none does, those ranges themselves, named "minmax-ema"). With refine_seconds > 0, tensors are then revisited one at a time, trying the other
    candidates' range for that tensor alone and keeping changes that lower the error, until the
    time is spent (tensors with the widest spread between candidate ranges first).

    `only` limits the candidates by name; `fixed` ({tensor name: entry}) pins tensors in every
    candidate (e.g. outputs already chosen on a model with the same outputs). `reference`: the float
    outputs on spread(samples, max_samples) when the caller has them (the levels pass the source
    model's, for its equalized twin too); else one float run makes them.
    """

    t0 = time.monotonic()
    samples = list(samples)
    if not samples:
        raise CalibrationError("range search needs calibration samples; pass --calib data")
    stats = stats or range_stats(float_model, samples, base, signature_key=signature_key)
    judge = spread(samples, max_samples)
    reference = reference if reference is not None else judge_reference(float_model, judge)
    objective = Objective(objective)
    cands = candidate_calibrations(base, stats, percentiles)
    if only:
        cands = {k: v for k, v in cands.items() if k in only}
    for cal in cands.values():
        cal.update({n: e for n, e in (fixed or {}).items() if n in cal})
    own = dict(cands["minmax-ema"]) if "minmax-ema" in cands else candidate_calibrations(base, stats, ())["minmax-ema"]
    own.update({n: e for n, e in (fixed or {}).items() if n in own})
    outputs = [n for n in output_names(float_model) if n in stats.extremes and n in base and n not in (fixed or {})]
    if not any(is_score_vector(v) for v in reference.values()):
        outputs = []  # no class scores to keep the true max of, or to tune the output range for (KL undefined)
    if objective is Objective.KL and outputs:
        # Class scores: the top-1 logit IS the tail a clip would cut (MobileNetV2: its output clipped
        # at 21 of 31 cost 4 points of agreement), so every candidate keeps the outputs' true max.
        for cal in cands.values():
            for n in outputs:
                cal[n] = with_range(base[n], float(np.min(cal[n]["min"])), stats.extremes[n][1])
    measure = _Measure(reference, judge)
    scored = []
    for name, cal in cands.items():
        if on_step:
            on_step(f"ranges: measuring {name}")
        scored.append(RangeCandidate(name, measure(quantize(cal))))
    # The floor: the quantizer's own ranges, as measured (KL mode changed the candidates' outputs).
    own_measured = "minmax-ema" in cands and not (objective is Objective.KL and outputs)
    floor = (next(c.score for c in scored if c.name == "minmax-ema") if own_measured
             else measure(quantize(own)))
    fine = [c for c in scored if c.score.keeps(floor)]
    if fine:
        best = min(fine, key=lambda c: c.score.error(objective))
        chosen = cands[best.name]
    else:
        best, chosen = RangeCandidate(OWN_RANGES, floor), own
        scored.append(best)
    if objective is Objective.KL and outputs and fine:
        chosen, best = _class_score_ranges(chosen, best, outputs, base, stats, quantize, measure, on_step, floor)
        if best.name not in cands:
            scored.append(best)
        if best.score.error(objective) >= floor.error(objective):  # the outputs' true max did not pay here
            best, chosen = RangeCandidate(OWN_RANGES, floor), own
            scored.append(best)
    result = RangeSearch(chosen, best.name, tuple(scored), objective, seconds=time.monotonic() - t0,
                         baseline=floor)
    if refine_seconds <= 0:
        return result
    return refine_ranges(float_model, samples, base, quantize, result, stats=stats, seconds=refine_seconds,
                         percentiles=percentiles, max_samples=max_samples, on_step=on_step)


def model_key(model: bytes) -> bytes:
    """A small key for a model's bytes (a budget loop's probes of MiniLM are ~15 MB each: keyed by
    the bytes themselves, every probe would stay in memory until convert ends)."""
    import hashlib

    return hashlib.sha256(model).digest()


class _Measure:
    """score() of a quantized model on the judging samples, once per distinct model: candidates can
    quantize to the same bytes (an int8 SOFTMAX output's range is fixed at [0, 1], so the output
    range trials of a softmax classifier are its chosen model again: 4 judging runs, 34 s on
    ConvNeXt-T)."""

    def __init__(self, reference: dict[str, np.ndarray], judge: Sequence[dict]):
        self.reference, self.judge, self.seen = reference, judge, {}

    def __call__(self, model: bytes) -> Score:
        key = model_key(model)
        if key not in self.seen:
            self.seen[key] = score(self.reference, model, self.judge)
        return self.seen[key]


def output_names(float_model: bytes) -> list[str]:
    """Names of subgraph 0's output tensors."""
    from .tflite_edit import load
    from .tflite_edit import tensor_name

    sg = load(float_model).subgraphs[0]
    return [tensor_name(sg.tensors[int(i)]) for i in sg.outputs]


# Output ranges tried for class scores: the low end at these quantiles of the output's values (a
# logit far below the top one changes no probability, and a narrower range refines the top), then the
# high end widened by these factors (calibration may not have seen the largest logit: MobileNetV2 on
# 100 calibration photos saw 26.8, other photos reach 31).
OUTPUT_LOW_QUANTILES = (0.5, 0.9)
OUTPUT_HIGH_FACTORS = (1.1, 1.25)


def _class_score_ranges(cal: dict, best: RangeCandidate, outputs: list[str], base: dict, stats: RangeStats,
                        quantize, measure: _Measure, on_step, floor: Score) -> tuple[dict, RangeCandidate]:
    def quantile(name, q):
        h = stats.hists[name]
        lo, hi = stats.spans[name]
        i = int(np.searchsorted(np.cumsum(h) / max(h.sum(), 1), q))
        return lo + (hi - lo) * i / len(h)

    def trial(label, lo_of, hi_of):
        c = dict(cal)
        for n in outputs:
            c[n] = with_range(base[n], min(lo_of(n), 0.0), hi_of(n))
        if on_step:
            on_step(f"ranges: measuring output range {label}")
        return c, RangeCandidate(f"{best.name}+outputs-{label}", measure(quantize(c)))

    def low(n):
        return float(np.min(cal[n]["min"]))

    def high(n):
        return float(np.max(cal[n]["max"]))

    for q in OUTPUT_LOW_QUANTILES:
        c, r = trial(f"low-q{q:g}", lambda n, q=q: max(quantile(n, q), low(n)), high)
        if r.score.kl < best.score.kl and r.score.keeps(floor):
            cal, best = c, r
    for f in OUTPUT_HIGH_FACTORS:
        c, r = trial(f"high-x{f:g}", low, lambda n, f=f: stats.extremes[n][1] * f)
        if r.score.kl < best.score.kl and r.score.keeps(floor):
            cal, best = c, r
    return cal, best


def refine_ranges(float_model: bytes, samples: Sequence[dict], base: dict, quantize: Callable[[dict], bytes],
                  found: RangeSearch, *, stats: RangeStats, seconds: float,
                  percentiles: Sequence[float] = DEFAULT_PERCENTILES, max_samples: int = MAX_SEARCH_SAMPLES,
                  on_step: Callable[[str], None] | None = None) -> RangeSearch:
    """Per-tensor coordinate descent from a search_ranges() result: each tensor in turn tries the
    other candidates' range for it alone, keeping what lowers the error, until `seconds` are spent."""
    t0 = time.monotonic()
    judge = spread(list(samples), max_samples)
    reference = judge_reference(float_model, judge)
    cands = candidate_calibrations(base, stats, percentiles)
    start = dict(found.calibration)
    cands[found.chosen] = start
    start_score = score(reference, quantize(start), judge)  # `samples` may differ from the search's
    cal, s, changed = _refine(cands, found.chosen, start_score, stats, quantize, reference, judge,
                              t0 + seconds, found.objective, on_step)
    return RangeSearch(cal, found.chosen, found.candidates, found.objective, changed, s,
                       found.seconds + time.monotonic() - t0, found.baseline)


def _refine(cands: dict[str, dict], chosen: str, current: Score, stats: RangeStats, quantize, reference,
            judge, deadline: float, objective: Objective, on_step) -> tuple[dict, Score, int]:
    cal, start = dict(cands[chosen]), current

    def options(name):
        seen, out = [], []
        for c in cands.values():
            r = (float(np.min(c[name]["min"])), float(np.max(c[name]["max"])))
            if all(abs(r[0] - a) + abs(r[1] - b) > 0.02 * max(b - a, 1e-12) for a, b in seen):
                seen.append(r)
                out.append(c[name])
        return out

    def spread_of(name):
        highs = [float(np.max(c[name]["max"])) - float(np.min(c[name]["min"])) for c in cands.values()]
        return max(highs) / max(min(highs), 1e-12)

    changed = set()
    order = sorted(stats.hists, key=spread_of, reverse=True)
    for i, name in enumerate(order):
        if time.monotonic() > deadline:
            break
        if on_step:
            on_step(f"ranges: refining tensor {i + 1}/{len(order)}")
        for entry in options(name):
            if time.monotonic() > deadline:
                break
            if entry is cal[name] or (np.array_equal(entry["min"], cal[name]["min"])
                                      and np.array_equal(entry["max"], cal[name]["max"])):
                continue
            trial = dict(cal)
            trial[name] = entry
            s = score(reference, quantize(trial), judge)
            # The start already keeps every output (search_ranges); no single tensor may give one up.
            if s.error(objective) < current.error(objective) and s.keeps(start):
                cal, current = trial, s
                changed.add(name)
    return cal, current, len(changed)
