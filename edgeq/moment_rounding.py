"""Output-aware rounding of int8 weights: each weight rounds up or down so the LAYER's output error is
smallest on calibration inputs, not each weight's own error (no training: exact for small filters,
a local search for larger ones).

Round-to-nearest minimises |W_q - W| per weight; what the model feels is the layer's output error
(W_q - W) x. Over calibration inputs its mean square is a quadratic form, e^T M e per output channel,
with e the channel's rounding error and M = E[x x^T] the second moments of the channel's input
patches (kh*kw*cin values; kh*kw per channel for a depthwise convolution). Errors that cancel inside
that form cost nothing, and neighbouring pixels are strongly correlated, so the choice matters:
MobileNetV2's first depthwise layer (9 weights a filter, channel ranges 0.007 to 15 after BatchNorm
folding) costs most of the int8 weights' error when rounded to nearest.

Per layer, each weight takes one of the two levels around it (floor or ceil of W / s, the quantizer's
own per-channel scale s kept): every combination is tried for filters of up to EXACT_FAN_IN weights
(3x3 depthwise: 512 per channel); larger ones run a local search from round-to-nearest, flipping
any weight whose flip lowers e^T M e, sweep after sweep until nothing improves. Either way a layer
never ends worse than round-to-nearest on the data it was fitted on. The channels of a layer are
searched at once (vectorised); the gradient M e is updated per flip, so a sweep costs up to
fan_in^2 * channels.

Measured on torchvision's ImageNet MobileNetV2 with int8 weights and float activations (the weights'
share of the int8 error), 32 calibration photos for M, 131 other photos judged: round-to-nearest
top-1 agreement 0.863 (softmax KL 0.060); depthwise layers searched 0.962 (KL 0.016); every conv
0.939-0.947 (KL 0.003). With int8 activations too (levels of optimize.py), see docs/accuracy.md.

Fitting W_q x_q to W x instead (x_q the int8 model's own input, so rounding also absorbs upstream
activation rounding) was measured and is not used: done for every layer from one run of the int8
model, the layers compensate the same shifts twice (MobileNetV2 top-1 agreement 0.48); AdaRound gets
this right by running layers one after another (learned_rounding.py, level best).

M comes from the FLOAT model's input of each layer (so upstream activation rounding is not chased)
plus a small ridge (RIDGE of its mean diagonal) where rows are few for the weights a channel has.
Layers are left at round-to-nearest where there are fewer rows than that (a classifier's
FULLY_CONNECTED sees one row per sample: the search would fit the samples) or the fan-in exceeds
MAX_FAN_IN (the matrix and the search grow with its square).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from . import tflite_edit as te
from .errors import QuantizationError
from .weight_layers import WeightLayer, capture, valid_pads, weight_layers

MAX_FAN_IN = 1024  # M is fan_in^2 float64; the search costs fan_in^2 * channels a sweep (1152: 3-5 s a layer)
ROWS_PER_SAMPLE = 1024  # input rows (output positions) per sample and layer that enter M
RIDGE = 1e-3  # of M's mean diagonal, added to its diagonal
MAX_SWEEPS = 8
# The searches stop on work done (multiply-adds of the gradient updates), not on the clock: the same
# model and samples give the same rounding on any host and under any load. Measured on 2 cores at
# 0.8-1.2e8 a second: MobileNetV2's 52 layers 1.1e9 (~9 s), MiniLM's 30 searched FCs 2.3e9 (~20-28 s).
# SEARCH_SECONDS only caps a host far slower than that.
SEARCH_WORK = 2.5e9
ROW_WORK = 20_000  # a visited row's fixed cost (numpy calls, ~1.5e-4 s), in the same units
SEARCH_SECONDS = 120.0
EXACT_FAN_IN = 10  # up to this many weights per channel (3x3 depthwise: 9) every floor/ceil choice is tried


@dataclass(frozen=True)
class SearchedLayer:
    op_index: int
    op: str
    name: str
    weights: int
    flipped: int  # weights now on the other side of round-to-nearest
    error_nearest: float  # sum over channels of e^T M e / rows, round-to-nearest
    error_searched: float  # ... after the search

    def to_json(self) -> dict:
        return {"op_index": self.op_index, "op": self.op, "tensor": self.name, "weights": self.weights,
                "flipped": self.flipped, "error_nearest": self.error_nearest,
                "error_searched": self.error_searched}


@dataclass(frozen=True)
class MomentRounding:
    model: bytes
    layers: tuple[SearchedLayer, ...]
    skipped: int  # layers left at round-to-nearest (fan-in above MAX_FAN_IN, fewer input rows than
    # it, or not reached within the work budget)
    samples: int
    seconds: float
    work: float = 0.0  # search work done (multiply-adds; SEARCH_WORK)
    # weight tensor name -> (int8 weights, per-channel scales) that changed: the same rounding for
    # another quantization of the same float model (apply_levels), whatever its activation ranges
    levels: dict = field(default_factory=dict, compare=False, repr=False)

    def to_json(self) -> dict:
        return {"samples": self.samples, "seconds": round(self.seconds, 2), "work": self.work,
                "layers": len(self.layers),
                "layers_skipped": self.skipped,
                "weights_flipped": sum(r.flipped for r in self.layers),
                "weights": sum(r.weights for r in self.layers),
                "per_layer": [r.to_json() for r in self.layers]}


# --- Input second moments ----------------------------------------------------------------------------

def fan_in(layer: WeightLayer) -> int:
    """Weights per output channel."""
    w = layer.float_weight
    return int(w.shape[1] * w.shape[2]) if layer.kind == "DEPTHWISE_CONV_2D" else int(np.prod(w.shape[1:]))


def _patches(layer: WeightLayer, x: np.ndarray, rows: int, rng: np.random.Generator) -> np.ndarray:
    """[positions, kh, kw, cin]: the input values that output positions of a convolution see, for at
    most `rows` positions (an unbiased random subset when the map has more)."""
    x = x.reshape(x.shape[-3:])
    kh, kw = layer.float_weight.shape[1:3]
    ph, pw, oh, ow = valid_pads(layer, x.shape[0], x.shape[1])
    xp = np.pad(x, (ph, pw, (0, 0)))
    (sh, sw), (dh, dw) = layer.stride, layer.dilation
    pos = np.arange(oh * ow) if oh * ow <= rows else rng.choice(oh * ow, rows, replace=False)
    r, c = (pos // ow) * sh, (pos % ow) * sw
    return np.stack([xp[r + i * dh, c + j * dw] for i in range(kh) for j in range(kw)], axis=1).reshape(
        len(pos), kh, kw, x.shape[-1])


class _Moments:
    """M = E[x x^T] over one layer's input rows (float model), accumulated sample by sample."""

    def __init__(self, layer: WeightLayer, rng: np.random.Generator):
        self.layer, self.rng = layer, rng
        self.m: np.ndarray | None = None
        self.rows = 0

    def _rows(self, x: np.ndarray) -> np.ndarray:
        lay = self.layer
        if lay.kind == "FULLY_CONNECTED":
            p = x.reshape(-1, lay.float_weight.shape[1])
            return p[self.rng.choice(len(p), ROWS_PER_SAMPLE, replace=False)] if len(p) > ROWS_PER_SAMPLE else p
        p = _patches(lay, x, ROWS_PER_SAMPLE, self.rng)
        if lay.kind == "DEPTHWISE_CONV_2D" and lay.channels != p.shape[-1]:  # multiplier: per output channel
            p = np.repeat(p, lay.channels // p.shape[-1], axis=-1)
        # depthwise: [rows, kh*kw, channels], one k*k matrix per channel; else [rows, kh*kw*cin] in
        # TFLite's [O, KH, KW, I] order
        return p.reshape(len(p), -1, p.shape[-1]) if lay.kind == "DEPTHWISE_CONV_2D" else p.reshape(len(p), -1)

    def add(self, x: np.ndarray) -> None:
        p = self._rows(x)
        if self.layer.kind == "DEPTHWISE_CONV_2D":
            pt = np.ascontiguousarray(p.transpose(2, 0, 1))  # [channels, rows, k]
            m = pt.transpose(0, 2, 1) @ pt
        else:
            m = p.T @ p
        # float32 products of one sample, float64 sums across samples
        self.m = m.astype(np.float64) if self.m is None else self.m + m
        self.rows += len(p)

    def matrix(self) -> np.ndarray:
        m = self.m / max(self.rows, 1)
        n = m.shape[-1]
        if self.rows < 4 * n:  # few rows for this many directions: lean towards nearest rounding
            diag = np.einsum("...kk->...k", m).mean(axis=-1)
            m = m + RIDGE * np.asarray(diag)[..., None, None] * np.eye(n)
        return m


# --- The search ------------------------------------------------------------------------------------------

class Work:
    """Search work done against a limit (see SEARCH_WORK), shared by the layers of one rounding."""

    def __init__(self, limit: float = float("inf"), deadline: float = float("inf")):
        self.limit, self.deadline, self.done = limit, deadline, 0.0

    def add(self, n: float) -> None:
        self.done += n

    @property
    def spent(self) -> bool:
        return self.done >= self.limit or time.monotonic() > self.deadline


def search(w_over_s: np.ndarray, scale: np.ndarray, moments: np.ndarray,
           sweeps: int = MAX_SWEEPS, work: Work | None = None) -> tuple[np.ndarray, float, float]:
    """(int levels, error nearest, error searched) for weights w_over_s [fan_in, channels] (W / s),
    scales [channels] and moments [fan_in, fan_in] shared by the channels, or [channels, fan_in,
    fan_in] one per channel; the error is the sum over channels of e^T M e. Each level is floor or
    ceil of W / s, within [-127, 127]: all 2^fan_in choices up to EXACT_FAN_IN weights a channel,
    else single-weight flips from round-to-nearest until none helps (or `work` is spent: every sweep
    leaves a valid, never worse, rounding)."""
    work = work or Work()
    k, channels = w_over_s.shape
    if k <= EXACT_FAN_IN:
        work.add((1 << k) * k * k * channels)
        return _exact(w_over_s, scale, moments)
    per_channel = moments.ndim == 3
    lo = np.clip(np.floor(w_over_s), -127, 127)
    hi = np.clip(lo + 1, -127, 127)
    q = np.clip(np.round(w_over_s), -127, 127)
    e = (q - w_over_s) * scale  # output-scale rounding error
    g = np.einsum("ckl,lc->kc", moments, e) if per_channel else moments @ e  # half the gradient
    diag = np.einsum("ckk->kc", moments) if per_channel else np.diag(moments)[:, None]
    before = float((e * g).sum())

    def gains(at):
        """For weights `at` (a row index, or everything): the level step that can help (against the
        gradient) and whether it does: moving weight i of channel c by `step` changes e^T M e by
        2 step g_i + step^2 M_ii."""
        d = -np.sign(g[at])
        step = d * scale
        new = q[at] + d
        return d, step, (new >= lo[at]) & (new <= hi[at]) & (2 * step * g[at] + step * step * diag[at] < 0)

    for _ in range(sweeps):
        if work.spent:
            break
        rows = np.flatnonzero(gains(slice(None))[2].any(axis=1))
        work.add(k * channels + len(rows) * channels)
        if not len(rows):
            break
        for i in rows:  # g changes with every move: each row is re-checked when its turn comes
            work.add(ROW_WORK)
            d, step, go = gains(i)
            cols = np.flatnonzero(go)
            if not len(cols):
                continue
            q[i, cols] += d[cols]
            e[i, cols] += step[cols]
            if per_channel:
                g[:, cols] += moments[cols, :, i].T * step[cols]
                work.add(k * len(cols))
            elif 4 * len(cols) > len(go):  # many channels move: one dense update beats a column gather
                g += np.outer(moments[:, i], np.where(go, step, 0.0))
                work.add(k * channels)
            else:
                g[:, cols] += np.outer(moments[:, i], step[cols])
                work.add(k * len(cols))
    return q, before, float((e * g).sum())


def _exact(w_over_s: np.ndarray, scale: np.ndarray, moments: np.ndarray) -> tuple[np.ndarray, float, float]:
    """search() by trying every floor/ceil combination, channel by channel in blocks."""
    import itertools

    k, channels = w_over_s.shape
    m = np.broadcast_to(moments, (channels, k, k)) if moments.ndim == 2 else moments
    bits = np.array(list(itertools.product((0.0, 1.0), repeat=k)))  # [2^k, k]
    lo = np.clip(np.floor(w_over_s), -127, 127)
    hi = np.clip(lo + 1, -127, 127)
    q = np.clip(np.round(w_over_s), -127, 127)
    e0 = (q - w_over_s) * scale
    before = float(np.einsum("kc,ckl,lc->", e0, m, e0))
    block = max(1, (1 << 22) // (len(bits) * k))
    for c0 in range(0, channels, block):
        c = slice(c0, min(c0 + block, channels))
        levels = lo[None, :, c] + bits[:, :, None]  # [2^k, k, block]
        e = (levels - w_over_s[None, :, c]) * scale[None, None, c]
        cost = np.einsum("bkc,ckl,blc->bc", e, m[c], e)
        cost[(levels > hi[None, :, c]).any(axis=1)] = np.inf  # at +127 the ceil is not a level
        pick = cost.argmin(axis=0)
        best = levels[pick, :, np.arange(levels.shape[2])].T  # [k, block]
        e_best = (best - w_over_s[:, c]) * scale[c]
        e_near = e0[:, c]
        keep = np.einsum("kc,ckl,lc->c", e_best, m[c], e_best) < np.einsum("kc,ckl,lc->c", e_near, m[c], e_near)
        q[:, c] = np.where(keep[None], best, q[:, c])
    e = (q - w_over_s) * scale
    return q, before, float(np.einsum("kc,ckl,lc->", e, m, e))


def _as_matrix(layer: WeightLayer, w: np.ndarray) -> np.ndarray:
    """Weights [fan_in, output channels] in the order _Moments builds rows."""
    if layer.kind == "DEPTHWISE_CONV_2D":
        return w.reshape(-1, w.shape[-1])
    return w.reshape(w.shape[0], -1).T


def round_weights(quant_model: bytes, float_model: bytes, samples: Sequence[dict], *,
                  work: float = SEARCH_WORK, seconds: float = SEARCH_SECONDS,
                  on_step: Callable[[str], None] | None = None, seed: int = 0) -> MomentRounding:
    """The int8 model with every int8 CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED's weights rounded
    for the smallest output error on samples (CALIBRATION samples; see module doc). Scales, biases,
    ops, dtypes and size stay as they are. The searches share `work` (and at most `seconds`), cheapest
    layers first; layers not reached keep nearest rounding (counted in `skipped`)."""
    t0 = time.monotonic()
    samples = list(samples)
    if not samples:
        raise QuantizationError("weight rounding needs calibration samples; pass --calib data")
    layers = weight_layers(quant_model, float_model)
    todo = [lay for lay in layers if fan_in(lay) <= MAX_FAN_IN]
    if not todo:
        return MomentRounding(quant_model, (), len(layers), len(samples), time.monotonic() - t0)
    if on_step:
        on_step(f"weight rounding: input moments of {len(todo)} layers")
    rng = np.random.default_rng(seed)
    moments = [_Moments(lay, rng) for lay in todo]
    by_input: dict[int, list[_Moments]] = {}
    for mo in moments:
        by_input.setdefault(mo.layer.float_input, []).append(mo)

    def visit(_, t, v):
        for mo in by_input[t]:
            mo.add(v)

    capture(float_model, samples, sorted(by_input), visit)
    m = te.load(quant_model)
    sg = m.subgraphs[0]
    done, skipped, levels = [], len(layers) - len(todo), {}
    budget = Work(work, time.monotonic() + seconds)
    # Cheapest first (a sweep costs fan_in^2 * channels): the small filters, where most of a CNN's
    # rounding error sits, are never the ones the budget runs out on.
    order = sorted(zip(todo, moments), key=lambda p: fan_in(p[0]) ** 2 * p[0].channels)
    for i, (lay, mo) in enumerate(order):
        if on_step:
            on_step(f"weight rounding: layer {i + 1}/{len(todo)} ({lay.kind})")
        if budget.spent:
            skipped += len(todo) - i
            break
        if mo.rows < fan_in(lay):  # fewer rows than weights per channel (a classifier's FC): the
            skipped += 1            # search would fit these samples, not the layer
            continue
        scale = lay.weight_scale.astype(np.float64)
        w = _as_matrix(lay, lay.float_weight.astype(np.float64)) / np.where(scale == 0, 1.0, scale)
        q, before, after = search(w, scale, mo.matrix(), work=budget)
        nearest = _as_matrix(lay, lay.quantized_weight(m).astype(np.float64))
        flipped = int((q != nearest).sum())
        if flipped:
            new = (q.T if lay.kind != "DEPTHWISE_CONV_2D" else q).reshape(lay.float_weight.shape).astype(np.int8)
            _store(m, sg, lay.weight, new)
            levels[te.tensor_name(sg.tensors[lay.weight])] = (new, lay.weight_scale.copy())
        done.append(SearchedLayer(lay.op_index, lay.kind, lay.name, int(q.size), flipped, before, after))
    done.sort(key=lambda r: r.op_index)
    return MomentRounding(te.pack(m), tuple(done), skipped, len(samples), time.monotonic() - t0, budget.done,
                          levels)


def _store(m, sg, index: int, value: np.ndarray) -> None:
    te.set_constant(m, sg, index, value, new_buffer=te.buffer_shared(m, sg.tensors[index].buffer))


def apply_levels(model: bytes, levels: dict) -> bytes:
    """`model` (another quantization of the float model round_weights saw: other activation ranges,
    other per-op precisions) with the same rounded int8 weights, where a weight tensor of that name
    is int8 with the same shape and scales; others are left as they are."""
    if not levels:
        return model
    m = te.load(model)
    changed = False
    for sg in m.subgraphs:
        for i, t in enumerate(sg.tensors):
            hit = levels.get(te.tensor_name(t))
            p = te.qparams(t) if hit is not None and t.type == 9 else None
            if p is None or tuple(int(d) for d in t.shape) != hit[0].shape:
                continue
            if len(p[0]) in (1, len(hit[1])) and np.allclose(np.broadcast_to(p[0], hit[1].shape), hit[1], rtol=1e-6):
                _store(m, sg, i, hit[0])
                changed = True
    return te.pack(m) if changed else model
