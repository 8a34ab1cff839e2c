"""Per-tensor error: rounding noise from the calibration ranges, and measured per-op damage."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import save_keras
from edgeq.litert_quant import Requantizer
from edgeq.layer_error import channel_error, fake_quantize, layer_errors, rounding_noise
from edgeq.precision import Precision
from edgeq.tflite_model import read_model


def test_fake_quantize_matches_the_int8_grid():
    x = np.linspace(-1.0, 3.0, 1001)
    q = fake_quantize(x, -1.0, 3.0)
    scale = 4.0 / 255
    assert np.abs(q - x).max() <= scale / 2 + 1e-12
    assert len(np.unique(np.round(q / scale, 6))) == 256  # every int8 level used, no more
    assert fake_quantize(np.array([0.0]), -1.0, 3.0)[0] == 0.0  # zero is exact
    # Symmetric: 255 levels around 0, half of them wasted on one-sided values.
    s = fake_quantize(np.linspace(0, 1, 1001), 0.0, 1.0, symmetric=True)
    assert len(np.unique(s)) == 128
    # 16 bits: 256x finer.
    assert np.abs(fake_quantize(x, -1.0, 3.0, bits=16) - x).max() <= 4.0 / 65535 / 2 + 1e-12


def test_channel_error_weighs_every_channel():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(200, 8))
    ref[:, 0] *= 100  # one huge channel
    got = ref.copy()
    got[:, 1:] = 0  # every normal channel lost
    # A whole-tensor norm would call this a 1% error; per channel it is 7 of 8 channels gone.
    assert np.linalg.norm(ref - got) / np.linalg.norm(ref) < 0.03
    assert channel_error(ref, got) == pytest.approx(7 / 8)


@pytest.fixture(scope="module")
def outlier_model(tf, tmp_path_factory):
    """x -> Dense -> relu, and x + offset -> Dense, the offset putting one channel at 50."""
    d = tmp_path_factory.mktemp("noise")
    L = tf.keras.layers
    tf.keras.utils.set_random_seed(0)
    x = tf.keras.Input((16,))
    calm = L.Dense(16, activation="relu", name="calm")(x)
    offset = np.zeros(16, np.float32)
    offset[3] = 50.0
    loud = L.Dense(16, name="loud")(x + tf.constant(offset))
    model = tf.keras.Model(x, [calm, loud])
    from edgeq.sources import load_source
    src = load_source(save_keras(tf, model, d / "m.keras"))
    samples = [{src.inputs[0].name: s[None]} for s in np.random.default_rng(1).random((40, 16), np.float32)]
    return src, samples


def test_rounding_noise_finds_the_tensor_with_an_outlier_channel(outlier_model):
    src, samples = outlier_model
    rq = Requantizer(src.float_tflite, Precision.INT8, lambda: iter(samples), len(samples))
    noise = rounding_noise(src.float_tflite, samples[:8], rq.ranges())
    ops = read_model(src.float_tflite).ops
    # x + offset: channel 3 spans 50..51, so the int8 steps are 50x too coarse for the other channels.
    scaled = next(op.outputs[0].name for op in ops if op.name == "ADD")
    calm = next(op.outputs[0].name for op in ops if op.name == "FULLY_CONNECTED" and op.inputs[0].name != scaled)
    assert noise[scaled] > 0.05 and noise[scaled] > 5 * noise[calm]
    # The calm tensor's noise is what 255 steps over its own range leave: small, not zero.
    assert 0.001 < noise[calm] < 0.02


def test_layer_errors_attribute_damage_to_the_op_that_adds_it(outlier_model):
    src, samples = outlier_model
    rq = Requantizer(src.float_tflite, Precision.INT8, lambda: iter(samples), len(samples))
    q = rq.quantize(())
    errors = {e.op + ":" + e.output: e for e in layer_errors(src.float_tflite, q, read_model(src.float_tflite),
                                                              samples[:8])}
    add = next(e for k, e in errors.items() if k.startswith("ADD:"))
    assert add.damage > 0.01 and add.rel_error >= add.damage
    assert all(e.damage <= e.rel_error + 1e-12 for e in errors.values())
