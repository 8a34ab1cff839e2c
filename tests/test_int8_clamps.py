"""int8 MAXIMUM / MINIMUM that cannot change a value (int8_clamps): removed from the written model,
which computes the same integers; clamps that act stay. Real converter, real LiteRT interpreter."""

from __future__ import annotations

import numpy as np

from edgeq import tflite_edit as te
from edgeq.calibration import CalibrationConfig
from edgeq.convert import ConvertOptions, convert
from edgeq.int8_clamps import drop_noop_clamps


def _clamps(model: bytes) -> list[tuple[str, int]]:
    m = te.load(model)
    sg = m.subgraphs[0]
    out = []
    for op in sg.operators:
        name = te.op_name(m, op)
        if name in ("MAXIMUM", "MINIMUM"):
            c = next(v for v in (te.constant(m, sg, t) for t in te.ints(op.inputs)) if v is not None)
            out.append((name, int(c.flat[0])))
    return out


def _run(model: bytes, xs: np.ndarray) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    r = Interpreter(model_content=model).get_signature_runner()
    name = next(iter(r.get_input_details()))
    return np.concatenate([next(iter(r(**{name: x[None]}).values())) for x in xs])


def test_guard_clamps_go_and_a_real_clamp_stays(tf, tmp_path, monkeypatch):
    """A guard that never fires on the data, max(x, -100), whose constant quantizes to -128 at the
    scale it shares with x, is gone from the written file; max(x, 0.25), inside the data's range,
    stays. The interpreter gives the same outputs with and without the guard. (MINIMUM has no
    LiteRT-quantizer recipe: it stays float, see the converter test below.)"""
    import edgeq.int8_clamps as int8_clamps
    from tests.conftest import save_keras

    tf.keras.utils.set_random_seed(0)
    L = tf.keras.layers
    x = tf.keras.Input((12, 12, 3))
    h = L.Conv2D(8, 3)(x)
    h = tf.keras.ops.maximum(h, -100.0)
    h = L.Conv2D(8, 3)(h)
    h = tf.keras.ops.maximum(h, 0.25)
    y = L.Dense(4)(L.Flatten()(h))
    src = save_keras(tf, tf.keras.Model(x, y), tmp_path / "m.keras")
    data = np.random.default_rng(0).normal(size=(120, 12, 12, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", data)
    calib = CalibrationConfig(str(tmp_path / "x.npy"), samples=100, eval_samples=20)

    convert(src, ConvertOptions(tmp_path / "m.tflite", calib=calib, floor=False))
    written = (tmp_path / "m.tflite").read_bytes()
    monkeypatch.setattr(int8_clamps, "drop_noop_clamps", lambda model: (model, 0))
    convert(src, ConvertOptions(tmp_path / "kept.tflite", calib=calib, floor=False))
    kept = (tmp_path / "kept.tflite").read_bytes()
    monkeypatch.undo()

    (acting,) = _clamps(written)
    assert acting[0] == "MAXIMUM" and acting[1] > -128
    assert _clamps(kept) == [("MAXIMUM", -128), acting]
    again, n = drop_noop_clamps(kept)
    assert n == 1 and again == written
    assert np.array_equal(_run(kept, data[:20]), _run(written, data[:20]))


def test_the_converters_int8_minimum_guard_goes_too(tf, tmp_path):
    """The TFLite converter writes int8 MINIMUM (the LiteRT quantizer leaves it float): min(x, 1e4)
    after a convolution quantizes its constant to 127, and goes; the outputs stay the same."""
    tf.keras.utils.set_random_seed(0)
    L = tf.keras.layers
    x = tf.keras.Input((12, 12, 3))
    h = tf.keras.ops.minimum(L.Conv2D(8, 3)(x), 1e4)
    model = tf.keras.Model(x, L.Dense(4)(L.Flatten()(L.Conv2D(8, 3)(h))))
    data = np.random.default_rng(0).normal(size=(40, 12, 12, 3)).astype(np.float32)
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = lambda: ([d[None]] for d in data)
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    quantized = bytes(conv.convert())
    assert _clamps(quantized) == [("MINIMUM", 127)]
    dropped, n = drop_noop_clamps(quantized)
    assert n == 1 and _clamps(dropped) == [] and len(dropped) < len(quantized)
    assert np.array_equal(_run(quantized, data[:10]), _run(dropped, data[:10]))
