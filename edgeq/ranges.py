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
MobileNetV2: min-max best), so range_search.py (RangeMethod.AUTO) measures the candidates built here.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from enum import Enum

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


def _interpreter(float_model: bytes):
    """An interpreter that keeps every tensor. Its first run packs the weights for XNNPACK (4 s for
    ConvNeXt-T's 114 MB), so passes over the same model share one."""
    from ai_edge_litert.interpreter import Interpreter

    from .quiet import quiet_native

    with quiet_native():  # the interpreter warns about preserve_all_tensors on stderr (one-line errors)
        return Interpreter(model_content=float_model, experimental_preserve_all_tensors=True, num_threads=2)


def _activations(float_model: bytes, samples, base: dict, signature_key: str | None, interp=None,
                 maps: dict | None = None):
    """Yield {tensor name: (raveled values, their min, their max)} per sample for every float
    activation that base calibrated (`interp`: an _interpreter() of float_model to reuse). The
    extremes come with the values: one pass over a CNN's maps each instead of three. The values are
    views of the interpreter's buffers (no copy: MobileNetV2's 28 MB a sample), valid until the next
    sample runs: a caller copies what it keeps. `maps`, when given, gets each yielded tensor's whole
    map ([..., channels] view) of the sample, also where the raveled values left padding sentinels out."""
    if interp is None:
        interp = _interpreter(float_model)
    else:
        interp.reset_all_variables()  # a pass starts from the model's initial state, as a new one does
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
        acts = x = None  # the previous sample's views are not read past here
        runner(**s)
        acts = {}
        for name, idx in targets.items():
            x = interp.tensor(idx)() if sg == 0 else interp.get_tensor(idx, sg)  # tensor(): subgraph 0
            if maps is not None:
                maps[name] = x
            x = x.ravel()
            if not x.size:
                continue
            lo, hi = float(x.min()), float(x.max())
            if not -SENTINEL < lo <= hi < SENTINEL:  # a PAD by -inf before a max-pool (or NaN): the values around it
                x = x[np.abs(x) < SENTINEL]
                if not x.size:
                    continue
                lo, hi = float(x.min()), float(x.max())
            acts[name] = (x, lo, hi)
        yield acts


def observed_ranges(float_model: bytes, samples, base: dict, signature_key: str | None = None, *,
                    interp=None) -> dict:
    """True {name: (min, max)} over all samples.

    Needed because litert-quantizer's calibrate() keeps an exponential moving average (0.95) of
    each sample's min/max, not the overall extremes, so base can be narrower than the data.
    """
    spans = {}
    for acts in _activations(float_model, samples, base, signature_key, interp):
        for name, (_, lo, hi) in acts.items():
            if name in spans:
                lo, hi = min(lo, spans[name][0]), max(hi, spans[name][1])
            spans[name] = (lo, hi)
    return {n: r for n, r in spans.items() if r[1] > r[0]}


# Values this large are padding sentinels, not activations: ONNX exports pad by -inf before a
# max-pool (open_nsfw through onnx2torch), and the TFLite converter writes -inf as -FLT_MAX. Range
# statistics skip them (with them edgeq's MSE rule read NaN, and the range trial it fed LiteRT crashed
# with a segmentation fault); in int8 they saturate to the lowest step, which a max-pool ignores.
SENTINEL = 1e30


def finite_calibration(float_model: bytes, samples, base: dict, signature_key: str | None = None) -> dict:
    """`base` (a litert-quantizer calibration result) with every min/max that is infinite or a
    SENTINEL replaced by the tensor's extremes without them over `samples` (0 kept in range)."""
    bad = {n: e for n, e in base.items() if isinstance(e, dict) and "min" in e and "max" in e
           and not ((np.abs(e["min"]) < SENTINEL).all() and (np.abs(e["max"]) < SENTINEL).all())}
    if not bad:
        return base
    seen = observed_ranges(float_model, samples, bad, signature_key)
    fixed = dict(base)
    for name, entry in bad.items():
        lo, hi = seen.get(name, (0.0, 0.0))
        lo, hi = min(lo, 0.0), max(hi, 0.0)  # the quantizer keeps 0 in every range
        fixed[name] = with_range(entry, lo, hi if hi > lo else lo + 1e-6)
    return fixed


