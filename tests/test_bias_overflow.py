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


# --- other activations, layer kinds, precisions and sharing (each: the quantizer's own file vs edgeq's) ---

_BZ = np.array([-1.8, -1.5, -1.2, 0.4, -0.6, 0.7, -2.0, 0.5], np.float32)  # biases below RELU_N1_TO_1's floor


def _branch_cnn(tf, branch) -> bytes:
    """conv3x3 (ReLU) -> h + branch(h) -> conv1x1 (ReLU) -> mean -> FC, branch(tf, h, biases 0.3..0.8)
    a dead one (all-zero weights): it adds its biases."""
    rng = np.random.default_rng(CNN_SEED)
    c = {k: tf.constant(v.astype(np.float32)) for k, v in dict(
        k1=rng.normal(0, 0.3, (3, 3, 3, 8)), b1=rng.normal(0, 0.1, 8), bz=rng.uniform(0.3, 0.8, 8),
        k2=rng.normal(0, 0.4, (1, 1, 8, 16)), b2=rng.normal(0, 0.1, 16), fc=rng.normal(0, 0.3, (16, 6)),
        fb=rng.normal(0, 0.1, 6)).items()}

    class M(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([1, CNN_SIZE, CNN_SIZE, 3], tf.float32, name="x")])
        def serve(self, x):
            h = tf.nn.relu(tf.nn.conv2d(x, c["k1"], 1, "SAME") + c["b1"])
            h = tf.nn.relu(tf.nn.conv2d(h + branch(tf, h, c["bz"]), c["k2"], 1, "SAME") + c["b2"])
            return {"y": tf.matmul(tf.reduce_mean(h, axis=[1, 2]), c["fc"]) + c["fb"]}

    m = M()
    return tf.lite.TFLiteConverter.from_concrete_functions([m.serve.get_concrete_function()], m).convert()


def _own_and_fixed(model: bytes, precision: str = "int8") -> tuple[bytes, bytes]:
    """(the quantizer's own file, edgeq's), both through edgeq's session for `precision`."""
    import edgeq.bias_overflow as bo
    from edgeq.optimize import litert_session, uniform_recipe

    calib, out = image_samples(16, CNN_SEED), []
    for overflow in (False, True):
        old = bo.candidates
        bo.candidates = old if overflow else (lambda _: False)
        try:
            s = litert_session(uniform_recipe(precision))(model, calib)
            out.append(s.quantize(s.base))
        finally:
            bo.candidates = old
    return out[0], out[1]


def _clipped(model: bytes) -> int:
    """int32 and int64 biases at the int32 limit (int16x8 writes int64 biases, clipped by int32 math)."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=model)
    it.allocate_tensors()
    return sum(int((np.abs(it.get_tensor(t["index"]).astype(np.int64)) >= 2**31 - 2).sum())
               for t in it.get_tensor_details()
               if t["dtype"] in (np.int32, np.int64) and len(t["quantization_parameters"]["scales"]))


def _dead_biases(model: bytes, float_model: bytes) -> list[tuple[np.ndarray, np.ndarray]]:
    """(bias as the file stores it, dequantized; float bias) of each all-zero weight layer."""
    from edgeq import tflite_edit as te
    from edgeq.bias_overflow import WEIGHT_OPS
    from edgeq.weight_layers import quant_params, weight_layers

    m = te.load(model)
    sg = m.subgraphs[0]
    return [(te.constant(m, sg, lay.bias).astype(np.float64) * quant_params(sg.tensors[lay.bias])[0], lay.float_bias)
            for lay in weight_layers(model, float_model, kinds=WEIGHT_OPS, int16_inputs=True, int4_weights=True)
            if not np.abs(lay.float_weight).any()]


def _check(model: bytes, precision: str, clipped: int, bound: float) -> tuple[float, float]:
    """The quantizer's own file has `clipped` clipped biases, edgeq's none, each dead layer's bias read
    back from it is the float one, and edgeq's output error is below `bound` (the own file's above)."""
    own, fixed = _own_and_fixed(model, precision)
    assert _clipped(own) == clipped and _clipped(fixed) == 0
    dead = _dead_biases(fixed, model)
    assert dead
    for got, want in dead:
        np.testing.assert_allclose(got, want, rtol=1e-4)
    held = image_samples(16, CNN_SEED + 1)
    before, after = output_error(model, own, held), output_error(model, fixed, held)
    assert after < bound < before, (before, after)
    return before, after


def test_relu_n1_to_1_channels_below_its_floor_are_fixed(tf):
    """RELU_N1_TO_1 outputs -1 for a bias below -1; the clipped one (~0) gives 0 (the ReLU exception
    does not hold for its floor)."""
    from edgeq.weight_layers import weight_layers

    model = _branch_cnn(tf, lambda tf, h, bz: tf.clip_by_value(
        tf.nn.conv2d(h, np.zeros((1, 1, 8, 8), np.float32), 1, "SAME") + _BZ, -1.0, 1.0))
    own, _ = _own_and_fixed(model)
    assert "RELU_N1_TO_1" in [lay.activation for lay in weight_layers(own, model)]  # fused, as in the repro
    _check(model, "int8", 8, 0.12)  # measured: rel L2 0.89 -> 0.066 (0.18 with those 4 left clipped)


def test_transpose_conv_channels_are_fixed(tf):
    """TRANSPOSE_CONV: weights [O,KH,KW,I] (channels on axis 0), input operand 2, bias operand 3."""
    model = _branch_cnn(tf, lambda tf, h, bz: tf.nn.avg_pool2d(tf.nn.conv2d_transpose(
        h, np.zeros((2, 2, 8, 8), np.float32), [1, 2 * CNN_SIZE, 2 * CNN_SIZE, 8], 2, "SAME") + bz, 2, 2, "VALID"))
    _check(model, "int8", 8, 0.15)  # measured: rel L2 0.59 -> 0.062


def test_int16x8_int64_biases_are_fixed(tf):
    """int16x8: the quantizer's int32 math writes -2^31 into the int64 bias of a dead channel."""
    model = _branch_cnn(tf, lambda tf, h, bz: tf.nn.depthwise_conv2d(
        h, np.zeros((3, 3, 8, 1), np.float32), [1, 1, 1, 1], "SAME") + bz)
    _check(model, "int16x8", 8, 0.15)  # measured: rel L2 0.59 -> 0.056


