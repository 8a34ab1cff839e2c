"""Activation range selection beyond min-max (--calibration minmax|percentile|mse|auto).

litert-quantizer's calibrate() records, per activation tensor, a moving average (factor 0.95)
of each sample's min and max: neither the true range nor a chosen clip. True min-max lets one
outlier (common in transformers) stretch the int8 grid so the bulk shares a handful of levels.
Here the float model is run again over the same samples with every intermediate tensor
preserved, a histogram over the true [min, max] is built per tensor, and a range is chosen:

- percentile: clip both tails at the given percentile of the observed values;
- mse: the [lo, hi] (on a grid) minimising the expected squared error of uniform quantization
  with clipping, computed from the histogram (clipping error + step^2/12 rounding noise).

The result keeps litert-quantizer's own format ({tensor name: {"min": array, "max": array}}),
so it goes straight into Quantizer.quantize().

No fixed rule wins on every model (ImageNet MobileNetV2: percentile best; a fine-tuned dog-breed
MobileNetV2: min-max best), so `search_ranges` (RangeMethod.AUTO) measures instead: it quantizes
with every candidate (the quantizer's min-max, the true min-max, percentiles, MSE), runs each on the
CALIBRATION samples, and keeps the one whose output is closest to the float model's; optionally it
then refines tensor by tensor (coordinate descent within a time budget). Held-out samples are never
looked at, so the fidelity reported on them stays honest.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import Enum
from typing import Callable, Sequence

import numpy as np

from .errors import CalibrationError


class RangeMethod(str, Enum):
    MINMAX = "minmax"
    PERCENTILE = "percentile"
    MSE = "mse"
    AUTO = "auto"  # measured: search_ranges()


def _constant_tensor_names(model: bytes) -> set[str]:
    """Names of tensors backed by a buffer (weights): their ranges come from the data, not calibration."""
    from litert_quantizer.utils import tfl_flatbuffer_utils as fb

    m = fb.read_model(model)
    names = set()
    for sg in m.subgraphs:
        for t in sg.tensors:
            buf = m.buffers[t.buffer] if t.buffer < len(m.buffers) else None
            if buf is not None and ((buf.data is not None and len(buf.data)) or buf.offset > 1):
                names.add(t.name if isinstance(t.name, str) else t.name.decode())
    return names


def _activations(float_model: bytes, samples, base: dict, signature_key: str | None, flat: bool = True):
    """Yield {tensor name: values (raveled unless flat=False)} per sample for every float activation
    that base calibrated."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=float_model, experimental_preserve_all_tensors=True)
    key = signature_key or next(iter(interp.get_signature_list()))
    runner = interp.get_signature_runner(key)
    sg = runner._subgraph_index  # the signature's subgraph; tensor indices are per subgraph
    consts = _constant_tensor_names(float_model)
    targets = {
        d["name"]: d["index"] for d in interp.get_tensor_details(sg)
        if d["name"] in base and d["name"] not in consts and base[d["name"]]
        and "min" in base[d["name"]] and np.size(base[d["name"]]["min"]) == 1
        and np.issubdtype(d["dtype"], np.floating)
    }
    for s in samples:
        runner(**s)
        yield {name: interp.get_tensor(idx, sg).ravel() if flat else interp.get_tensor(idx, sg)
               for name, idx in targets.items()}


def observed_ranges(float_model: bytes, samples, base: dict, signature_key: str | None = None) -> dict:
    """True {name: (min, max)} over all samples.

    Needed because litert-quantizer's calibrate() keeps an exponential moving average (0.95) of
    each sample's min/max, not the overall extremes, so base can be narrower than the data.
    """
    spans = {}
    for acts in _activations(float_model, samples, base, signature_key):
        for name, x in acts.items():
            lo, hi = float(x.min()), float(x.max())
            if name in spans:
                lo, hi = min(lo, spans[name][0]), max(hi, spans[name][1])
            spans[name] = (lo, hi)
    return {n: r for n, r in spans.items() if r[1] > r[0]}


