"""Learned rounding (edgeq/learned_rounding.py, AdaRound-style) on the tiny seeded CNN.

Checks that it lowers the int8 model's output error, that the written file carries changed int8
weights (and only weights and int32 biases), and that it stays within its time budget. Real TFLite
converter, LiteRT quantizer and interpreter; TensorFlow for the per-layer optimisation.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from edgeq import tflite_edit as te
from tests.conftest import output_error, quantize_plain


@pytest.fixture(scope="module")
def rounded(tiny_cnn, calib):
    from edgeq.learned_rounding import RoundingConfig, learn_rounding

    q = quantize_plain(tiny_cnn, calib)
    steps = []
    t0 = time.monotonic()
    result = learn_rounding(q, tiny_cnn, calib, config=RoundingConfig(seconds=20.0, max_iterations=400),
                            on_step=steps.append)
    return q, result, steps, time.monotonic() - t0


def test_learned_rounding_lowers_the_output_error(tiny_cnn, calib, held_out, rounded):
    q, result, _, _ = rounded
    assert output_error(tiny_cnn, result.model, calib) < 0.95 * output_error(tiny_cnn, q, calib)
    assert output_error(tiny_cnn, result.model, held_out) < 0.95 * output_error(tiny_cnn, q, held_out)
    # Each kept layer reconstructs better on the crops held back from its own training.
    assert all(lay.loss_learned <= lay.loss_nearest for lay in result.layers)
    assert any(lay.loss_learned < 0.9 * lay.loss_nearest for lay in result.layers)


def test_the_file_carries_the_learned_int8_weights(tiny_cnn, rounded):
    from edgeq.weight_layers import weight_layers
    from edgeq.tflite_model import read_model

    q, result, _, _ = rounded
    qm, rm = te.load(q), te.load(result.model)
    layers = weight_layers(q, tiny_cnn)
    assert [rep.op for rep in result.layers] == [lay.kind for lay in layers]
    flipped = 0
    for lay, rep in zip(layers, result.layers):
        a, b = lay.quantized_weight(qm), lay.quantized_weight(rm)
        assert b.dtype == np.int8 and b.shape == a.shape and np.abs(b).max() <= 127
        diff = int((a != b).sum())
        assert diff == rep.flipped
        # Rounding can only move a weight to the other neighbour of its float value: never > 1 level.
        assert np.all(np.abs(a.astype(int) - b.astype(int)) <= 1)
        flipped += diff
    assert flipped == result.to_json()["weights_flipped"] > 0
    # Same ops, same dtypes, same size class: only constants changed.
    assert [(o.name, o.precision) for o in read_model(q).ops] == [(o.name, o.precision) for o in read_model(result.model).ops]
    assert abs(len(result.model) - len(q)) < 0.05 * len(q)


def test_time_budget_and_progress(rounded):
    _, result, steps, seconds = rounded
    assert seconds < 20.0 + 40.0  # budget plus captures and tracing on a busy 2-core machine
    assert any("layer 1/7" in s for s in steps) and any("layer 7/7" in s for s in steps)
    assert result.samples == 48