# A tensor calibration never saw move (a ReLU unit dead on every sample: SSR-Net's age heads) has the
# range [0, 0], which the quantizer writes as scale 3.9e-12. 0 is exact at any scale, but XNNPACK
# refuses a FULLY_CONNECTED or MUL whose input * weight / output scale ratio passes 256 (2.4e6 there),
# so the whole int8 model could not run; the TFLite converter's file could not either. Such ranges
# are written [0, DEAD_WIDTH] (scale 1/255): 0 stays exact, the ratios stay ordinary, and a unit
# that wakes up on other data still has levels.
DEAD_WIDTH = 1.0


def live_ranges(calibration: dict) -> dict:
    """`calibration` (a litert-quantizer calibration result) with every activation range within
    1e-6 of 0 at both ends widened to DEAD_WIDTH from its low end; itself if there is none. (A range
    of one value away from 0, a per-window minimum a candidate rule collapsed, is left to the
    quantizer, which stretches it to 0: widening it from its low end lost 0 from the range.)"""
    dead = {n for n, e in calibration.items() if isinstance(e, dict) and "min" in e and "max" in e
            and np.all(np.abs(np.asarray(e["min"], np.float64)) < 1e-6)
            and np.all(np.abs(np.asarray(e["max"], np.float64)) < 1e-6)}
    if not dead:
        return calibration
    out = dict(calibration)
    for name in dead:
        lo = min(float(np.min(calibration[name]["min"])), 0.0)
        out[name] = with_range(calibration[name], lo, lo + DEAD_WIDTH)
    return out


def collect_histograms(float_model: bytes, samples, spans: dict, *, bins: int = 2048,
                       signature_key: str | None = None) -> dict[str, np.ndarray]:
    """{name: histogram with bins over spans[name]} for each tensor in spans."""
    hists = {name: np.zeros(bins, np.int64) for name in spans}
    base = {name: {"min": np.float32(0)} for name in spans}  # only marks which tensors to read
    for acts in _activations(float_model, samples, base, signature_key):
        for name, (x, _, _) in acts.items():
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
    # err(a, b) = clip error below a + clip error above b + (weight inside) * step^2 / 12; each clip
    # term from prefix sums of w, w*x, w*x^2 (x is sorted), so the grid costs O(grid^2), not O(grid^2 * bins).
    cw = np.concatenate(([0.0], np.cumsum(w)))
    cwx = np.concatenate(([0.0], np.cumsum(w * x)))
    cwx2 = np.concatenate(([0.0], np.cumsum(w * x * x)))
    ia = np.searchsorted(x, a_cand, side="left")  # values below a: x[:ia]
    ib = np.searchsorted(x, b_cand, side="right")  # values above b: x[ib:]
    below = a_cand ** 2 * cw[ia] - 2 * a_cand * cwx[ia] + cwx2[ia]
    above = ((cwx2[-1] - cwx2[ib]) - 2 * b_cand * (cwx[-1] - cwx[ib]) + b_cand ** 2 * (cw[-1] - cw[ib]))
    inside = np.maximum(cw[ib][None, :] - cw[ia][:, None], 0.0)
    step = (b_cand[None, :] - a_cand[:, None]) / levels
    err = below[:, None] + above[None, :] + inside * step ** 2 / 12.0
    i, j = np.unravel_index(int(np.argmin(err)), err.shape)
    return float(a_cand[i]), float(b_cand[j])


@dataclass(frozen=True)
class RangeStats:
    """What range choices are made from, per activation tensor (by name): its true (min, max) over the
    samples, the quantizer's moving-average min/max (litert-quantizer's rule, factor 0.95), a
    histogram over `spans`, and how many samples."""

    spans: dict[str, tuple[float, float]]  # the histogram's range
    extremes: dict[str, tuple[float, float]]  # true min/max (may exceed spans: see range_stats)
    moving: dict[str, tuple[float, float]]
    hists: dict[str, np.ndarray]
    samples: int
    # per-channel (min, max) over the samples, of the tensors a caller named (range_stats' `channels`)
    channels: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)


# Values per tensor and sample that go into its histogram: a fixed random subset of larger tensors.
# Percentiles down to 99.999 % stay well estimated from 64k values x dozens of samples, and it keeps
# statistics to about one interpreter run per sample.
HIST_VALUES = 1 << 16
SPAN_SAMPLES = 8
SPAN_SLACK = 0.5  # the histogram spans the first samples' range widened by 50 % on each side


