"""Cross-layer equalization (Nagel et al. 2019; AIMET) on a float .tflite, before quantizing.

For two weight layers in a chain, y = L2(act(L1(x))), where act is ReLU, ReLU6 or nothing and L1's output
feeds only L2 (optionally through a zero PAD), scaling L1's output channel c by 1/s_c (its weights and
bias) and L2's input channel c by s_c leaves y unchanged: ReLU commutes with a positive scale. Layers:
CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED, i.e. MobileNet's expand -> depthwise -> project chains.

Three ways to pick s (EqualizeMode):
- WEIGHTS (Nagel's CLE, data-free): balance the per-channel weight ranges, r1_c / s_c = r2_c * s_c,
  s_c = sqrt(r1_c / r2_c). It fixes PER-TENSOR weight quantization; edgeq quantizes weights per
  channel, where it mostly moves range into the activations.
- ACTIVATIONS (needs calibration samples): per-tensor int8 activations give every channel the same
  grid, so a channel whose values stay within 0..0.05 while another reaches 6 keeps only a couple
  of levels. Amplifying each channel of the tensor between the layers up to the tensor's overall
  range (s_c = range_c / range, at most `max_gain` times) hands it the whole grid; L2 absorbs the
  inverse scale (free for a depthwise L2, whose weights are quantized per channel anyway).
- MIXED: ACTIVATIONS for pairs into a depthwise layer, WEIGHTS for the others (into a 1x1 conv,
  amplified input columns coarsen its per-output-channel weight grid; amplifying there too, at most
  2x or 4x, was worse). With the maxima from 32 photos that it is then judged on, MobileNetV2's
  int8 KL fell 0.060 -> 0.036 on 131 other photos; with the judge seeing past the maxima (below),
  the levels gained 8 photos over 12 real splits with it and 17 with WEIGHTS, which they keep.

ReLU6 is not scale-equivariant: relu6(z / s) * s = relu6(z) only while neither z nor z / s passes 6.
Other data is assumed to reach at most RELU6_MARGIN (1.5) times a channel's calibration maximum: a
channel that could then reach 6 keeps s = 1 (scaled down, it would stop clipping where the original
clips), any other channel is scaled to stay under 6 / margin. Exact on calibration data; on other
data as far as the assumption holds. Measured on 131 other photos (output error relative to the
output range, weights mode, maxima from 32 calibration photos): MobileNetV2 1e-3; EfficientNet-Lite0
8e-2, softmax KL 6e-3 (0.13 / 9e-3 with the old rule that scaled down channels short of 6; 5e-2 /
1e-3 with maxima from 100 photos): its late channels fire on few photos. So the levels take the
maxima from calibration samples outside their judging ones, and the judge sees what equalization
does past them.
Without samples, ReLU6 pairs are left alone. (AIMET instead replaces ReLU6 with ReLU, which changes
the float model.) equalization_error() measures the float model before and after.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import Enum
from typing import Callable, Sequence

import numpy as np

from . import tflite_edit as te
from .weight_layers import capture, mixes_channels

LAYER_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
_ACT = {0: "NONE", 1: "RELU", 3: "RELU6"}  # fused activations a positive scale passes (RELU6 with care)
RELU6_MARGIN = 1.5


class EqualizeMode(str, Enum):
    WEIGHTS = "weights"
    ACTIVATIONS = "activations"
    MIXED = "mixed"  # ACTIVATIONS into a depthwise layer (free for its weights), WEIGHTS elsewhere


@dataclass(frozen=True)
class EqualizedPair:
    first: str  # op kinds and output tensor names
    second: str
    first_output: str
    activation: str
    channels: int
    scaled: int  # channels with s != 1
    min_scale: float
    max_scale: float
    clipped: int = 0  # ReLU6 channels that may reach the clip (within the margin) and kept s = 1

    def to_json(self) -> dict:
        return {"first": self.first, "second": self.second, "tensor": self.first_output,
                "activation": self.activation, "channels": self.channels, "scaled": self.scaled,
                "min_scale": self.min_scale, "max_scale": self.max_scale, "relu6_clipped": self.clipped}


@dataclass(frozen=True)
class Equalization:
    model: bytes
    mode: EqualizeMode
    pairs: tuple[EqualizedPair, ...]
    skipped_relu6: int = 0  # ReLU6 pairs left alone (no samples)
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {"mode": self.mode.value, "pairs": len(self.pairs), "skipped_relu6": self.skipped_relu6,
                "channels_scaled": sum(p.scaled for p in self.pairs), "seconds": round(self.seconds, 2),
                "per_pair": [p.to_json() for p in self.pairs]}


@dataclass(frozen=True)
class _Layer:
    index: int
    kind: str
    weight: int  # tensor index holding the (float32 or fp16) values, maybe behind a DEQUANTIZE
    bias: int | None
    activation: str


def _layer(m, sg, i: int, producers: dict[int, int]) -> _Layer | None:
    op = sg.operators[i]
    kind = te.op_name(m, op)
    if kind not in LAYER_OPS or len(op.inputs) < 2:
        return None
    w = int(op.inputs[1])
    if te.constant(m, sg, w) is None and w in producers:
        dq = sg.operators[producers[w]]
        if te.op_name(m, dq) == "DEQUANTIZE" and te.constant(m, sg, int(dq.inputs[0])) is not None:
            w = int(dq.inputs[0])
    value = te.constant(m, sg, w)
    if value is None or value.dtype.kind != "f":
        return None
    bias = int(op.inputs[2]) if len(op.inputs) > 2 and op.inputs[2] >= 0 else None
    if bias is not None and (te.constant(m, sg, bias) is None or te.constant(m, sg, bias).dtype.kind != "f"):
        return None
    act = _ACT.get(getattr(op.builtinOptions, "fusedActivationFunction", 0) if op.builtinOptions else 0)
    if act is None:
        return None
    if mixes_channels(kind, value.shape, sg.tensors[int(op.inputs[0])].shape[-1]):
        return None  # channel c's scale would not pass to channel c of the next layer
    return _Layer(i, kind, w, bias, act)


def _is_zero_pad(m, sg, op) -> bool:
    name = te.op_name(m, op)
    if name == "PAD":
        return True
    if name == "PADV2" and len(op.inputs) > 2:
        c = te.constant(m, sg, int(op.inputs[2]))
        return c is not None and float(np.asarray(c).ravel()[0]) == 0.0
    return False


def find_pairs(model) -> list[tuple[_Layer, _Layer, int]]:
    """(first layer, second layer, tensor between them) for every equalizable chain in subgraph 0."""
    m = model
    sg = m.subgraphs[0]
    prod, cons = te.producers(sg), te.consumers(sg)
    outputs = {int(t) for t in sg.outputs}
    pairs = []
    for i in range(len(sg.operators)):
        first = _layer(m, sg, i, prod)
        if first is None:
            continue
        t = int(sg.operators[i].outputs[0])
        path = [t]
        nxt = cons.get(t, [])
        # A zero PAD in between (stride-2 depthwise after its expand conv) keeps 0 at 0: scale-equivariant.
        if len(nxt) == 1 and _is_zero_pad(m, sg, sg.operators[nxt[0]]) and t not in outputs:
            t2 = int(sg.operators[nxt[0]].outputs[0])
            path.append(t2)
            nxt = cons.get(t2, [])
        if len(nxt) != 1 or any(p in outputs for p in path):
            continue
        second = _layer(m, sg, nxt[0], prod)
        if second is None or int(sg.operators[nxt[0]].inputs[0]) != path[-1]:
            continue
        # A zero bias stays zero when divided by s, so others may read it (the TFLite converter gives
        # every bias-less convolution of a width one shared zero tensor: Keras ResNet50's 53 share one).
        bias = first.bias if first.bias is not None and np.any(te.constant(m, sg, first.bias)) else None
        if second.weight == first.weight or (bias is not None and bias in (second.weight, second.bias)):
            continue
        # A weight read by another op too would change that op as well.
        if any(len(cons.get(x, [])) > 1 for x in (first.weight, bias, second.weight) if x is not None):
            continue
        pairs.append((first, second, path[0]))
    return pairs


def _out_axis(layer: _Layer, w: np.ndarray) -> np.ndarray:
    """Per output channel max |w| of the first layer."""
    if layer.kind == "DEPTHWISE_CONV_2D":
        return np.abs(w).reshape(-1, w.shape[-1]).max(0)
    return np.abs(w).reshape(w.shape[0], -1).max(1)


def _in_axis(layer: _Layer, w: np.ndarray) -> np.ndarray:
    """Per input channel max |w| of the second layer."""
    if layer.kind == "DEPTHWISE_CONV_2D":
        return np.abs(w).reshape(-1, w.shape[-1]).max(0)
    return np.abs(w).reshape(-1, w.shape[-1]).max(0)


def _scale_out(layer: _Layer, w: np.ndarray, s: np.ndarray) -> np.ndarray:
    if layer.kind == "DEPTHWISE_CONV_2D":
        return w / s.reshape(1, 1, 1, -1)
    return w / s.reshape((-1,) + (1,) * (w.ndim - 1))


def _scale_in(layer: _Layer, w: np.ndarray, s: np.ndarray) -> np.ndarray:
    return w * s.reshape((1,) * (w.ndim - 1) + (-1,))  # input channel is the last axis for all three


def channel_ranges(float_model: bytes, samples: Sequence[dict], tensors: Sequence[int]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """tensor -> (per-channel min, per-channel max) over samples (float model)."""
    lo: dict[int, np.ndarray] = {}
    hi: dict[int, np.ndarray] = {}

    def visit(_, t, v):
        v = v.reshape(-1, v.shape[-1])
        a, b = v.min(0), v.max(0)
        lo[t] = np.minimum(lo[t], a) if t in lo else a
        hi[t] = np.maximum(hi[t], b) if t in hi else b

    capture(float_model, samples, sorted(set(tensors)), visit)
    return {t: (lo[t], hi[t]) for t in lo}


def equalize(float_model: bytes, samples: Sequence[dict] | None = None, *,
             mode: EqualizeMode | str = EqualizeMode.WEIGHTS, max_gain: float = 16.0,
             on_step: Callable[[str], None] | None = None) -> Equalization:
    """The float model with its equalizable layer pairs rescaled (see module doc); same function in
    float on calibration data (exactly for ReLU/none, ReLU6 within the margin).

    samples (CALIBRATION samples) are needed for modes ACTIVATIONS / MIXED and for any ReLU6 pair."""
    t0 = time.monotonic()
    mode = EqualizeMode(mode)
    m = te.load(float_model)
    sg = m.subgraphs[0]
    pairs = find_pairs(m)
    if mode is not EqualizeMode.WEIGHTS and not samples:
        from .errors import CalibrationError
        raise CalibrationError("activation equalization needs calibration samples; pass --calib data")
    if on_step:
        on_step(f"equalization: {len(pairs)} layer pairs")
    # Channel ranges only where they are used (a ReLU6 pair's margin, amplifying modes): a run of
    # the float model over the samples is wasted on a model with no such pair (ConvNeXt-T: 14 s).
    wanted = [t for first, _, t in pairs if first.activation == "RELU6" or mode is not EqualizeMode.WEIGHTS]
    ranges = channel_ranges(float_model, list(samples), wanted) if samples and wanted else {}
    done, skipped = [], 0
    for first, second, t in pairs:
        w1 = te.constant(m, sg, first.weight).astype(np.float64)
        w2 = te.constant(m, sg, second.weight).astype(np.float64)
        n = w1.shape[-1] if first.kind == "DEPTHWISE_CONV_2D" else w1.shape[0]
        if _in_axis(second, w2).shape[0] != n:
            continue
        if first.activation == "RELU6" and t not in ranges:
            skipped += 1
            continue
        lo, hi = ranges.get(t, (None, None))
        amplify = hi is not None and (mode is EqualizeMode.ACTIVATIONS or (
            mode is EqualizeMode.MIXED and second.kind == "DEPTHWISE_CONV_2D"))
        if not amplify:
            r1, r2 = _out_axis(first, w1), _in_axis(second, w2)
            s = np.where((r1 > 0) & (r2 > 0), np.sqrt(r1 / np.maximum(r2, 1e-30)), 1.0)
        else:
            span = np.maximum(np.abs(lo), np.abs(hi)).astype(np.float64)
            top = span.max()
            s = np.where(span > 0, np.clip(span / max(top, 1e-30), 1.0 / max_gain, 1.0), 1.0)
        clipped = 0
        if first.activation == "RELU6":
            # Exact within the margin (other data reaching at most RELU6_MARGIN x the calibration
            # maximum) only if neither side clips there: a channel that may reach 6 keeps s = 1, and
            # any other channel stays under 6 / RELU6_MARGIN after scaling.
            near = hi.astype(np.float64) * RELU6_MARGIN >= 6.0
            clipped = int(near.sum())
            s = np.where(near, 1.0, np.maximum(s, hi.astype(np.float64) * RELU6_MARGIN / 6.0))
        s = np.where(np.isfinite(s) & (s > 0), s, 1.0)
        if np.allclose(s, 1.0):
            continue
        _write(m, sg, first.weight, _scale_out(first, w1, s))
        if first.bias is not None and np.any(te.constant(m, sg, first.bias)):
            _write(m, sg, first.bias, te.constant(m, sg, first.bias).astype(np.float64) / s)
        _write(m, sg, second.weight, _scale_in(second, w2, s))
        name = te.tensor_name(sg.tensors[t])
        done.append(EqualizedPair(first.kind, second.kind, name, first.activation, n, int((~np.isclose(s, 1.0)).sum()),
                                  float(s.min()), float(s.max()), clipped))
    return Equalization(te.pack(m), mode, tuple(done), skipped, time.monotonic() - t0)


def _write(m, sg, index: int, value: np.ndarray) -> None:
    """Store in the tensor's own float type (fp16 weights stay fp16), in a buffer of its own."""
    dtype = te.constant(m, sg, index).dtype
    te.set_constant(m, sg, index, value.astype(dtype), new_buffer=te.buffer_shared(m, sg.tensors[index].buffer))


def equalization_error(float_model: bytes, equalized: bytes, samples: Sequence[dict]) -> float:
    """Largest |difference| of any output between the two float models over samples, relative to the
    largest |output|: 0 up to float rounding when equalization is exact."""
    from .fidelity import run_model

    a, b = run_model(float_model, samples), run_model(equalized, samples)
    diff = max(float(np.abs(x - y).max()) for x, y in zip(a.values(), b.values()))
    scale = max(float(np.abs(x).max()) for x in a.values())
    return diff / max(scale, 1e-30)
