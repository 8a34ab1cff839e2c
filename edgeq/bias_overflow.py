"""int32 biases that overflow: weight channels quantized for all-zero weights.

A weight channel whose float weights are all 0 (or nearly, against its bias) gets the LiteRT
quantizer's smallest scale, 1e-9 / 127, and its int32 bias the scale input_scale * 7.9e-12: a float
bias of 0.62 then needs 4e12 and is clipped at 2^31 (3e-4). The layer outputs ~0 where float outputs
its bias, and every layer after it sees the difference. face-api's tiny landmark net has such a dead
branch (a 1x1 convolution of 32 channels, all weights 0, biases up to 0.62, after an all-zero
depthwise one): its int8 model read rel. L2 0.080-0.097 to float on real photos whatever the
activation ranges, the TFLite converter's file 0.054 (it scales such channels itself).

Such a channel gets the weight scale max(|bias| / 2^16, max |weight| / 127), chosen from the float
model alone (so every quantization of it, range candidates included, writes the same weight scales
and weight rounding carries over), its weights quantized with it (still 0, or the small values they
are) and its bias requantized: it fits int32 for any input scale above 2^-15. The same holds for
TRANSPOSE_CONV, int4 weights (range 7) and int16x8, whose int64 biases the quantizer's int32 math
clips to -2^31 whatever their sign; a weight tensor two layers share gets the scale both need.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from . import tflite_edit as te

WEIGHT_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV")
_BIAS_INPUT = {"TRANSPOSE_CONV": 3}  # TRANSPOSE_CONV: (output shape, weights [O,KH,KW,I], input, bias)
BIAS_STEPS = 2.0 ** 16  # int32 steps of the bias: its precision, and the headroom left to the input scale
# A channel is a candidate when its largest weight is below this fraction of its bias: an int32 bias
# overflows only where |bias| * 127 / (input_scale * max |w|) > 2^31, i.e. max |w| < |bias| * 6e-8 /
# input_scale (below 6e-4 of the bias for input scales down to 1e-4).
CANDIDATE_RATIO = 1e-3
INT32_CLIP = 2**31 - 2  # the quantizer computes biases in int32 also for int16x8's int64 tensors
_LIMITS = {np.dtype(np.int32): (-2**31, 2**31 - 1), np.dtype(np.int64): (-2**63, 2**63 - 1)}


def _channels_last(kind: str, w: np.ndarray) -> np.ndarray:
    """[channels, values] of a weight tensor (output channels; depthwise: the last axis)."""
    return w.reshape(-1, w.shape[-1]).T if kind == "DEPTHWISE_CONV_2D" else w.reshape(w.shape[0], -1)


def candidates(float_model: bytes) -> bool:
    """Whether any weight layer of the float model has a channel whose bias its weights cannot carry
    once quantized (the check `fix` needs; most models have none, and then nothing is done)."""
    m = te.load(float_model)
    for sg in m.subgraphs[:1]:
        for op in sg.operators:
            kind = te.op_name(m, op)
            bi = _BIAS_INPUT.get(kind, 2)
            if kind not in WEIGHT_OPS or len(op.inputs) <= bi or op.inputs[bi] < 0:
                continue
            w, b = te.constant(m, sg, int(op.inputs[1])), te.constant(m, sg, int(op.inputs[bi]))
            if w is None or b is None or w.dtype.kind != "f" or b.dtype.kind != "f":
                continue
            peak = np.abs(_channels_last(kind, w)).max(axis=1)
            if (peak.size == b.size) and np.any(peak < CANDIDATE_RATIO * np.abs(b.reshape(-1))):
                return True
    return False


def fix(model: bytes, float_model: bytes) -> tuple[bytes, int]:
    """(model with the overflowing channels rescaled, how many bias values restored). A weight tensor
    several layers read (a shared layer: the quantizer gives each its own bias, or one bias where their
    input scales are equal) gets one scale that serves them all; a weight or bias tensor another op
    also reads is left alone."""
    from .weight_layers import weight_layers

    layers = weight_layers(model, float_model, kinds=WEIGHT_OPS, int16_inputs=True, int4_weights=True)
    m = te.load(model)
    sg = m.subgraphs[0]
    readers: dict[int, int] = {}
    for op in sg.operators:
        for t in te.ints(op.inputs):
            readers[t] = readers.get(t, 0) + 1
    groups: dict[int, list] = {}
    for lay in layers:
        groups.setdefault(lay.weight, []).append(lay)
    fixed = sum(_fix_group(m, sg, group, readers) for w, group in groups.items() if readers.get(w, 0) == len(group))
    return (te.pack(m), fixed) if fixed else (model, 0)


def _bias(m, sg, lay, readers, within: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(stored bias, its scales, float bias as float64) of a layer whose bias `fix` may rewrite: no op
    but the `within` layers of its group reads it."""
    from .weight_layers import quant_params

    if lay.bias is None or lay.float_bias is None or readers.get(lay.bias, 0) != within:
        return None
    bias, (b_scale, _) = te.constant(m, sg, lay.bias), quant_params(sg.tensors[lay.bias])
    fb = lay.float_bias.reshape(-1).astype(np.float64)
    if (bias is None or bias.dtype not in _LIMITS or len(b_scale) != fb.size
            or len(lay.weight_scale) != fb.size):
        return None
    return bias, b_scale.astype(np.float64), fb


