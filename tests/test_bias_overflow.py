"""Biases the LiteRT quantizer clips for all-zero weight channels (edgeq/bias_overflow.py), on a tiny
seeded CNN with a dead branch as face-api's tiny landmark net has one. Real converter, quantizer and
interpreter."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import CNN_SEED, CNN_SIZE, image_samples, int8_session, output_error


def _dead_branch_cnn(tf, relu_bias: float | None = None) -> bytes:
    """conv3x3 (ReLU) -> [dw3x3 with zero weights -> conv1x1 with zero weights, biases 0.3..0.8] added
    back -> conv1x1 (ReLU) -> mean -> FC: the dead branch adds its biases, a constant per channel."""
    rng = np.random.default_rng(CNN_SEED)
    c = {k: tf.constant(v.astype(np.float32)) for k, v in dict(
        k1=rng.normal(0, 0.3, (3, 3, 3, 8)), b1=rng.normal(0, 0.1, 8), d=np.zeros((3, 3, 8, 1)),
        z=np.zeros((1, 1, 8, 8)), bz=rng.uniform(0.3, 0.8, 8), k2=rng.normal(0, 0.4, (1, 1, 8, 16)),
        b2=rng.normal(0, 0.1, 16), fc=rng.normal(0, 0.3, (16, 6)), fb=rng.normal(0, 0.1, 6)).items()}

    class M(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([1, CNN_SIZE, CNN_SIZE, 3], tf.float32, name="x")])
        def serve(self, x):
            h = tf.nn.relu(tf.nn.conv2d(x, c["k1"], 1, "SAME") + c["b1"])
            dead = tf.nn.conv2d(tf.nn.depthwise_conv2d(h, c["d"], [1, 1, 1, 1], "SAME"), c["z"], 1, "SAME") + c["bz"]
            if relu_bias is not None:  # a ReLU channel its bias keeps at 0: dead either way
                dead = tf.nn.relu(dead - c["bz"] + relu_bias)
            h = tf.nn.relu(tf.nn.conv2d(h + dead, c["k2"], 1, "SAME") + c["b2"])
            return {"y": tf.matmul(tf.reduce_mean(h, axis=[1, 2]), c["fc"]) + c["fb"]}

    m = M()
    return tf.lite.TFLiteConverter.from_concrete_functions([m.serve.get_concrete_function()], m).convert()


def _clipped_biases(model: bytes) -> int:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=model)
    it.allocate_tensors()
    n = 0
    for t in it.get_tensor_details():
        if t["dtype"] == np.int32 and len(t["quantization_parameters"]["scales"]):
            v = it.get_tensor(t["index"]).astype(np.int64)
            n += int((np.abs(v) >= 2**31 - 2).sum())
    return n


@pytest.fixture(scope="module")
def dead(tf):
    return _dead_branch_cnn(tf)


def test_zero_weight_channels_keep_their_biases(dead, tiny_cnn, monkeypatch):
    import edgeq.bias_overflow as bo
    from edgeq.weight_layers import weight_layers

    calib, held = image_samples(16, CNN_SEED), image_samples(16, CNN_SEED + 1)
    assert bo.candidates(dead) and not bo.candidates(tiny_cnn)
    s = int8_session()(dead, calib)
    fixed = s.quantize(s.base)
    with monkeypatch.context() as mp:  # the quantizer's own file
        mp.setattr(bo, "candidates", lambda _: False)
        s = int8_session()(dead, calib)
        plain = s.quantize(s.base)
    # The quantizer's smallest weight scale (1e-9 / 127) leaves a bias of 0.3..0.8 at 2^31 steps of
    # input_scale * 7.9e-12: all 8 clipped; the rescaled channels hold them.
    assert _clipped_biases(plain) == 8 and _clipped_biases(fixed) == 0
    lay = next(x for x in weight_layers(fixed, dead) if x.kind == "CONV_2D" and not np.abs(x.float_weight).any())
    from edgeq import tflite_edit as te
    from edgeq.weight_layers import quant_params

    m = te.load(fixed)
    sg = m.subgraphs[0]
    b_scale, _ = quant_params(sg.tensors[lay.bias])
    got = te.constant(m, sg, lay.bias).astype(np.float64) * b_scale
    np.testing.assert_allclose(got, lay.float_bias, rtol=1e-4)
    np.testing.assert_allclose(lay.weight_scale, np.abs(lay.float_bias) / bo.BIAS_STEPS, rtol=1e-6)
    assert not lay.quantized_weight(m).any()
    before, after = output_error(dead, plain, held), output_error(dead, fixed, held)
    assert after < 0.1 and after < 0.25 * before, (before, after)


def test_a_bias_its_relu_cuts_is_left_as_the_quantizer_wrote_it(tf):
    """A dead ReLU channel (zero weights, negative bias: EfficientNet-Lite0 has 87) outputs 0 with
    the clipped bias too; rewriting it only perturbed the level's later choices."""
    import edgeq.bias_overflow as bo

    model = _dead_branch_cnn(tf, relu_bias=-0.5)
    s = int8_session()(model, image_samples(16, CNN_SEED))
    q = s.quantize(s.base)
    assert bo.candidates(model) and _clipped_biases(q) == 8 and bo.fix(q, model)[1] == 0


def test_the_budget_loops_quantizer_fixes_them_too(dead):
    from edgeq.litert_quant import quantize_per_op

    calib = image_samples(16, CNN_SEED)
    model = quantize_per_op(dead, "int8", [], calib)
    assert _clipped_biases(model) == 0
    assert output_error(dead, model, image_samples(16, CNN_SEED + 1)) < 0.1
