"""Activation range selection beyond min-max (--calibration minmax|percentile|mse).

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
"""

from __future__ import annotations

from enum import Enum

import numpy as np

from edgeq.errors import CalibrationError


class RangeMethod(str, Enum):
    MINMAX = "minmax"
    PERCENTILE = "percentile"
    MSE = "mse"


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


def _activations(float_model: bytes, samples, base: dict, signature_key: str | None):
    """Yield {tensor name: values} per sample for every float activation that base calibrated."""
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
        yield {name: interp.get_tensor(idx, sg).ravel() for name, idx in targets.items()}


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


def select_ranges(float_model: bytes, samples, method, base: dict, *, percentile: float = 99.99,
                  bins: int = 2048, num_bits: int = 8, signature_key: str | None = None) -> dict:
    """Return a copy of base (litert-quantizer calibration result) with activation ranges chosen
    by method from histograms of the float model's activations over samples (two passes: true
    extremes, then histograms). MINMAX returns base itself.
    """
    method = RangeMethod(method)
    if method is RangeMethod.MINMAX:
        return base
    if not samples:
        raise CalibrationError("range selection needs calibration samples; pass --calib data")
    if not 50.0 < percentile < 100.0:
        raise CalibrationError(f"percentile must be in (50, 100), got {percentile}")
    samples = list(samples)
    spans = observed_ranges(float_model, samples, base, signature_key)
    hists = collect_histograms(float_model, samples, spans, bins=bins, signature_key=signature_key)
    out = dict(base)
    for name, hist in hists.items():
        lo, hi = spans[name]
        if method is RangeMethod.PERCENTILE:
            a, b = percentile_range(hist, lo, hi, percentile)
        else:
            a, b = mse_range(hist, lo, hi, num_bits)
        q = dict(base[name])
        q["min"] = np.full_like(np.asarray(base[name]["min"], dtype=np.float32), a)
        q["max"] = np.full_like(np.asarray(base[name]["max"], dtype=np.float32), b)
        out[name] = q
    return out


def true_minmax(float_model: bytes, samples, base: dict, signature_key: str | None = None) -> dict:
    """base with each activation's range replaced by its true extremes (for comparisons)."""
    out = dict(base)
    for name, (a, b) in observed_ranges(float_model, list(samples), base, signature_key).items():
        out[name] = dict(base[name], min=np.full_like(np.asarray(base[name]["min"], np.float32), a),
                         max=np.full_like(np.asarray(base[name]["max"], np.float32), b))
    return out