def _overflowing(lay, bias: np.ndarray, b_scale: np.ndarray, fb: np.ndarray) -> np.ndarray:
    """The channels whose bias the quantizer clipped (int16x8's int64 bias holds -2^31 there: its
    int32 arithmetic overflowed, whatever the sign) and whose output that changes."""
    need = fb / b_scale
    bad = (np.abs(need) > INT32_CLIP) & (np.abs(bias.reshape(-1).astype(np.float64) - need) > 1)
    if lay.activation in ("RELU", "RELU6"):
        # a bias the activation cuts to its floor, 0, anyway: the clipped value (~0) gives the same
        # output (EfficientNet-Lite0 has 87 such dead channels); left as the quantizer wrote it.
        # RELU_N1_TO_1's floor is -1: a bias below it outputs -1 in float, ~0 clipped (rewritten)
        bad &= fb > 0
    return bad


def _weights(m, sg, lay) -> np.ndarray:
    """The stored weights as int8 values (int4 unpacked)."""
    from .gptq import int4_values
    from .weight_layers import INT4

    if sg.tensors[lay.weight].type == INT4:
        return int4_values(m, sg, lay.weight)
    return lay.quantized_weight(m).astype(np.int8)


def _write_weights(m, sg, lay, q: np.ndarray) -> None:
    from .gptq import pack_int4
    from .weight_layers import INT4

    t = sg.tensors[lay.weight]
    if t.type != INT4:
        te.set_constant(m, sg, lay.weight, np.ascontiguousarray(q), new_buffer=te.buffer_shared(m, t.buffer))
        return
    if te.buffer_shared(m, t.buffer):  # set_constant knows no int4: the packed bytes written as they are
        m.buffers.append(te.schema().BufferT())
        t.buffer = len(m.buffers) - 1
    m.buffers[t.buffer].data = pack_int4(q)


def _fix_group(m, sg, group: list, readers: dict[int, int]) -> int:
    """Rescale the overflowing channels of the weight tensor all layers of `group` read, and requantize
    each one's bias with its own input scale; how many bias values were restored."""
    from .weight_layers import INT4

    # the quantizer shares one bias tensor between layers with the same input scale (the same layer
    # applied twice): rewritten once, for that scale
    within = Counter(lay.bias for lay in group)
    biases = [_bias(m, sg, lay, readers, within[lay.bias]) for lay in group]
    if any(b is None for b in biases) or any(
            not np.isclose(a.input_scale, b.input_scale, rtol=1e-6) for a in group for b in group if a.bias == b.bias):
        return 0
    bad = np.logical_or.reduce([_overflowing(lay, *b) for lay, b in zip(group, biases)])
    if not bad.any():
        return 0
    lay = group[0]
    levels = 7 if sg.tensors[lay.weight].type == INT4 else 127  # int4 weights: -7..7
    fw = _channels_last(lay.kind, lay.float_weight).astype(np.float64)
    q = _channels_last(lay.kind, _weights(m, sg, lay)).copy()
    for other in group:
        # the pairing with the float layer checked on the other channels: each weight within a
        # level or so of its float value (weight rounding moves it by one at most)
        ow = _channels_last(other.kind, other.float_weight).astype(np.float64)
        scale = other.weight_scale.astype(np.float64)[:, None]
        if ow.shape != fw.shape or np.any(np.abs(q[~bad] * scale[~bad] - ow[~bad]) > 1.01 * scale[~bad] + 1e-12):
            return 0
    # one weight scale for every reader: the largest any of their biases needs
    need = np.max([np.abs(fb) for _, _, fb in biases], axis=0) / BIAS_STEPS
    w_scale = lay.weight_scale.astype(np.float32).copy()
    w_scale[bad] = np.maximum(need[bad], np.abs(fw[bad]).max(axis=1) / levels).astype(np.float32)
    q[bad] = np.clip(np.round(fw[bad] / w_scale[bad, None].astype(np.float64)), -levels, levels).astype(np.int8)
    _write_weights(m, sg, lay, q.T.reshape(lay.float_weight.shape) if lay.kind == "DEPTHWISE_CONV_2D"
                   else q.reshape(lay.float_weight.shape))
    sg.tensors[lay.weight].quantization.scale = w_scale
    written = set()
    for other, (bias, b_scale, fb) in zip(group, biases):
        if other.bias in written:
            continue
        written.add(other.bias)
        new_b_scale = (np.float64(other.input_scale) * w_scale.astype(np.float64)).astype(np.float32)
        b_int = bias.reshape(-1).astype(np.int64)
        b_int[bad] = np.round(fb[bad] / new_b_scale[bad].astype(np.float64))
        bias_t = sg.tensors[other.bias]
        bias_t.quantization.scale = np.where(bad, new_b_scale, b_scale).astype(np.float32)
        lo, hi = _LIMITS[bias.dtype]
        te.set_constant(m, sg, other.bias, np.clip(b_int, lo, hi).astype(bias.dtype).reshape(bias.shape),
                        new_buffer=te.buffer_shared(m, bias_t.buffer))
    return int(bad.sum()) * len(group)
