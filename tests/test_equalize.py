"""Cross-layer equalization (edgeq/equalize.py) on a tiny seeded depthwise-separable CNN.

The CNN (also used by the other accuracy-method tests) has MobileNet's trouble built in: the first
conv's output channels run at scales from 0.003 to 1 and the depthwise conv after it undoes that, so
the float function is ordinary while the per-tensor int8 grid between them starves the small
channels. Real parts: the TFLite converter, the LiteRT quantizer and interpreter.
"""

from __future__ import annotations

import numpy as np
import pytest

SEED = 11
H = 16


def build_tiny_cnn(tf, seed: int = SEED) -> bytes:
    """Float .tflite (signature 'serving_default', input 'x' 1x16x16x3, output 'y' 1x10):
    conv3x3 (ReLU6) -> dw3x3 (ReLU6) -> conv1x1 -> conv1x1 (ReLU) -> dw3x3 s2 (ReLU6) -> conv1x1
    (ReLU6) -> mean -> FC."""
    rng = np.random.default_rng(seed)

    def w(*shape, scale=None):
        fan_in = np.prod(shape[:-1]) if len(shape) > 1 else shape[0]
        return (rng.normal(0, scale or 1.0 / np.sqrt(fan_in), shape)).astype(np.float32)

    g = np.geomspace(3e-3, 1.0, 8).astype(np.float32)  # uneven channel scales of the first conv
    k1, b1 = w(3, 3, 3, 8) * g, (rng.uniform(0.0, 0.3, 8) * g).astype(np.float32)
    d1, db1 = w(3, 3, 8, 1, scale=0.4) / g[None, None, :, None], rng.normal(0, 0.1, 8).astype(np.float32)
    k2, b2 = w(1, 1, 8, 16), rng.normal(0, 0.1, 16).astype(np.float32)
    k3, b3 = w(1, 1, 16, 32), rng.normal(0, 0.1, 32).astype(np.float32)
    d2, db2 = w(3, 3, 32, 1, scale=0.4), rng.normal(0, 0.1, 32).astype(np.float32)
    k4, b4 = w(1, 1, 32, 24), rng.normal(0, 0.1, 24).astype(np.float32)
    fc, fb = w(24, 10, scale=1.0), rng.normal(0, 0.1, 10).astype(np.float32)
    c = {k: tf.constant(v) for k, v in dict(k1=k1, b1=b1, d1=d1, db1=db1, k2=k2, b2=b2, k3=k3, b3=b3, d2=d2,
                                            db2=db2, k4=k4, b4=b4, fc=fc, fb=fb).items()}

    class M(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([1, H, H, 3], tf.float32, name="x")])
        def serve(self, x):
            h = tf.nn.relu6(tf.nn.conv2d(x, c["k1"], 1, "SAME") + c["b1"])
            h = tf.nn.relu6(tf.nn.depthwise_conv2d(h, c["d1"], [1, 1, 1, 1], "SAME") + c["db1"])
            h = tf.nn.conv2d(h, c["k2"], 1, "SAME") + c["b2"]
            h = tf.nn.relu(tf.nn.conv2d(h, c["k3"], 1, "SAME") + c["b3"])
            h = tf.nn.relu6(tf.nn.depthwise_conv2d(h, c["d2"], [1, 2, 2, 1], "SAME") + c["db2"])
            h = tf.nn.relu6(tf.nn.conv2d(h, c["k4"], 1, "SAME") + c["b4"])
            h = tf.reduce_mean(h, axis=[1, 2])
            return {"y": tf.matmul(h, c["fc"]) + c["fb"]}

    m = M()
    conv = tf.lite.TFLiteConverter.from_concrete_functions([m.serve.get_concrete_function()], m)
    return conv.convert()


def image_samples(n: int, seed: int) -> list[dict]:
    """Smooth random images (blurred noise plus a gradient), values about -1..2."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.normal(0, 1, (H + 4, H + 4, 3))
        x = (x[:-4, :-4] + x[2:-2, 2:-2] + x[4:, 4:] + x[1:-3, 3:-1]) / 2.0
        x += np.linspace(-0.5, 1.0, H)[None, :, None] * rng.uniform(0.5, 1.5)
        out.append({"x": x[None].astype(np.float32)})
    return out


def int8_session():
    """A litert-quantizer session for plain int8 (float I/O), as edgeq's uniform int8 recipe."""
    from edgeq.optimize import litert_session, uniform_recipe

    return litert_session(uniform_recipe("int8"))


