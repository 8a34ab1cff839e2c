"""Bias correction (edgeq/bias_correction.py): the mean shift of weight rounding folded into int32 biases.

A model where the shift is large by construction: a FULLY_CONNECTED over 512 non-negative (post-ReLU)
inputs whose weights each carry one outlier per output channel, so per-channel int8 rounds the other
511 weights on a coarse grid and their rounding errors add up against inputs with a positive mean.
Real TFLite converter, LiteRT quantizer and interpreter.
"""

from __future__ import annotations

import numpy as np
import pytest

from edgeq import tflite_edit as te
from tests.conftest import int8_session, output_error, quantize_plain

SEED = 5


@pytest.fixture(scope="module")
def wide_fc(tf):
    rng = np.random.default_rng(SEED)
    w1 = tf.constant(rng.normal(0, 0.5, (16, 512)).astype(np.float32))
    b1 = tf.constant(rng.uniform(0.2, 1.0, 512).astype(np.float32))
    w2 = rng.normal(0.002, 0.01, (512, 8)).astype(np.float32)
    w2[rng.integers(0, 512, 8), np.arange(8)] = 1.5  # one outlier per output channel sets its int8 scale
    w2 = tf.constant(w2)

    class M(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([1, 16], tf.float32, name="x")])
        def serve(self, x):
            return {"y": tf.matmul(tf.nn.relu(tf.matmul(x, w1) + b1), w2)}

    m = M()
    return tf.lite.TFLiteConverter.from_concrete_functions([m.serve.get_concrete_function()], m).convert()


def _fc_samples(n, seed):
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(0, 1, (1, 16)).astype(np.float32)} for _ in range(n)]


def _biases(model: bytes) -> dict[str, np.ndarray]:
    from edgeq.tflite_model import read_model

    m = te.load(model)
    sg = m.subgraphs[0]
    out = {}
    for op in read_model(model).ops:
        if op.name in ("FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D") and len(op.inputs) > 2:
            out[op.outputs[0].name] = te.constant(m, sg, op.inputs[2].index)
    return out


def _true_minmax_int8(float_model, samples) -> bytes:
    """int8 with the true activation extremes: no clipping, so weight rounding is the only biased error
    (the quantizer's moving-average ranges clip the largest activations, a shift of another kind)."""
    from edgeq.ranges import RangeMethod, range_stats, ranges_from_stats

    s = int8_session()(float_model, samples)
    return s.quantize(ranges_from_stats(s.base, range_stats(float_model, samples, s.base), RangeMethod.MINMAX))


def test_bias_correction_removes_the_rounding_shift(wide_fc):
    from edgeq.bias_correction import correct_bias
    from edgeq.fidelity import run_model

    calib, held = _fc_samples(64, SEED), _fc_samples(64, SEED + 1)
    q = _true_minmax_int8(wide_fc, calib)
    bc = correct_bias(q, wide_fc, calib)
    f, before, after = run_model(wide_fc, held)["y"], run_model(q, held)["y"], run_model(bc.model, held)["y"]
    shift_before = np.abs((before - f).mean(0)).mean()
    shift_after = np.abs((after - f).mean(0)).mean()
    assert shift_after < 0.4 * shift_before, (shift_before, shift_after)  # measured 0.053 -> 0.016
    assert output_error(wide_fc, bc.model, held) < 0.9 * output_error(wide_fc, q, held)  # 0.035 -> 0.029
    # The report names both FCs; the second (bias-less in the float model: a bias was added) had all
    # 8 channels moved.
    second = bc.layers[-1]
    assert [lay.op for lay in bc.layers] == ["FULLY_CONNECTED", "FULLY_CONNECTED"]
    assert second.channels_changed == 8 and second.max_shift > shift_before
    assert bc.samples == 64 and bc.to_json()["channels_changed"] >= 8


def test_the_written_file_carries_new_biases_and_the_same_weights(wide_fc):
    from edgeq.bias_correction import correct_bias
    from edgeq.weight_layers import weight_layers
    from edgeq.tflite_model import read_model

    calib = _fc_samples(32, SEED)
    q = quantize_plain(wide_fc, calib)
    bc = correct_bias(q, wide_fc, calib)
    b0, b1 = _biases(q), _biases(bc.model)
    assert len(b0) == 1 and len(b1) == 2  # the second FC had no bias: it has one now
    assert all(b.dtype == np.int32 for b in b1.values())
    assert all(not np.array_equal(b0[k], b1[k]) for k in b0) and np.any(b1[next(k for k in b1 if k not in b0)])
    # Weights, ops and dtypes untouched: only int32 biases differ.
    qm, bm = te.load(q), te.load(bc.model)
    for lay in weight_layers(q, wide_fc):
        assert np.array_equal(lay.quantized_weight(qm), lay.quantized_weight(bm))
    assert [(o.name, o.precision) for o in read_model(q).ops] == [(o.name, o.precision) for o in read_model(bc.model).ops]


