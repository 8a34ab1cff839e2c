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
are) and its bias requantized: it fits int32 for any input scale above 2^-15.
"""

from __future__ import annotations

import numpy as np

from . import tflite_edit as te

WEIGHT_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
BIAS_STEPS = 2.0 ** 16  # int32 steps of the bias: its precision, and the headroom left to the input scale
# A channel is a candidate when its largest weight is below this fraction of its bias: an int32 bias
# overflows only where |bias| * 127 / (input_scale * max |w|) > 2^31, i.e. max |w| < |bias| * 6e-8 /
# input_scale (below 6e-4 of the bias for input scales down to 1e-4).
CANDIDATE_RATIO = 1e-3


def _channels_last(kind: str, w: np.ndarray) -> np.ndarray:
    """[channels, values] of a weight tensor (output channels; depthwise: the last axis)."""
    return w.reshape(-1, w.shape[-1]).T if kind == "DEPTHWISE_CONV_2D" else w.reshape(w.shape[0], -1)


def candidates(float_model: bytes) -> bool:
    """Whether any weight layer of the float model has a channel whose bias its weights cannot carry
    once quantized (the check `fix` needs; most models have none, and then nothing is done)."""
    m = te.load(float_model)
    for sg in m.subgraphs[:1]:
        for op in sg.operators:
            if te.op_name(m, op) not in WEIGHT_OPS or len(op.inputs) < 3 or op.inputs[2] < 0:
                continue
            w, b = te.constant(m, sg, int(op.inputs[1])), te.constant(m, sg, int(op.inputs[2]))
            if w is None or b is None or w.dtype.kind != "f" or b.dtype.kind != "f":
                continue
            peak = np.abs(_channels_last(te.op_name(m, op), w)).max(axis=1)
            if (peak.size == b.size) and np.any(peak < CANDIDATE_RATIO * np.abs(b.reshape(-1))):
                return True
    return False


def fix(model: bytes, float_model: bytes) -> tuple[bytes, int]:
    """(model with the overflowing channels rescaled, how many channels). Layers whose weight or bias
    tensor another op also reads are left alone (their scales are shared)."""
    from .weight_layers import quant_params, weight_layers

    layers = weight_layers(model, float_model)
    m = te.load(model)
    sg = m.subgraphs[0]
    readers: dict[int, int] = {}
    for op in sg.operators:
        for t in te.ints(op.inputs):
            readers[t] = readers.get(t, 0) + 1
    fixed = 0
    for lay in layers:
        if (lay.bias is None or lay.float_bias is None or readers.get(lay.weight, 0) != 1
                or readers.get(lay.bias, 0) != 1):
            continue
        bias_t, w_t = sg.tensors[lay.bias], sg.tensors[lay.weight]
        bias, (b_scale, _) = te.constant(m, sg, lay.bias), quant_params(bias_t)
        fb = lay.float_bias.reshape(-1).astype(np.float64)
        if bias is None or bias.dtype != np.int32 or len(b_scale) != fb.size or len(lay.weight_scale) != fb.size:
            continue
        need = np.abs(fb) / b_scale.astype(np.float64)
        bad = need > 2**31 - 2
        if lay.activation in ("RELU", "RELU6", "RELU_N1_TO_1"):
            # a bias the activation cuts to its floor anyway: the clipped value gives the same output
            # (EfficientNet-Lite0 has 87 such dead channels); left as the quantizer wrote it
            bad &= fb > (-1.0 if lay.activation == "RELU_N1_TO_1" else 0.0)
        if not bad.any():
            continue
        fw = _channels_last(lay.kind, lay.float_weight).astype(np.float64)
        q = _channels_last(lay.kind, lay.quantized_weight(m).astype(np.int8)).copy()
        # the pairing with the float layer checked on the other channels: each weight within a
        # level or so of its float value (weight rounding moves it by one at most)
        scale = lay.weight_scale.astype(np.float64)[:, None]
        if np.any(np.abs(q[~bad] * scale[~bad] - fw[~bad]) > 1.01 * scale[~bad] + 1e-12):
            continue
        w_scale = lay.weight_scale.astype(np.float32).copy()
        w_scale[bad] = np.maximum(np.abs(fb[bad]) / BIAS_STEPS, np.abs(fw[bad]).max(axis=1) / 127).astype(np.float32)
        q[bad] = np.clip(np.round(fw[bad] / w_scale[bad, None].astype(np.float64)), -127, 127).astype(np.int8)
        new_q = q.T.reshape(lay.float_weight.shape) if lay.kind == "DEPTHWISE_CONV_2D" else q.reshape(
            lay.float_weight.shape)
        te.set_constant(m, sg, lay.weight, np.ascontiguousarray(new_q), new_buffer=te.buffer_shared(m, w_t.buffer))
        w_t.quantization.scale = w_scale
        new_b_scale = (np.float64(lay.input_scale) * w_scale.astype(np.float64)).astype(np.float32)
        b_int = bias.reshape(-1).astype(np.int64)
        b_int[bad] = np.round(fb[bad] / new_b_scale[bad].astype(np.float64))
        bias_t.quantization.scale = np.where(bad, new_b_scale, b_scale).astype(np.float32)
        te.set_constant(m, sg, lay.bias, np.clip(b_int, -2**31, 2**31 - 1).astype(np.int32).reshape(bias.shape),
                        new_buffer=te.buffer_shared(m, bias_t.buffer))
        fixed += int(bad.sum())
    return (te.pack(m), fixed) if fixed else (model, 0)
