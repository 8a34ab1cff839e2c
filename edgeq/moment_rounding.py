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

Sequential fit (Sequential, what level fast runs): the first layers in graph order are fitted to
W_q x_q ~ W x instead, x_q the layer's input in the int8 model as rounded so far (one int8 run of 16
calibration samples a layer), so a layer's rounding also takes up the activation rounding upstream.
With e = W_q - W the mean square of W_q x_q - W x is e^T M e + 2 e^T E[x_q (x_q - x)^T] w + const,
M = E[x_q x_q^T]: the same search with a linear term. One layer at a time matters: fitted for every
layer from one int8 run, the layers compensated the same shifts twice (MobileNetV2 top-1 agreement
0.48). Measured on MobileNetV2, 131 photos, the rounding alone over the float-input fit: softmax KL
0.060 -> 0.041 on seed 0 (docs/accuracy.md). The layers share a work budget in multiply-adds of the
int8 runs (SEQUENTIAL_WORK); the layers past it are fitted to float inputs.

For the other layers M comes from the FLOAT model's input (so upstream activation rounding is not
chased). Either way M gets a small ridge (RIDGE of its mean diagonal) where rows are few for the
weights a channel has.
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
# Sequential fit (Sequential): samples of the int8 runs, their work in multiply-adds (a run's
# weight-layer multiply-adds x samples, per layer fitted) and input rows a sample. MobileNetV2 (0.3e9
# a run) gets its first 31 of 52 layers, which on its 4 photo splits did as well as 49 (the classifier
# FC cannot be: one row a sample) for 3 s less of level fast: KL on 131 photos 0.039-0.065 either way
# (0.049-0.103 fitted to float inputs). 8 samples were too few (seed 0, 1024 rows a sample: KL 0.062
# against 0.041).
SEQUENTIAL_SAMPLES = 16
SEQUENTIAL_WORK = 1.5e11
SEQUENTIAL_ROWS = 512  # rows a sample: 8192 a layer where maps are large
FLOAT_MAP_BYTES = 256 << 20  # float input maps of the next sequential layers held at once
CUT_GROUP = 4  # sequential layers run on one cut of the int8 model (a cut packs the model: ~14 ms)