def collect_histograms(float_model: bytes, samples, spans: dict, *, bins: int = 2048,
                       signature_key: str | None = None) -> dict[str, np.ndarray]:
    """{name: histogram with bins over spans[name]} for each tensor in spans."""
    hists = {name: np.zeros(bins, np.int64) for name in spans}
    base = {name: {"min": np.float32(0)} for name in spans}  # only marks which tensors to read
    for acts in _activations(float_model, samples, base, signature_key):
        for name, x in acts.items():
            lo, hi = spans[name]
            # bincount on precomputed bin indices: much faster than np.histogram per tensor.
            i = np.clip(((x - lo) * (bins / (hi - lo))).astype(np.int64), 0, bins - 1)
            hists[name] += np.bincount(i, minlength=bins)
    return hists


def percentile_range(hist: np.ndarray, lo: float, hi: float, percentile: float) -> tuple[float, float]:
    """Clip (100 - percentile)% of the mass from EACH tail; always keep 0 in range."""
    edges = np.linspace(lo, hi, len(hist) + 1)
    cdf = np.cumsum(hist) / hist.sum()
    tail = (100.0 - percentile) / 100.0
    a = edges[np.searchsorted(cdf, tail, side="right")]
    b = edges[min(np.searchsorted(cdf, 1.0 - tail, side="left") + 1, len(hist))]
    return min(a, 0.0) if lo < 0 else lo, max(b, 0.0) if hi > 0 else hi


def mse_range(hist: np.ndarray, lo: float, hi: float, num_bits: int = 8, grid: int = 64) -> tuple[float, float]:
    """[a, b] minimising expected squared quantization error over the histogram."""
    n = len(hist)
    centers = lo + (np.arange(n) + 0.5) * (hi - lo) / n
    w = hist.astype(np.float64)
    nz = w > 0
    x, w = centers[nz], w[nz]
    levels = 2 ** num_bits - 1
    # Candidate ends: shrink each side towards 0 on a geometric grid (an outlier can sit orders
    # of magnitude beyond the bulk, so linear steps would be too coarse near the bulk).
    fr = np.geomspace(1e-3, 1.0, grid)
    a_cand = lo * fr if lo < 0 else np.array([lo])
    b_cand = hi * fr if hi > 0 else np.array([hi])
    A, B = np.meshgrid(a_cand, b_cand, indexing="ij")
    A, B = A.ravel()[:, None], B.ravel()[:, None]
    step = (B - A) / levels
    clip = np.where(x < A, (A - x) ** 2, 0.0) + np.where(x > B, (x - B) ** 2, 0.0)
    inside = (x >= A) & (x <= B)
    err = (w * (clip + inside * step ** 2 / 12.0)).sum(1)
    k = int(np.argmin(err))
    return float(A[k, 0]), float(B[k, 0])


@dataclass(frozen=True)
class RangeStats:
    """What range choices are made from, per activation tensor (by name): its true (min, max) over the
    samples, the quantizer's moving-average min/max (litert-quantizer's rule, factor 0.95), a
    histogram over `spans`, and per-channel (last axis) min/max."""

    spans: dict[str, tuple[float, float]]  # the histogram's range
    extremes: dict[str, tuple[float, float]]  # true min/max (may exceed spans: see range_stats)
    moving: dict[str, tuple[float, float]]
    hists: dict[str, np.ndarray]
    channels: dict[str, tuple[np.ndarray, np.ndarray]]
    samples: int


# Values per tensor and sample that go into its histogram: a fixed random subset of larger tensors.
# Percentiles down to 99.999 % stay well estimated from 64k values x dozens of samples, and it keeps
# statistics to about one interpreter run per sample.
HIST_VALUES = 1 << 16
SPAN_SAMPLES = 8
SPAN_SLACK = 0.5  # the histogram spans the first samples' range widened by 50 % on each side


