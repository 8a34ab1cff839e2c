"""An unrolled Keras LSTM leaves an unread SPLIT output; XNNPACK allocates nothing for it and the
LiteRT quantizer's calibration failed reading it (a textgenrnn model: a traceback)."""

from __future__ import annotations

import numpy as np

from edgeq.calibration import CalibrationConfig
from edgeq.convert import ConvertOptions, convert
from edgeq.dead_outputs import slice_dead_splits
from edgeq.fidelity import run_model
from edgeq.tflite_model import read_model


def _unrolled_lstm(tf, path):
    from edgeq.quiet import quiet_native

    tf.keras.utils.set_random_seed(0)
    inp = tf.keras.Input((12,), dtype="int32")
    x = tf.keras.layers.LSTM(8, unroll=True)(tf.keras.layers.Embedding(20, 6)(inp))
    with quiet_native():
        tf.keras.Model(inp, tf.keras.layers.Dense(20)(x)).export(str(path))
    return path


def _unread_split_outputs(model: bytes) -> int:
    info = read_model(model)
    read = {t.index for op in info.ops for t in op.inputs} | {t.index for t in info.outputs}
    return sum(t.index not in read for op in info.ops if op.name == "SPLIT" for t in op.outputs)


def test_unread_split_outputs_become_slices_with_the_same_values_and_the_model_converts(tf, tmp_path):
    from edgeq.sources import load_source
    from edgeq.sources.keras import load_saved_model

    sm = _unrolled_lstm(tf, tmp_path / "lstm")
    raw = load_saved_model(sm, ()).float_tflite  # the converter's float model at the pinned shapes
    assert _unread_split_outputs(raw) >= 1
    assert _unread_split_outputs(load_source(sm).float_tflite) == 0
    fixed, n = slice_dead_splits(raw)
    assert n >= 1 and _unread_split_outputs(fixed) == 0 and "SLICE" in {op.name for op in read_model(fixed).ops}
    from ai_edge_litert.interpreter import Interpreter
    key = next(iter(Interpreter(model_content=raw).get_signature_runner().get_input_details()))
    x = np.random.default_rng(0).integers(0, 20, (60, 12)).astype(np.int32)
    samples = [{key: s[None]} for s in x[:8]]
    a, b = (next(iter(run_model(m, samples).values())) for m in (raw, fixed))
    np.testing.assert_array_equal(a, b)
    np.save(tmp_path / "x.npy", x)
    r = convert(sm, ConvertOptions(tmp_path / "q.tflite", calib=CalibrationConfig(str(tmp_path / "x.npy"))))
    assert r.manifest["fidelity"]["outputs"][0]["cosine"] > 0.95
    assert r.manifest["op_summary"].get("int8", 0) > 50