def quantize_plain(float_model: bytes, samples) -> bytes:
    """int8 with the quantizer's own ranges (what edgeq does without --optimize)."""
    s = int8_session()(float_model, samples)
    return s.quantize(s.base)


def output_error(float_model: bytes, quant_model: bytes, samples) -> float:
    from edgeq.ranges import score
    from edgeq.validate import run_model

    return score(run_model(float_model, samples), quant_model, samples).rel_l2


@pytest.fixture(scope="session")
def tiny_cnn(tf):
    return build_tiny_cnn(tf)


@pytest.fixture(scope="session")
def calib():
    return image_samples(48, SEED)


@pytest.fixture(scope="session")
def held_out():
    return image_samples(32, SEED + 1)


def test_finds_the_depthwise_separable_pairs(tiny_cnn):
    from edgeq.bias_correction import load_model
    from edgeq.equalize import find_pairs

    pairs = [(a.kind, b.kind, a.activation) for a, b, _ in find_pairs(load_model(tiny_cnn))]
    # conv->dw (ReLU6), dw->conv (ReLU6), conv->conv (linear), conv->dw (ReLU), dw->conv (ReLU6);
    # the last conv feeds MEAN, not a weight layer.
    assert pairs == [("CONV_2D", "DEPTHWISE_CONV_2D", "RELU6"), ("DEPTHWISE_CONV_2D", "CONV_2D", "RELU6"),
                     ("CONV_2D", "CONV_2D", "NONE"), ("CONV_2D", "DEPTHWISE_CONV_2D", "RELU"),
                     ("DEPTHWISE_CONV_2D", "CONV_2D", "RELU6")]


def test_equalization_is_exact_in_float_and_rewrites_the_weights(tiny_cnn, calib, held_out):
    from edgeq import tflite_edit as te
    from edgeq.bias_correction import load_model
    from edgeq.equalize import equalization_error, equalize, find_pairs

    eq = equalize(tiny_cnn, calib)
    assert len(eq.pairs) == 5 and eq.skipped_relu6 == 0
    first = eq.pairs[0]
    assert first.first_output and first.scaled >= 6 and first.max_scale / first.min_scale > 10  # the 0.003..1 spread
    # Same function: float rounding on the calibration samples, and (ReLU6 margin) on others too.
    assert equalization_error(tiny_cnn, eq.model, calib) < 1e-5
    assert equalization_error(tiny_cnn, eq.model, held_out) < 1e-4
    # The file carries the new weights: the first conv's per-channel ranges are now far more even.
    before, after = load_model(tiny_cnn), load_model(eq.model)
    a, _, _ = find_pairs(before)[0]
    w0 = te.constant(before, before.subgraphs[0], a.weight)
    w1 = te.constant(after, after.subgraphs[0], a.weight)
    spread0 = np.abs(w0).reshape(8, -1).max(1)
    spread1 = np.abs(w1).reshape(8, -1).max(1)
    assert spread0.max() / spread0.min() > 100 and spread1.max() / spread1.min() < 0.1 * spread0.max() / spread0.min()


def test_equalization_lowers_int8_error(tiny_cnn, calib, held_out):
    from edgeq.equalize import equalize

    eq = equalize(tiny_cnn, calib)
    plain = output_error(tiny_cnn, quantize_plain(tiny_cnn, calib), held_out)
    equalized = output_error(tiny_cnn, quantize_plain(eq.model, calib), held_out)
    assert equalized < 0.7 * plain, (plain, equalized)


def test_relu6_channels_at_the_clip_keep_their_scale(tiny_cnn, calib):
    from edgeq.equalize import equalize

    # Inputs 20x larger drive the first conv's large channels into the ReLU6 clip.
    loud = [{"x": s["x"] * 20.0} for s in calib]
    eq = equalize(tiny_cnn, loud)
    assert eq.pairs[0].clipped >= 1
    from edgeq.equalize import equalization_error
    assert equalization_error(tiny_cnn, eq.model, loud) < 1e-5


def test_without_samples_relu6_pairs_are_left_alone(tiny_cnn, held_out):
    from edgeq.equalize import equalization_error, equalize

    eq = equalize(tiny_cnn)  # weights mode, data-free
    assert eq.skipped_relu6 == 3
    assert [p.activation for p in eq.pairs] == ["NONE", "RELU"]
    assert equalization_error(tiny_cnn, eq.model, held_out) < 1e-5
