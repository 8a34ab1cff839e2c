"""Keras recurrent layers rebuilt with unroll=True (edgeq/sources/keras_unroll.py): a Keras 3 LSTM
with a dynamic batch failed in the converter (TensorListReserve) and at batch 1 became a WHILE loop
the LiteRT quantizer cannot calibrate (network-intrusion-detection's Conv1D + LSTM: refused twice).
Real converter, quantizer and interpreter."""

from __future__ import annotations

import numpy as np
import pytest

from edgeq.calibration import CalibrationConfig
from edgeq.convert import ConvertOptions, convert
from edgeq.signature import signature_runner
from edgeq.sources import load_source
from edgeq.sources.keras_unroll import unrolled
from edgeq.tflite_model import read_model


def _recurrent(tf, steps=20, wrap=False, **kw):
    tf.keras.utils.set_random_seed(0)
    L = tf.keras.layers
    inp = tf.keras.Input((steps, 6))
    x = L.Conv1D(8, 3, padding="same", activation="relu")(inp)
    x = L.Bidirectional(L.GRU(8)) (x) if wrap else L.LSTM(12, **kw)(x)
    return tf.keras.Model(inp, L.Dense(3, activation="softmax")(x))


def test_an_lstm_with_a_dynamic_batch_converts_unrolled_and_quantizes(tf, tmp_path):
    model = _recurrent(tf)
    model.save(tmp_path / "m.keras")
    src = load_source(str(tmp_path / "m.keras"))
    assert "1 recurrent layer(s) (LSTM) converted unrolled" in src.description
    ops = {op.name for op in read_model(src.float_tflite).ops}
    assert "WHILE" not in ops and "FULLY_CONNECTED" in ops
    x = np.random.default_rng(1).normal(size=(40, 1, 20, 6)).astype(np.float32)
    key = next(iter(signature_runner(src.float_tflite).get_input_details()))
    got = np.concatenate([signature_runner(src.float_tflite)(**{key: s})[next(iter(src.outputs)).name] for s in x[:4]])
    np.testing.assert_allclose(got, model(x[:4, 0]).numpy(), rtol=1e-4, atol=1e-5)
    np.save(tmp_path / "x.npy", x[:, 0])
    r = convert(str(tmp_path / "m.keras"), ConvertOptions(tmp_path / "q.tflite",
                                                          calib=CalibrationConfig(str(tmp_path / "x.npy"), 30, 10)))
    q = read_model(tmp_path / "q.tflite")
    assert "WHILE" not in {op.name for op in q.ops}
    assert sum(op.precision == "int8" for op in q.ops if op.name == "FULLY_CONNECTED") >= 10
    assert r.manifest["fidelity"]["outputs"][0]["cosine"] > 0.95


def test_what_is_unrolled_and_what_is_left_alone(tf):
    """A Bidirectional GRU is unrolled inside its wrapper; a stateful LSTM, one over an undefined
    number of steps and one already unrolled are left as they are."""
    model, note = unrolled(_recurrent(tf, wrap=True))
    assert "2 recurrent layer(s) (GRU) converted unrolled" in note
    assert all(layer.unroll for layer in model.layers[2]._flatten_layers(include_self=False) if hasattr(layer, "unroll"))
    for kept in (_recurrent(tf, steps=None), _recurrent(tf, unroll=True)):
        assert unrolled(kept) == (kept, "")
    tf.keras.utils.set_random_seed(0)
    stateful = tf.keras.Sequential([tf.keras.Input(batch_shape=(1, 5, 2)), tf.keras.layers.LSTM(4, stateful=True)])
    assert unrolled(stateful) == (stateful, "")


@pytest.mark.parametrize("steps", [600])
def test_too_many_steps_are_not_unrolled(tf, steps):
    """Each step is a copy of the cell's ops: past MAX_STEPS the model is converted as it is."""
    model = _recurrent(tf, steps=steps)
    assert unrolled(model) == (model, "")


def test_masked_lambda_and_time_distributed_layers(tf):
    """Review findings: an LSTM after a mask_zero Embedding or a Masking layer (Keras lists its input
    with the mask) was never unrolled; nor one after a Lambda under --trust-model (rebuilt in safe
    mode); and a TimeDistributed LSTM's steps were read on the distributed axis."""
    L = tf.keras.layers
    tf.keras.utils.set_random_seed(0)
    tokens = tf.keras.Input((16,), dtype="int32")
    text = tf.keras.Model(tokens, L.Dense(2)(L.LSTM(8)(L.Embedding(50, 8, mask_zero=True)(tokens))))
    model, note = unrolled(text)
    assert "1 recurrent layer(s) (LSTM) converted unrolled over up to 16 steps" in note
    x = np.array([[5, 7, 9, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]], np.int32)  # a padded sentence
    np.testing.assert_allclose(model(x).numpy(), text(x).numpy(), rtol=1e-5, atol=1e-6)
    seq = tf.keras.Input((12, 3))
    masked = tf.keras.Model(seq, L.GRU(4, go_backwards=True)(L.Masking(0.0)(seq)))
    assert unrolled(masked)[1]
    lam = tf.keras.Model(seq, L.LSTM(4)(L.Lambda(lambda t: t * 0.5)(seq)))
    assert unrolled(lam) == (lam, "")  # safe mode: the Lambda's code is not rebuilt
    assert "converted unrolled" in unrolled(lam, trusted=True)[1]
    wide = tf.keras.Input((2, 600, 3))
    distributed = tf.keras.Model(wide, L.TimeDistributed(L.LSTM(4))(wide))
    assert unrolled(distributed) == (distributed, "")  # 600 steps on axis 2: past MAX_STEPS


def test_steps_fixed_by_input_shape_are_unrolled(tf, tmp_path):
    """An LSTM declared over None steps stayed a WHILE under --input-shape 1,16,4 (the pin wraps the
    model; its LSTM still saw None): the model is rebuilt at the given shape and unrolled."""
    L = tf.keras.layers
    tf.keras.utils.set_random_seed(0)
    inp = tf.keras.Input((None, 4))
    model = tf.keras.Model(inp, L.Dense(2)(L.LSTM(6)(inp)))
    model.save(tmp_path / "v.keras")
    src = load_source(str(tmp_path / "v.keras"), input_shapes=((1, 16, 4),))
    assert "converted unrolled over up to 16 steps" in src.description
    assert "WHILE" not in {op.name for op in read_model(src.float_tflite).ops}
    assert [s.shape for s in src.inputs] == [(1, 16, 4)]
    x = np.random.default_rng(2).normal(size=(1, 16, 4)).astype(np.float32)
    key = next(iter(signature_runner(src.float_tflite).get_input_details()))
    got = signature_runner(src.float_tflite)(**{key: x})[src.outputs[0].name]
    np.testing.assert_allclose(got, model(x).numpy(), rtol=1e-4, atol=1e-5)