def range_stats(float_model: bytes, samples, base: dict, *, bins: int = 2048,
                signature_key: str | None = None) -> RangeStats:
    """Statistics of every float activation base calibrated, over samples, in about one pass.

    A short first pass over SPAN_SAMPLES samples sets each histogram's span (their range, widened by
    SPAN_SLACK); the main pass bins every sample's values (a fixed random subset of at most
    HIST_VALUES per tensor) and tracks the true extremes, the moving-average min/max and per-channel
    min/max exactly. A value beyond the span counts in the edge bin: percentile and MSE choices stay
    within the span, min-max uses the true extremes."""
    samples = list(samples)
    if not samples:
        raise CalibrationError("range selection needs calibration samples; pass --calib data")
    first = observed_ranges(float_model, samples[:SPAN_SAMPLES], base, signature_key)
    spans = {}
    for name, (lo, hi) in first.items():
        pad = SPAN_SLACK * (hi - lo)
        spans[name] = (lo - pad if lo < 0 else lo, hi + pad if hi > 0 else hi)
    hists = {name: np.zeros(bins, np.int64) for name in spans}
    extremes: dict[str, tuple[float, float]] = {}
    moving: dict[str, tuple[float, float]] = {}
    channels: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    picks: dict[str, np.ndarray] = {}
    rng = np.random.default_rng(0)
    marks = {name: {"min": np.float32(0)} for name in spans}  # which tensors to read
    for acts in _activations(float_model, samples, marks, signature_key, flat=False):
        for name, x in acts.items():
            flat = x.reshape(-1)
            lo, hi = float(flat.min()), float(flat.max())
            if name in extremes:
                extremes[name] = (min(lo, extremes[name][0]), max(hi, extremes[name][1]))
                m = moving[name]
                moving[name] = (0.95 * m[0] + 0.05 * lo, 0.95 * m[1] + 0.05 * hi)
            else:
                extremes[name] = moving[name] = (lo, hi)
            per = x.reshape(-1, x.shape[-1]) if x.ndim else flat.reshape(1, -1)
            c_lo, c_hi = per.min(0), per.max(0)
            if name in channels:
                c_lo, c_hi = np.minimum(channels[name][0], c_lo), np.maximum(channels[name][1], c_hi)
            channels[name] = (c_lo, c_hi)
            if flat.size > HIST_VALUES:
                if name not in picks:
                    picks[name] = rng.choice(flat.size, HIST_VALUES, replace=False)
                flat = flat[picks[name]]
            a, b = spans[name]
            # bincount on precomputed bin indices: much faster than np.histogram per tensor.
            i = np.clip(((flat - a) * (bins / (b - a))).astype(np.int64), 0, bins - 1)
            hists[name] += np.bincount(i, minlength=bins)
    return RangeStats(spans, extremes, moving, hists, channels, len(samples))


def _with_range(entry: dict, a: float, b: float) -> dict:
    return dict(entry, min=np.full_like(np.asarray(entry["min"], dtype=np.float32), a),
                max=np.full_like(np.asarray(entry["max"], dtype=np.float32), b))


def tensor_range(stats: RangeStats, name: str, method, *, percentile: float = 99.99,
                 num_bits: int = 8) -> tuple[float, float]:
    """The (min, max) `method` picks for one tensor from its histogram."""
    method = RangeMethod(method)
    lo, hi = stats.spans[name]
    if method is RangeMethod.PERCENTILE:
        return percentile_range(stats.hists[name], lo, hi, percentile)
    if method is RangeMethod.MSE:
        return mse_range(stats.hists[name], lo, hi, num_bits)
    return stats.extremes[name]


def ranges_from_stats(base: dict, stats: RangeStats, method, *, percentile: float = 99.99,
                      num_bits: int = 8) -> dict:
    """A copy of base with every tensor in stats set to `method`'s range (MINMAX: the true extremes)."""
    if not 50.0 < percentile < 100.0:
        raise CalibrationError(f"percentile must be in (50, 100), got {percentile}")
    out = dict(base)
    for name in stats.hists:
        if name in base:
            out[name] = _with_range(base[name], *tensor_range(stats, name, method, percentile=percentile,
                                                              num_bits=num_bits))
    return out