def test_bias_correction_on_the_tiny_cnn_does_not_hurt(tiny_cnn, calib, held_out):
    from edgeq.bias_correction import correct_bias

    q = quantize_plain(tiny_cnn, calib)
    bc = correct_bias(q, tiny_cnn, calib)
    assert len(bc.layers) == 7  # 4 convs, 2 depthwise, 1 FC: every weight layer
    assert output_error(tiny_cnn, bc.model, held_out) <= 1.01 * output_error(tiny_cnn, q, held_out)


def test_needs_samples(wide_fc):
    from edgeq.bias_correction import correct_bias
    from edgeq.errors import QuantizationError

    q = quantize_plain(wide_fc, _fc_samples(4, SEED))
    with pytest.raises(QuantizationError, match="calibration samples"):
        correct_bias(q, wide_fc, [])


@pytest.mark.parametrize("kind,shape,cin,stride,dilation,padding", [
    ("CONV_2D", (8, 3, 3, 5), 5, (2, 2), (1, 1), "SAME"),
    ("CONV_2D", (6, 3, 1, 4), 4, (1, 2), (1, 1), "VALID"),
    ("CONV_2D", (6, 3, 3, 2), 6, (1, 1), (2, 2), "SAME"),  # grouped: 3 groups of 2 input channels
    ("DEPTHWISE_CONV_2D", (1, 3, 3, 5), 5, (2, 2), (1, 1), "SAME"),
    ("DEPTHWISE_CONV_2D", (1, 5, 5, 8), 4, (1, 1), (2, 1), "VALID"),  # multiplier 2
    ("FULLY_CONNECTED", (7, 12), 12, (1, 1), (1, 1), "VALID"),
])
def test_channel_mean_equals_the_layer_run_on_the_mean_input(tf, kind, shape, cin, stride, dilation, padding):
    """The per-channel mean output of a layer on one input map, taken from each tap's mean input in
    numpy (no TensorFlow import for a .tflite source), equals the layer run in TensorFlow
    (weight_layers.layer_forward) and averaged over positions: odd sizes, strides, dilation, both
    paddings, a channel multiplier and grouped filters."""
    from edgeq.bias_correction import _channel_mean
    from edgeq.weight_layers import WeightLayer, layer_forward

    rng = np.random.default_rng(3)
    w = rng.normal(size=shape).astype(np.float32)
    lay = WeightLayer(0, kind, "y", 0, 1, None, 2, 0, w, None, np.ones(1), 1.0, 0, stride, dilation, padding)
    x = rng.normal(size=(1, 12) if kind == "FULLY_CONNECTED" else (1, 11, 9, cin)).astype(np.float32)
    y = np.asarray(layer_forward(lay, x, w), np.float64)
    want = y.reshape(-1, y.shape[-1]).mean(axis=0)
    np.testing.assert_allclose(_channel_mean(lay, x, w), want, rtol=1e-5, atol=1e-5)


def test_mean_inputs_of_int8_maps_are_their_dequantized_means(tiny_cnn, calib):
    """The layer inputs' means are summed from the int8 values as stored and dequantized once
    (mean_inputs): the same as the mean of each sample's dequantized map, for every layer input of
    the tiny CNN's int8 model, int8 maps and the float model input alike."""
    from edgeq.bias_correction import mean_inputs
    from edgeq.weight_layers import capture, weight_layers

    q = quantize_plain(tiny_cnn, calib)
    tensors = sorted({lay.input for lay in weight_layers(q, tiny_cnn)})
    got = mean_inputs(q, calib[:12], tensors)
    sums = {}

    def visit(_, t, v):
        sums[t] = sums.get(t, 0.0) + v.astype(np.float64)

    quant = capture(q, calib[:12], tensors, visit)
    assert len(tensors) >= 3 and sum(1 for t in tensors if quant[t][0]) >= 2  # int8 maps among them
    for t in tensors:
        assert got[t].dtype == np.float32
        np.testing.assert_allclose(got[t], sums[t] / 12, rtol=1e-5, atol=1e-6 * np.abs(sums[t]).max() / 12)
