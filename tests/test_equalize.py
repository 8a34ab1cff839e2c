"""Cross-layer equalization (edgeq/equalize.py) on a tiny seeded depthwise-separable CNN.

The CNN (conftest.py's tiny_cnn, also used by the other accuracy-method tests) has MobileNet's trouble
built in: the first conv's output channels run at scales from 0.003 to 1 and the depthwise conv after
it undoes that, so the float function is ordinary while the per-tensor int8 grid between them starves
the small channels. Real parts: the TFLite converter, the LiteRT quantizer and interpreter.
"""

from __future__ import annotations

import numpy as np

from edgeq import tflite_edit as te
from tests.conftest import output_error, quantize_plain

def test_finds_the_depthwise_separable_pairs(tiny_cnn):
    from edgeq.equalize import find_pairs

    pairs = [(a.kind, b.kind, a.activation) for a, b, _ in find_pairs(te.load(tiny_cnn))]
    # conv->dw (ReLU6), dw->conv (ReLU6), conv->conv (linear), conv->dw (ReLU), dw->conv (ReLU6);
    # the last conv feeds MEAN, not a weight layer.
    assert pairs == [("CONV_2D", "DEPTHWISE_CONV_2D", "RELU6"), ("DEPTHWISE_CONV_2D", "CONV_2D", "RELU6"),
                     ("CONV_2D", "CONV_2D", "NONE"), ("CONV_2D", "DEPTHWISE_CONV_2D", "RELU"),
                     ("DEPTHWISE_CONV_2D", "CONV_2D", "RELU6")]


def test_equalization_is_exact_in_float_and_rewrites_the_weights(tiny_cnn, calib, held_out):
    from edgeq.equalize import equalization_error, equalize, find_pairs

    eq = equalize(tiny_cnn, calib)
    assert len(eq.pairs) == 5 and eq.skipped_relu6 == 0
    first = eq.pairs[0]
    assert first.first_output and first.scaled >= 6 and first.max_scale / first.min_scale > 10  # the 0.003..1 spread
    # Same function: float rounding on the calibration samples, and (ReLU6 margin) on others too.
    assert equalization_error(tiny_cnn, eq.model, calib) < 1e-5
    assert equalization_error(tiny_cnn, eq.model, held_out) < 1e-4
    # The file carries the new weights: the first conv's per-channel ranges are now far more even.
    before, after = te.load(tiny_cnn), te.load(eq.model)
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