def select_ranges(float_model: bytes, samples, method, base: dict, *, percentile: float = 99.99,
                  bins: int = 2048, num_bits: int = 8, signature_key: str | None = None) -> dict:
    """Return a copy of base (litert-quantizer calibration result) with activation ranges chosen
    by method from histograms of the float model's activations over samples (two passes: true
    extremes, then histograms). MINMAX returns base itself; AUTO needs search_ranges().
    """
    method = RangeMethod(method)
    if method is RangeMethod.MINMAX:
        return base
    if method is RangeMethod.AUTO:
        raise CalibrationError("--calibration auto measures candidates by quantizing them; call search_ranges()")
    if not samples:
        raise CalibrationError("range selection needs calibration samples; pass --calib data")
    if not 50.0 < percentile < 100.0:
        raise CalibrationError(f"percentile must be in (50, 100), got {percentile}")
    stats = range_stats(float_model, samples, base, bins=bins, signature_key=signature_key)
    return ranges_from_stats(base, stats, method, percentile=percentile, num_bits=num_bits)


def true_minmax(float_model: bytes, samples, base: dict, signature_key: str | None = None) -> dict:
    """base with each activation's range replaced by its true extremes (for comparisons)."""
    out = dict(base)
    for name, (a, b) in observed_ranges(float_model, list(samples), base, signature_key).items():
        out[name] = _with_range(base[name], a, b)
    return out


# --- Measured choice (RangeMethod.AUTO) ---------------------------------------------------------

class Objective(str, Enum):
    """What "closest to float" means when choosing. Output rel. L2 suits embeddings and regressors;
    for class scores it is dominated by the hundreds of small logits, and ranks range choices against
    top-1 agreement (MobileNetV2, 100 calibration photos: the lowest-L2 candidate had the lowest
    agreement on other photos, 0.70 vs 0.82), while the KL divergence of the softmax ranks them like
    agreement does."""

    REL_L2 = "rel_l2"
    KL = "kl"


@dataclass(frozen=True)
class Score:
    """How close a quantized model's outputs are to the float model's on some samples (outputs paired
    by order; worst output counts)."""

    rel_l2: float  # ||q - f|| / ||f|| over all samples
    cosine: float  # mean over samples
    top1: float | None  # argmax agreement for 2-D outputs with >= 2 columns, else None
    kl: float | None  # mean KL(softmax(f) || softmax(q)) for 2-D outputs with >= 2 columns
    samples: int

    def error(self, objective: Objective | str = Objective.REL_L2) -> float:
        if Objective(objective) is Objective.KL and self.kl is not None:
            return self.kl
        return self.rel_l2

    def to_json(self) -> dict:
        return {"rel_l2": self.rel_l2, "cosine": self.cosine, "top1_agreement": self.top1, "kl": self.kl,
                "samples": self.samples}


# Floor for probabilities an output already holds: int8 softmax outputs step by 1/256, so small
# probabilities come out as exactly 0 and would make KL infinite (dominated by classes nobody picks).
PROBABILITY_FLOOR = 1e-3