@dataclass(frozen=True)
class SearchedLayer:
    op_index: int
    op: str
    name: str
    weights: int
    flipped: int  # weights now on the other side of round-to-nearest
    error_nearest: float  # sum over channels of e^T M e / rows, round-to-nearest
    error_searched: float  # ... after the search
    # fitted to the int8 model's own inputs (Sequential): the errors are then E|W_q x_q - W x|^2 less
    # E|W x_q - W x|^2 (what the float weights would leave on those inputs), negative when below it
    sequential: bool = False

    def to_json(self) -> dict:
        return {"op_index": self.op_index, "op": self.op, "tensor": self.name, "weights": self.weights,
                "flipped": self.flipped, "error_nearest": self.error_nearest,
                "error_searched": self.error_searched, "sequential": self.sequential}


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
    # another quantization of the same float model (apply_levels). Sequential layers' rounding was
    # fitted to THIS quantization's activations: on another one (refined ranges, a budget-loop plan)
    # it is an approximation, which the callers judge again.
    levels: dict = field(default_factory=dict, compare=False, repr=False)

    def to_json(self) -> dict:
        return {"samples": self.samples, "seconds": round(self.seconds, 2), "work": self.work,
                "layers": len(self.layers),
                "layers_sequential": sum(r.sequential for r in self.layers),
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
    most `rows` positions (an unbiased random subset when the map has more). A batch of maps counts
    as more positions: the converter writes a dilated Keras Conv2D as SPACE_TO_BATCH_ND, a CONV_2D
    on a batch of 2-16 maps and BATCH_TO_SPACE_ND (tempocnn's fcn.h5 failed on a reshape here)."""
    x = x.reshape((-1,) + x.shape[-3:])
    kh, kw = layer.float_weight.shape[1:3]
    ph, pw, oh, ow = valid_pads(layer, x.shape[1], x.shape[2])
    xp = np.pad(x, ((0, 0), ph, pw, (0, 0))) if any(ph) or any(pw) else x  # a 1x1 layer: no copy
    (sh, sw), (dh, dw) = layer.stride, layer.dilation
    total = len(x) * oh * ow
    pos = np.arange(total) if total <= rows else rng.choice(total, rows, replace=False)
    b, at = pos // (oh * ow), pos % (oh * ow)
    r, c = (at // ow) * sh, (at % ow) * sw
    return np.stack([xp[b, r + i * dh, c + j * dw] for i in range(kh) for j in range(kw)], axis=1).reshape(
        len(pos), kh, kw, x.shape[-1])


def _channel_gram(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[channels, k, k]: per channel c the sum over rows of a[r, :, c] b[r, :, c]^T (a, b [rows, k,
    channels]). A k x k product per channel is slow as a batched matmul (numpy's small-matrix path:
    8 ms for 512 rows of 576 channels); sums over the rows take 2.7 ms, 4.9 ms for a pair."""
    k = a.shape[1]
    out = np.empty((a.shape[2], k, k), np.result_type(a, b))
    if a is b:  # symmetric: each pair once, from contiguous taps (5x5 filters: 2x faster than strided)
        taps = np.ascontiguousarray(a.transpose(1, 0, 2))
        for i in range(k):
            for j in range(i, k):
                out[:, i, j] = out[:, j, i] = np.einsum("rc,rc->c", taps[i], taps[j])
        return out
    for i in range(k):
        out[:, i, :] = np.einsum("rc,rlc->cl", a[:, i], b)
    return out


class _Moments:
    """M = E[x x^T] over one layer's input rows (float model), accumulated sample by sample."""

    def __init__(self, layer: WeightLayer, rng: np.random.Generator, rows_per_sample: int = ROWS_PER_SAMPLE):
        self.layer, self.rng, self.per_sample = layer, rng, rows_per_sample
        self.m: np.ndarray | None = None
        self.rows = 0

    def _rows(self, x: np.ndarray) -> np.ndarray:
        lay, n = self.layer, self.per_sample
        if lay.kind == "FULLY_CONNECTED":
            p = x.reshape(-1, lay.float_weight.shape[1])
            return p[self.rng.choice(len(p), n, replace=False)] if len(p) > n else p
        p = _patches(lay, x, n, self.rng)
        # Depthwise output channel c reads input channel c // multiplier: one M per INPUT channel, for
        # all its outputs (search() maps them). torchcrepe's first layer (1 input, 128 outputs, 512
        # taps) took 106 s computing the same 512x512 matrix 128 times a sample.
        # depthwise: [rows, kh*kw, input channels], one k*k matrix per channel; else [rows, kh*kw*cin]
        # in TFLite's [O, KH, KW, I] order
        return p.reshape(len(p), -1, p.shape[-1]) if lay.kind == "DEPTHWISE_CONV_2D" else p.reshape(len(p), -1)

    def add(self, x: np.ndarray) -> None:
        p = self._rows(x)
        m = _channel_gram(p, p) if self.layer.kind == "DEPTHWISE_CONV_2D" else p.T @ p
        # float32 products of one sample, float64 sums across samples
        self.m = m.astype(np.float64) if self.m is None else self.m + m
        self.rows += len(p)

    def matrix(self) -> np.ndarray:
        """M; for a depthwise layer one per INPUT channel (search() gives output channel c the
        c // multiplier-th): repeated per output, torchcrepe-full's first layer (1 input channel,
        1024 outputs, 512 taps) took 2 GB a copy and 11 s of its 19 s fit."""
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


def _owners(moments: np.ndarray, channels: int) -> np.ndarray | None:
    """For per-channel moments shared by groups of output channels ([groups, k, k], a depthwise
    layer's per input channel): each output channel's group; None when there is one a channel."""
    if moments.ndim != 3 or len(moments) == channels:
        return None
    return np.arange(channels) // (channels // len(moments))


def _per_channel_product(moments: np.ndarray, e: np.ndarray, owners: np.ndarray | None) -> np.ndarray:
    """[k, channels]: M_c e_c for every channel c (moments [channels or groups, k, k], e [k, channels])."""
    if owners is None:
        return np.einsum("ckl,lc->kc", moments, e)
    per = e.shape[1] // len(moments)  # a group's channels are consecutive
    return np.concatenate([moments[i] @ e[:, i * per:(i + 1) * per] for i in range(len(moments))], axis=1)


def search(w_over_s: np.ndarray, scale: np.ndarray, moments: np.ndarray,
           sweeps: int = MAX_SWEEPS, work: Work | None = None,
           linear: np.ndarray | None = None) -> tuple[np.ndarray, float, float]:
    """(int levels, error nearest, error searched) for weights w_over_s [fan_in, channels] (W / s),
    scales [channels] and moments [fan_in, fan_in] shared by the channels, or [channels, fan_in,
    fan_in] one per channel (or [groups, fan_in, fan_in], each for channels // groups consecutive
    channels); the error is the sum over channels of e^T M e (+ 2 e^T linear, linear
    [fan_in, channels], when given: the sequential fit's cross term). Each level is floor or
    ceil of W / s, within [-127, 127]: all 2^fan_in choices up to EXACT_FAN_IN weights a channel,
    else single-weight flips from round-to-nearest until none helps (or `work` is spent: every sweep
    leaves a valid, never worse, rounding)."""
    work = work or Work()
    k, channels = w_over_s.shape
    if k <= EXACT_FAN_IN:
        work.add((1 << k) * k * k * channels)
        return _exact(w_over_s, scale, moments, linear)
    per_channel = moments.ndim == 3
    owners = _owners(moments, channels)
    lo = np.clip(np.floor(w_over_s), -127, 127)
    hi = np.clip(lo + 1, -127, 127)
    q = np.clip(np.round(w_over_s), -127, 127)
    e = (q - w_over_s) * scale  # output-scale rounding error
    lin = np.zeros_like(e) if linear is None else linear
    g = (_per_channel_product(moments, e, owners) if per_channel else moments @ e) + lin  # half the gradient
    diag = np.einsum("ckk->kc", moments) if per_channel else np.diag(moments)[:, None]
    if owners is not None:
        diag = diag[:, owners]
    before = float((e * (g + lin)).sum())  # e^T M e + 2 e^T lin, with g = M e + lin

    def gains(at, g_at):
        """For weights `at` (a row index, or everything) whose gradient rows are g_at: the level step
        that can help (against the gradient) and whether it does: moving weight i of channel c by
        `step` changes e^T M e by 2 step g_i + step^2 M_ii."""
        d = -np.sign(g_at)
        step = d * scale
        new = q[at] + d
        return d, step, (new >= lo[at]) & (new <= hi[at]) & (2 * step * g_at + step * step * diag[at] < 0)

    for _ in range(sweeps):
        if work.spent:
            break
        rows = np.flatnonzero(gains(slice(None), g)[2].any(axis=1))
        work.add(k * channels + len(rows) * channels)
        if not len(rows):
            break
        if not per_channel:
            _sweep_blocks(rows, q, e, g, moments, gains, work)
            continue
        for i in rows:  # g changes with every move: each row is re-checked when its turn comes
            work.add(ROW_WORK)
            d, step, go = gains(i, g[i])
            cols = np.flatnonzero(go)
            if not len(cols):
                continue
            q[i, cols] += d[cols]
            e[i, cols] += step[cols]
            g[:, cols] += moments[cols if owners is None else owners[cols], :, i].T * step[cols]
            work.add(k * len(cols))
    return q, before, float((e * (g + lin)).sum())


# Rows of a sweep whose moves reach the whole gradient through one matrix product (_sweep_blocks).
BLOCK_ROWS = 32


def _sweep_blocks(rows, q, e, g, moments, gains, work: Work) -> None:
    """One sweep of search() over `rows` with moments shared by the channels, in place: row by row,
    each moving the channels where a step helps, as search() does, but a move updates only the
    gradient rows of its block of BLOCK_ROWS (which decide the next moves there); the block's moves
    reach the rest of g in one matrix product after it. The same decisions up to float summation
    order, for a fraction of the memory traffic: a move's rank-1 update of all fan_in rows was most
    of MobileNetV2's 1x1 convolutions' search (fan-in up to 960)."""
    k, channels = g.shape
    for b0 in range(0, len(rows), BLOCK_ROWS):
        block = rows[b0:b0 + BLOCK_ROWS]
        gb = g[block]  # kept current move by move
        mb = moments[np.ix_(block, block)]
        delta = np.zeros((len(block), channels))
        for j, i in enumerate(block):  # g changes with every move: each row is re-checked when its turn comes
            work.add(ROW_WORK)
            d, step, go = gains(i, gb[j])
            cols = np.flatnonzero(go)
            if not len(cols):
                continue
            q[i, cols] += d[cols]
            e[i, cols] += step[cols]
            delta[j, cols] = step[cols]
            gb[:, cols] += np.outer(mb[:, j], step[cols])
            work.add(k * channels if 4 * len(cols) > channels else k * len(cols))
        g += moments[:, block] @ delta


def _exact(w_over_s: np.ndarray, scale: np.ndarray, moments: np.ndarray,
           linear: np.ndarray | None = None) -> tuple[np.ndarray, float, float]:
    """search() by trying every floor/ceil combination, channel by channel in blocks."""
    import itertools

    k, channels = w_over_s.shape
    owners = _owners(moments, channels)  # k is small here: the groups' moments repeated cost little
    m = (np.broadcast_to(moments, (channels, k, k)) if moments.ndim == 2
         else moments if owners is None else moments[owners])
    lin = np.zeros((k, channels)) if linear is None else linear

    def cost(e, c):  # e [k, block] -> [block]
        return np.einsum("kc,ckl,lc->c", e, m[c], e) + 2 * np.einsum("kc,kc->c", e, lin[:, c])

    bits = np.array(list(itertools.product((0.0, 1.0), repeat=k)))  # [2^k, k]
    pairs = (bits[:, :, None] * bits[:, None, :]).reshape(len(bits), k * k)  # [2^k, k*k]
    lo = np.clip(np.floor(w_over_s), -127, 127)
    hi = np.clip(lo + 1, -127, 127)
    q = np.clip(np.round(w_over_s), -127, 127)
    e0 = (q - w_over_s) * scale
    before = float(cost(e0, slice(None)).sum())
    block = max(1, (1 << 22) // len(bits))
    for c0 in range(0, channels, block):
        c = slice(c0, min(c0 + block, channels))
        # Levels lo + b (b a row of bits) leave e = e_lo + s b, so the cost is a constant plus
        # 2 s b.(M e_lo + lin) + s^2 b^T M b: two matmuls over all 2^k choices (was a [2^k, k, k]
        # einsum a channel block: 3x3 depthwise layers' search 3x faster).
        e_lo = (lo[:, c] - w_over_s[:, c]) * scale[c]
        s = scale[c]
        linear_part = bits @ (2 * s * (np.einsum("ckl,lc->kc", m[c], e_lo) + lin[:, c]))
        costs = linear_part + pairs @ (s * s * m[c].reshape(-1, k * k).T)  # [2^k, block]
        costs[(bits @ (lo[:, c] + 1 > hi[:, c])) > 0] = np.inf  # at +127 the ceil is not a level
        pick = costs.argmin(axis=0)
        best = lo[:, c] + bits[pick].T  # [k, block]
        e_best = (best - w_over_s[:, c]) * scale[c]
        keep = cost(e_best, c) < cost(e0[:, c], c)
        q[:, c] = np.where(keep[None], best, q[:, c])
    e = (q - w_over_s) * scale
    return q, before, float(cost(e, slice(None)).sum())


def _as_matrix(layer: WeightLayer, w: np.ndarray) -> np.ndarray:
    """Weights [fan_in, output channels] in the order _Moments builds rows."""
    if layer.kind == "DEPTHWISE_CONV_2D":
        return w.reshape(-1, w.shape[-1])
    return w.reshape(w.shape[0], -1).T


@dataclass(frozen=True)
class Sequential:
    """Fit the first layers (graph order) to the int8 model's own inputs, one after another (see the
    module doc): each costs one int8 run of `samples` calibration samples, and the layers share
    `work` multiply-adds of those runs (the model's weight-layer multiply-adds x samples a layer);
    the layers past it are fitted to float inputs as without it. Work, not time: the same layers on
    any host."""

    samples: int = SEQUENTIAL_SAMPLES
    work: float = SEQUENTIAL_WORK

    def __post_init__(self):
        if self.samples < 1 or self.work < 0:
            raise ValueError(f"Sequential needs samples >= 1 and work >= 0 (got {self.samples}, {self.work})")


class _PairedMoments(_Moments):
    """For the sequential fit: over the same input rows of the int8 model's input x_q and the float
    model's x, M = E[x_q x_q^T] and C = E[x_q x^T]."""

    def __init__(self, layer: WeightLayer, rng: np.random.Generator):
        super().__init__(layer, rng, SEQUENTIAL_ROWS)
        self.c: np.ndarray | None = None

    def add_pair(self, xq: np.ndarray, x: np.ndarray) -> None:
        state = self.rng.bit_generator.state
        pq = self._rows(xq)
        self.rng.bit_generator.state = state  # the same rows of both
        pf = self._rows(x)
        if self.layer.kind == "DEPTHWISE_CONV_2D":
            m, c = _channel_gram(pq, pq), _channel_gram(pq, pf)
        else:
            m, c = pq.T @ pq, pq.T @ pf
        self.m = m.astype(np.float64) if self.m is None else self.m + m
        self.c = c.astype(np.float64) if self.c is None else self.c + c
        self.rows += len(pq)

    def linear(self, w: np.ndarray) -> np.ndarray:
        """The search's linear term E[x_q (x_q - x)^T] w, per channel: with it e^T M e + 2 e^T lin is
        the mean square of W_q x_q - W x less that of W x_q - W x (e = W_q - W), so negative where the
        rounding does better on x_q than the float weights would."""
        d = (self.m - self.c) / max(self.rows, 1)
        if self.layer.kind != "DEPTHWISE_CONV_2D":
            return d @ w
        return _per_channel_product(d, w, _owners(d, w.shape[1]))


def _macs(layers: Sequence[WeightLayer], m) -> float:
    """Multiply-adds of one run of the weight layers (output elements x weights a channel)."""
    sg = m.subgraphs[0]
    return sum(_elements(sg.tensors[lay.output].shape) * fan_in(lay) for lay in layers)


def _elements(shape) -> float:
    return float(np.prod([max(int(d), 1) for d in shape])) if shape is not None else 0.0


def _float_inputs(float_model: bytes, fsg, samples: Sequence[dict], layers: Sequence[WeightLayer]) -> dict:
    """The float model's input maps of `layers` on samples, {tensor index: [per sample]}, the
    layers taken from the front while they fit in FLOAT_MAP_BYTES (at least one); fsg: the float
    model's subgraph 0."""
    want, size = [], 0
    for lay in layers:
        if lay.float_input in want:
            continue
        n = 4 * len(samples) * _elements(fsg.tensors[lay.float_input].shape)
        if want and size + n > FLOAT_MAP_BYTES:
            break
        want.append(lay.float_input)
        size += n
    maps: dict = {t: [None] * len(samples) for t in want}

    def keep(i, t, v):
        maps[t][i] = v.copy()

    capture(float_model, samples, want, keep)
    return maps


def round_weights(quant_model: bytes, float_model: bytes, samples: Sequence[dict], *,
                  work: float = SEARCH_WORK, seconds: float = SEARCH_SECONDS,
                  on_step: Callable[[str], None] | None = None, seed: int = 0,
                  sequential: Sequential | None = None) -> MomentRounding:
    """The int8 model with every int8 CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED's weights rounded
    for the smallest output error on samples (CALIBRATION samples; see module doc). Scales, biases,
    ops, dtypes and size stay as they are. The searches share `work` (and at most `seconds`), cheapest
    layers first; layers not reached keep nearest rounding (counted in `skipped`). With `sequential`,
    the first layers in graph order are fitted to the int8 model's own inputs first (Sequential)."""
    t0 = time.monotonic()
    samples = list(samples)
    if not samples:
        raise QuantizationError("weight rounding needs calibration samples; pass --calib data")
    layers = weight_layers(quant_model, float_model)
    todo = [lay for lay in layers if fan_in(lay) <= MAX_FAN_IN]
    if not todo:
        return MomentRounding(quant_model, (), len(layers), len(samples), time.monotonic() - t0)
    m = te.load(quant_model)
    sg = m.subgraphs[0]
    in_order = sorted(todo, key=lambda lay: lay.op_index)
    seq_samples = samples[:: max(1, len(samples) // sequential.samples)][:sequential.samples] if sequential else []
    run = _macs(layers, m) * len(seq_samples)
    # Sequential layers: those that fit the work, whose rows can fit them (a classifier's FC cannot).
    n_seq = min(len(in_order), int(sequential.work // run)) if sequential and run > 0 else 0
    fm = te.load(float_model) if n_seq else None
    fsg = fm.subgraphs[0] if n_seq else None
    seq = [lay for lay in in_order[:n_seq] if _rows_per_sample(lay, fsg) * len(seq_samples) >= fan_in(lay)]
    rest = [lay for lay in todo if lay not in seq]
    rng = np.random.default_rng(seed)
    moments = [_Moments(lay, rng) for lay in rest]
    if rest:
        if on_step:
            on_step(f"weight rounding: input moments of {len(rest)} layers")
        by_input: dict[int, list[_Moments]] = {}
        for mo in moments:
            by_input.setdefault(mo.layer.float_input, []).append(mo)

        def visit(_, t, v):
            for mo in by_input[t]:
                mo.add(v)

        capture(float_model, samples, sorted(by_input), visit)
    done, skipped, levels = [], len(layers) - len(todo), {}
    # The clock cap starts after the sequential part (bounded by its work): its int8 runs must not
    # take the float-input layers' time on a slow host.
    budget = Work(work)

    def fit(lay: WeightLayer, matrix: np.ndarray, linear=None) -> np.ndarray | None:
        """Search the layer's rounding, store it in `m`; the new int8 weights (None: none flipped)."""
        scale = lay.weight_scale.astype(np.float64)
        w = _as_matrix(lay, lay.float_weight.astype(np.float64)) / np.where(scale == 0, 1.0, scale)
        q, before, after = search(w, scale, matrix, work=budget, linear=linear)
        nearest = _as_matrix(lay, lay.quantized_weight(m).astype(np.float64))
        flipped = int((q != nearest).sum())
        new = None
        if flipped:
            new = (q.T if lay.kind != "DEPTHWISE_CONV_2D" else q).reshape(lay.float_weight.shape).astype(np.int8)
            _store(m, sg, lay.weight, new)
            levels[te.tensor_name(sg.tensors[lay.weight])] = (new, lay.weight_scale.copy())
        done.append(SearchedLayer(lay.op_index, lay.kind, lay.name, int(q.size), flipped, before, after,
                                  sequential=linear is not None))
        return new

    # Sequential: each layer's input from the int8 model as rounded so far, in graph order. The int8
    # model is run cut after the inputs of the next CUT_GROUP layers (te.prefix; a fitted layer's
    # weights are written into the cut in place when it reads them), the float one after the last
    # sequential layer's; whole when they cannot be cut. MobileNetV2: its runs 1.2 s -> 0.9 s;
    # ConvNeXt-T's three sequential layers lie in its first stage (rounding 54 s -> 41 s).
    current: bytearray | None = None
    reads: set[int] | None = None  # tensors the cut reads (None: the whole model)
    float_prefix = (te.prefix(fm, [lay.float_input for lay in seq]) if seq else None) or float_model
    maps = {}
    for i, lay in enumerate(seq):
        if on_step:
            on_step(f"weight rounding: layer {i + 1}/{len(todo)} ({lay.kind}, on the int8 model's inputs)")
        if budget.spent:
            break
        if lay.float_input not in maps:
            maps = _float_inputs(float_prefix, fsg, seq_samples, seq[i:])
        if current is None or i % CUT_GROUP == 0:
            group = [g.input for g in seq[i:i + CUT_GROUP]]
            cut = te.prefix(m, group)
            current = bytearray(cut or te.pack(m))
            reads = {t for o in te.ancestors(sg, group) for t in te.ints(sg.operators[o].inputs)} if cut else None
        # Its own generator per layer: the rows it samples do not depend on how many layers the
        # work budget left to the float-input fit (which draws from `rng`).
        pm = _PairedMoments(lay, np.random.default_rng([seed, lay.op_index]))

        def pair(j, _, v, lay=lay, pm=pm):
            pm.add_pair(v, maps[lay.float_input][j])

        capture(bytes(current), seq_samples, [lay.input], pair)
        new = fit(lay, pm.matrix(), pm.linear(_as_matrix(lay, lay.float_weight.astype(np.float64))))
        # when the write cannot land (a buffer shared with another tensor: _store gave it its own), cut again
        if (new is not None and (reads is None or lay.weight in reads)
                and not te.overwrite_buffer(current, sg.tensors[lay.weight].buffer, new)):
            current = None
    maps = {}
    budget.deadline = time.monotonic() + seconds
    skipped += len(seq) - sum(1 for r in done if r.sequential)
    # The rest on float inputs, cheapest first (a sweep costs fan_in^2 * channels): the small filters,
    # where most of a CNN's rounding error sits, are never the ones the budget runs out on.
    order = sorted(zip(rest, moments), key=lambda p: fan_in(p[0]) ** 2 * p[0].channels)
    for i, (lay, mo) in enumerate(order):
        if on_step:
            on_step(f"weight rounding: layer {len(seq) + i + 1}/{len(todo)} ({lay.kind})")
        if budget.spent:
            skipped += len(order) - i
            break
        if mo.rows < fan_in(lay):  # fewer rows than weights per channel (a classifier's FC): the
            skipped += 1            # search would fit these samples, not the layer
            continue
        fit(lay, mo.matrix())
    done.sort(key=lambda r: r.op_index)
    return MomentRounding(te.pack(m), tuple(done), skipped, len(samples), time.monotonic() - t0, budget.done,
                          levels)


def _rows_per_sample(lay: WeightLayer, fsg) -> int:
    """Input rows one sample gives the layer (output positions, at most SEQUENTIAL_ROWS); fsg: the
    float model's subgraph 0."""
    shape = fsg.tensors[lay.float_input].shape
    if shape is None or not len(shape):
        return 1
    if lay.kind == "FULLY_CONNECTED":
        n = int(_elements(shape)) // lay.float_weight.shape[1]
    else:
        n = int(np.prod(valid_pads(lay, int(shape[-3]), int(shape[-2]))[2:]))
    return min(max(n, 1), SEQUENTIAL_ROWS)


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