def range_stats(float_model: bytes, samples, base: dict, *, bins: int = 2048,
                signature_key: str | None = None, prior: RangeStats | None = None,
                channels: Collection[str] = ()) -> RangeStats:
    """Statistics of every float activation base calibrated, over samples, in about one pass.

    A short first pass over SPAN_SAMPLES samples sets each histogram's span (their range, widened by
    SPAN_SLACK); the main pass bins every sample's values (a fixed random subset of at most
    HIST_VALUES per tensor) and tracks the true extremes and the moving-average min/max exactly. A
    value beyond the span counts in the edge bin: percentile and MSE choices stay within the span,
    min-max uses the true extremes. With `prior` (statistics of the same float model over other
    samples) the pass continues it: its spans and tensors, `samples` added to its counts. `channels`:
    tensors whose per-channel extremes (last axis) are kept too, read in the same pass (cross-layer
    equalization's: a float run of their own over the same samples took 4.5 s of HED's 51 s level)."""
    samples = list(samples)
    if not samples:
        raise CalibrationError("range selection needs calibration samples; pass --calib data")
    interp = _interpreter(float_model)
    if prior is not None:
        spans = dict(prior.spans)
        bins = len(next(iter(prior.hists.values()))) if prior.hists else bins
        hists = {name: h.copy() for name, h in prior.hists.items()}
    else:
        first = observed_ranges(float_model, samples[:SPAN_SAMPLES], base, signature_key, interp=interp)
        spans = {}
        for name, (lo, hi) in first.items():
            pad = SPAN_SLACK * (hi - lo)
            spans[name] = (lo - pad if lo < 0 else lo, hi + pad if hi > 0 else hi)
        hists = {name: np.zeros(bins, np.int64) for name in spans}
    extremes: dict[str, tuple[float, float]] = dict(prior.extremes) if prior else {}
    moving: dict[str, tuple[float, float]] = dict(prior.moving) if prior else {}
    picks: dict[str, np.ndarray] = {}
    rng = np.random.default_rng(0)
    marks = {name: {"min": np.float32(0)} for name in spans}  # which tensors to read
    maps: dict[str, np.ndarray] = {}
    per_channel: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    missed = set()  # not read on every sample: no per-channel extremes
    for acts in _activations(float_model, samples, marks, signature_key, interp, maps if channels else None):
        for name in channels:
            x = maps.get(name) if name in acts else None
            if x is None or x.ndim == 0 or not x.size:
                missed.add(name)
                continue
            v = x.reshape(-1, x.shape[-1])
            if name in per_channel:
                np.minimum(per_channel[name][0], v.min(0), out=per_channel[name][0])
                np.maximum(per_channel[name][1], v.max(0), out=per_channel[name][1])
            else:
                per_channel[name] = (v.min(0), v.max(0))
        maps.clear()
        for name, (flat, lo, hi) in acts.items():
            if name in extremes:
                extremes[name] = (min(lo, extremes[name][0]), max(hi, extremes[name][1]))
                m = moving[name]
                moving[name] = (0.95 * m[0] + 0.05 * lo, 0.95 * m[1] + 0.05 * hi)
            else:
                extremes[name] = moving[name] = (lo, hi)
            if flat.size > HIST_VALUES:
                if name not in picks:  # sorted: the same values, gathered in memory order
                    picks[name] = np.sort(rng.choice(flat.size, HIST_VALUES, replace=False))
                flat = flat[picks[name]]
            else:
                flat = flat.copy()  # binned in place below
            a, b = spans[name]
            # bincount on precomputed bin indices: much faster than np.histogram per tensor.
            flat -= np.float32(a)
            flat *= np.float32(bins / (b - a))
            np.clip(flat, 0, bins - 1, out=flat)
            hists[name] += np.bincount(flat.astype(np.intp), minlength=bins)
    return RangeStats(spans, extremes, moving, hists, len(samples) + (prior.samples if prior else 0),
                      {n: r for n, r in per_channel.items() if n not in missed})


def with_range(entry: dict, a: float, b: float) -> dict:
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
            out[name] = with_range(base[name], *tensor_range(stats, name, method, percentile=percentile,
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
        out[name] = with_range(base[name], a, b)
    return out