def _softmax(z: np.ndarray, probabilities: bool) -> np.ndarray:
    if probabilities:
        p = np.maximum(z, PROBABILITY_FLOOR)
        return p / p.sum(1, keepdims=True)
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def compare_outputs(reference: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> Score:
    rel, cos, top1, kl, n = 0.0, 1.0, None, None, 0
    for ref, cand in zip(reference.values(), got.values()):
        r = ref.reshape(len(ref), -1).astype(np.float64)
        c = cand.reshape(len(cand), -1).astype(np.float64)
        n = len(r)
        rel = max(rel, float(np.linalg.norm(r - c) / max(np.linalg.norm(r), 1e-12)))
        den = np.linalg.norm(r, axis=1) * np.linalg.norm(c, axis=1)
        cos = min(cos, float(np.mean(np.where(den > 0, (r * c).sum(1) / np.maximum(den, 1e-30), 1.0))))
        if r.shape[1] >= 2:
            agree = float((r.argmax(1) == c.argmax(1)).mean())
            top1 = agree if top1 is None else min(top1, agree)
            probs = bool((r >= 0).all() and np.allclose(r.sum(1), 1.0, atol=1e-3))
            p, q = _softmax(r, probs), _softmax(c, probs)
            d = float(np.mean(np.sum(p * (np.log(p + 1e-12) - np.log(q + 1e-12)), axis=1)))
            kl = d if kl is None else max(kl, d)
    return Score(rel, cos, top1, kl, n)


def score(reference: dict[str, np.ndarray], model: bytes, samples: Sequence[dict]) -> Score:
    """Run `model` on samples and compare with the float outputs `reference` (validate.run_model)."""
    from .validate import run_model

    return compare_outputs(reference, run_model(model, samples))


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

    @property
    def best(self) -> Score:
        return self.refined_score or next(c.score for c in self.candidates if c.name == self.chosen)

    def to_json(self) -> dict:
        return {"chosen": self.chosen, "objective": self.objective.value, "candidates": [c.to_json() for c in self.candidates],
                "tensors_refined": self.tensors_refined,
                "refined": self.refined_score.to_json() if self.refined_score else None,
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


def candidate_calibrations(base: dict, stats: RangeStats,
                           percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> dict[str, dict]:
    """name -> calibration: the quantizer's own rule (moving-average min-max, recomputed here, so
    base may come from a quick calibrate() on a few samples), the true min-max, each percentile and
    the MSE choice."""
    ema = dict(base)
    for name, r in stats.moving.items():
        if name in base:
            ema[name] = _with_range(base[name], *r)
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
                  on_step: Callable[[str], None] | None = None) -> RangeSearch:
    """Choose activation ranges by measuring the quantized model on CALIBRATION samples.

    `quantize(calibration) -> .tflite bytes` is the quantizer with its recipe (litert-quantizer's
    Quantizer.quantize, ~0.2 s for MobileNetV2); `base` its calibrate() result. Every candidate of
    candidate_calibrations() is quantized and scored (`objective`: relative L2 of the outputs vs
    float, or the softmax KL divergence for classifiers); the lowest wins. With refine_seconds > 0, tensors are then revisited one at a time, trying the other
    candidates' range for that tensor alone and keeping changes that lower the error, until the
    time is spent (tensors with the widest spread between candidate ranges first).

    `only` limits the candidates by name; `fixed` ({tensor name: entry}) pins tensors in every
    candidate (e.g. outputs already chosen on a model with the same outputs).
    """
    from .validate import run_model

    t0 = time.monotonic()
    samples = list(samples)
    if not samples:
        raise CalibrationError("range search needs calibration samples; pass --calib data")
    stats = stats or range_stats(float_model, samples, base, signature_key=signature_key)
    judge = spread(samples, max_samples)
    reference = run_model(float_model, judge)
    objective = Objective(objective)
    cands = candidate_calibrations(base, stats, percentiles)
    if only:
        cands = {k: v for k, v in cands.items() if k in only}
    for cal in cands.values():
        cal.update({n: e for n, e in (fixed or {}).items() if n in cal})
    outputs = [n for n in output_names(float_model) if n in stats.extremes and n in base and n not in (fixed or {})]
    if objective is Objective.KL:
        # Class scores: the top-1 logit IS the tail a clip would cut (MobileNetV2: its output clipped
        # at 21 of 31 cost 4 points of agreement), so every candidate keeps the outputs' true max.
        for cal in cands.values():
            for n in outputs:
                cal[n] = _with_range(base[n], float(np.min(cal[n]["min"])), stats.extremes[n][1])
    scored = []
    for name, cal in cands.items():
        if on_step:
            on_step(f"ranges: measuring {name}")
        scored.append(RangeCandidate(name, score(reference, quantize(cal), judge)))
    best = min(scored, key=lambda c: c.score.error(objective))
    chosen = cands[best.name]
    if objective is Objective.KL and outputs:
        chosen, best = _class_score_ranges(chosen, best, outputs, base, stats, quantize, reference, judge, on_step)
        scored.append(best)
    result = RangeSearch(chosen, best.name, tuple(scored), objective, seconds=time.monotonic() - t0)
    if refine_seconds <= 0:
        return result
    return refine_ranges(float_model, samples, base, quantize, result, stats=stats, seconds=refine_seconds,
                         percentiles=percentiles, max_samples=max_samples, on_step=on_step)


def output_names(float_model: bytes) -> list[str]:
    """Names of subgraph 0's output tensors."""
    from .bias_correction import load_model
    from .tflite_edit import tensor_name

    sg = load_model(float_model).subgraphs[0]
    return [tensor_name(sg.tensors[int(i)]) for i in sg.outputs]


# Output ranges tried for class scores: the low end at these quantiles of the output's values (a
# logit far below the top one changes no probability, and a narrower range refines the top), then the
# high end widened by these factors (calibration may not have seen the largest logit: MobileNetV2 on
# 100 calibration photos saw 26.8, other photos reach 31).
OUTPUT_LOW_QUANTILES = (0.5, 0.9)
OUTPUT_HIGH_FACTORS = (1.1, 1.25)


def _class_score_ranges(cal: dict, best: RangeCandidate, outputs: list[str], base: dict, stats: RangeStats,
                        quantize, reference, judge, on_step) -> tuple[dict, RangeCandidate]:
    def quantile(name, q):
        h = stats.hists[name]
        lo, hi = stats.spans[name]
        i = int(np.searchsorted(np.cumsum(h) / max(h.sum(), 1), q))
        return lo + (hi - lo) * i / len(h)

    def trial(label, lo_of, hi_of):
        c = dict(cal)
        for n in outputs:
            c[n] = _with_range(base[n], min(lo_of(n), 0.0), hi_of(n))
        if on_step:
            on_step(f"ranges: measuring output range {label}")
        return c, RangeCandidate(f"{best.name}+outputs-{label}", score(reference, quantize(c), judge))

    def low(n):
        return float(np.min(cal[n]["min"]))

    def high(n):
        return float(np.max(cal[n]["max"]))

    for q in OUTPUT_LOW_QUANTILES:
        c, r = trial(f"low-q{q:g}", lambda n, q=q: max(quantile(n, q), low(n)), high)
        if r.score.kl < best.score.kl:
            cal, best = c, r
    for f in OUTPUT_HIGH_FACTORS:
        c, r = trial(f"high-x{f:g}", low, lambda n, f=f: stats.extremes[n][1] * f)
        if r.score.kl < best.score.kl:
            cal, best = c, r
    return cal, best


def refine_ranges(float_model: bytes, samples: Sequence[dict], base: dict, quantize: Callable[[dict], bytes],
                  found: RangeSearch, *, stats: RangeStats, seconds: float,
                  percentiles: Sequence[float] = DEFAULT_PERCENTILES, max_samples: int = MAX_SEARCH_SAMPLES,
                  on_step: Callable[[str], None] | None = None) -> RangeSearch:
    """Per-tensor coordinate descent from a search_ranges() result: each tensor in turn tries the
    other candidates' range for it alone, keeping what lowers the error, until `seconds` are spent."""
    from .validate import run_model

    t0 = time.monotonic()
    judge = spread(list(samples), max_samples)
    reference = run_model(float_model, judge)
    cands = candidate_calibrations(base, stats, percentiles)
    start = dict(found.calibration)
    cands[found.chosen] = start
    start_score = score(reference, quantize(start), judge)  # `samples` may differ from the search's
    cal, s, changed = _refine(cands, found.chosen, start_score, stats, quantize, reference, judge,
                              t0 + seconds, found.objective, on_step)
    return RangeSearch(cal, found.chosen, found.candidates, found.objective, changed, s,
                       found.seconds + time.monotonic() - t0)


def _refine(cands: dict[str, dict], chosen: str, current: Score, stats: RangeStats, quantize, reference,
            judge, deadline: float, objective: Objective, on_step) -> tuple[dict, Score, int]:
    cal = dict(cands[chosen])

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
            if s.error(objective) < current.error(objective):
                cal, current = trial, s
                changed.add(name)
    return cal, current, len(changed)