def test_int4_weight_channels_are_fixed(tf):
    """int4x8: int4 weights (range 7), int8 input, int32 bias clipped as at int8."""
    model = _branch_cnn(tf, lambda tf, h, bz: tf.nn.conv2d(h, np.zeros((1, 1, 8, 8), np.float32), 1, "SAME") + bz)
    _check(model, "int4x8", 8, 0.3)  # measured: rel L2 0.61 -> 0.18 (the rest: the live layers at int4)


def test_a_zero_weight_two_convs_share_gets_one_scale(tf):
    """One all-zero kernel read by two convs with other input scales: the quantizer shares the weight
    tensor and gives each its own bias; one weight scale serves both."""
    from edgeq import tflite_edit as te

    def branch(tf, h, bz):
        z = tf.constant(np.zeros((1, 1, 8, 8), np.float32))
        return (tf.nn.conv2d(h, z, 1, "SAME") + bz) + (tf.nn.conv2d(tf.nn.relu6(h * 3.0 + 1.0), z, 1, "SAME") + bz)

    model = _branch_cnn(tf, branch)
    m = te.load(_own_and_fixed(model)[0])
    sg = m.subgraphs[0]
    pairs = [(int(op.inputs[1]), int(op.inputs[2])) for op in sg.operators if te.op_name(m, op) == "CONV_2D"]
    shared = [p for p in pairs if sum(q[0] == p[0] for q in pairs) == 2]
    assert len(shared) == 2 and shared[0][1] != shared[1][1]
    _check(model, "int8", 16, 0.15)  # measured: rel L2 0.75 -> 0.040


def test_a_zero_weight_and_bias_two_convs_share_are_fixed_once(tf):
    """The same dead layer applied to h and to h mirrored: equal input scales, so the quantizer shares
    the weight AND the bias tensor; the bias is requantized once, for that scale."""
    from edgeq import tflite_edit as te

    def branch(tf, h, bz):
        z = tf.constant(np.zeros((1, 1, 8, 8), np.float32))
        return (tf.nn.conv2d(h, z, 1, "SAME") + bz) + (tf.nn.conv2d(tf.reverse(h, [2]), z, 1, "SAME") + bz)

    model = _branch_cnn(tf, branch)
    m = te.load(_own_and_fixed(model)[0])
    sg = m.subgraphs[0]
    pairs = [(int(op.inputs[1]), int(op.inputs[2])) for op in sg.operators if te.op_name(m, op) == "CONV_2D"]
    assert any(pairs.count(p) == 2 for p in pairs)  # one (weight, bias) pair read by both convs
    _check(model, "int8", 8, 0.15)
