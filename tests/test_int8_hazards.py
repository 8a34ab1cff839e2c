"""int8 DIV by a divisor computed from the input: kept float, and a model LiteRT cannot run is an
error or a dropped candidate, never a traceback (BirdNET V2.4's per-window normalisation)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import save_keras
from edgeq.calibration import CalibrationConfig
from edgeq.convert import ConvertOptions, convert
from edgeq.errors import QuantizationError
from edgeq.fidelity import ModelRunError, run_model
from edgeq.int8_hazards import divisor_hazards
from edgeq.range_search import score
from edgeq.tflite_model import read_model

N = 256


def _normaliser(tf):
    """Each window scaled by its own peak-to-peak, as spectrogram front ends do, then a small head."""
    tf.keras.utils.set_random_seed(0)
    x = tf.keras.Input((N,), name="audio")
    shifted = x - tf.keras.ops.min(x, axis=1, keepdims=True)
    scaled = shifted / (tf.keras.ops.max(shifted, axis=1, keepdims=True) + 1e-6)
    h = tf.keras.layers.Dense(16, activation="relu")(scaled)
    return tf.keras.Model(x, tf.keras.layers.Dense(4, name="scores")(h))


def _windows(n=80, seed=0):
    """Loud windows and quiet ones (1e-4 of the amplitude): a quiet window's divisor is far below
    half a step of an int8 range calibrated on loud ones, so it rounds to the zero point."""
    rng = np.random.default_rng(seed)
    amp = np.where(rng.random(n) < 0.25, 1e-4, 1.0)
    return (rng.standard_normal((n, N)) * amp[:, None]).astype(np.float32)


@pytest.fixture(scope="module")
def normaliser(tf, tmp_path_factory):
    d = tmp_path_factory.mktemp("hazard")
    np.save(d / "windows.npy", _windows())
    return save_keras(tf, _normaliser(tf), d / "norm.keras"), d / "windows.npy"


def _bare_int8(tf, model_path, windows) -> bytes:
    """What the bare TFLite converter writes for this model: every op int8, the DIV too."""
    from edgeq.quiet import quiet_native
    from edgeq.signature import ensure_signature

    conv = tf.lite.TFLiteConverter.from_keras_model(tf.keras.models.load_model(model_path))
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = lambda: ([w[None]] for w in windows[:60])
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    with quiet_native():
        return ensure_signature(bytes(conv.convert()))[0]


def _feed(model: bytes, x: np.ndarray) -> list[dict]:
    from ai_edge_litert.interpreter import Interpreter

    key = next(iter(Interpreter(model_content=model).get_signature_runner().get_input_details()))
    return [{key: w[None]} for w in x]


def test_an_int8_divide_by_a_computed_divisor_fails_at_run_time_and_says_so(tf, normaliser):
    """The hazard is real: the bare converter's int8 DIV stops the model on a quiet window (LiteRT's
    div.cc checks every divisor against its zero point). edgeq turns that into a one-line error,
    and a search scoring such a model drops it instead of failing."""
    model_path, windows = normaliser
    q = _bare_int8(tf, model_path, np.load(windows))
    assert [op.precision for op in read_model(q).ops if op.name == "DIV"] == ["int8"]
    quiet = _feed(q, np.full((1, N), 1e-5, np.float32))
    with pytest.raises(ModelRunError, match=r"sample 1: .*DIV"):
        run_model(q, quiet)
    loud = _feed(q, np.random.default_rng(2).standard_normal((4, N)).astype(np.float32))
    assert next(iter(run_model(q, loud).values())).shape == (4, 4)  # loud windows run: the divisor is what fails
    from edgeq.sources import load_source
    failed = score(run_model(load_source(model_path).float_tflite, quiet), q, quiet)
    assert failed.failed and failed.error() == float("inf") and not failed.keeps(None)
    assert failed.to_json() == {"failed": failed.failed, "samples": 1}


def test_divisor_hazards_finds_the_computed_divisor_only(tf, normaliser):
    from edgeq.sources import load_source

    src = load_source(normaliser[0])
    divs = [op for op in read_model(src.float_tflite).ops if op.name == "DIV"]
    assert len(divs) == 1 and not divs[0].inputs[1].is_constant
    assert divisor_hazards(src.float_tflite) == {divs[0].outputs[0].name: "DIV"}

    @tf.function(input_signature=[tf.TensorSpec([1, 8], tf.float32)])
    def by_constant(x):
        return x / tf.constant(np.arange(1, 9, dtype=np.float32))

    from edgeq.quiet import quiet_native
    with quiet_native():
        fm = tf.lite.TFLiteConverter.from_concrete_functions([by_constant.get_concrete_function()],
                                                             by_constant).convert()
    assert divisor_hazards(fm) == {}  # a constant divisor is quantized knowing its values


@pytest.mark.parametrize("fmt", ["keras", "tflite"])
def test_convert_keeps_the_divide_float_and_the_model_runs_on_silence(tf, normaliser, tmp_path, fmt):
    """Before: `edgeq convert` died with a LiteRT traceback (div.cc, in the level's range trials, or
    in the fidelity run with --optimize none). Now the DIV is float, every other compute op int8,
    the warning says why, and the written model answers like float on loud, quiet and silent
    windows; --strict refuses with the same reason."""
    from edgeq.sources import load_source

    model_path, windows = normaliser
    src = model_path
    if fmt == "tflite":
        src = tmp_path / "norm.tflite"
        src.write_bytes(load_source(model_path).float_tflite)
    calib = CalibrationConfig(str(windows), samples=60, eval_samples=20)
    r = convert(src, ConvertOptions(tmp_path / "q.tflite", calib=calib))
    info = read_model(tmp_path / "q.tflite")
    assert [str(op.precision) for op in info.ops if op.name == "DIV"] == ["float"]
    assert [str(op.precision) for op in info.ops if op.name == "FULLY_CONNECTED"] == ["int8", "int8"]
    assert any("kept float" in w and "DIV" in w and "divisor" in w for w in r.warnings)
    assert not any("stayed float" in w and "DIV" in w for w in r.warnings)
    q = (tmp_path / "q.tflite").read_bytes()
    x = np.concatenate([_windows(12, seed=3), np.zeros((1, N), np.float32), np.full((1, N), 0.3, np.float32)])
    f, g = (next(iter(run_model(m, _feed(m, x)).values())) for m in (load_source(model_path).float_tflite, q))
    cos = (f * g).sum(1) / np.maximum(np.linalg.norm(f, axis=1) * np.linalg.norm(g, axis=1), 1e-12)
    assert np.isfinite(g).all() and cos[:12].mean() > 0.9  # 0.96 as converted
    assert np.allclose(g[12], g[13], atol=1e-6)  # silence and a constant both normalise to 0, as in float
    with pytest.raises(QuantizationError, match=r"kept float \(#\d+ DIV\).*--strict"):
        convert(src, ConvertOptions(tmp_path / "s.tflite", calib=calib, strict=True))
    assert not (tmp_path / "s.tflite").exists()


def test_a_divisor_clamped_by_maximum_is_not_a_hazard(tf):
    """Mean pooling divides by `sum(mask).clamp(min=eps)`: a token count, at least 1 in practice.
    MiniLM's all-int8 model (int8-only devices) needs that DIV in int8; an epsilon ADD (BirdNET) is
    still a hazard."""
    from edgeq.quiet import quiet_native

    @tf.function(input_signature=[tf.TensorSpec([1, 8, 4], tf.float32), tf.TensorSpec([1, 8, 1], tf.float32)])
    def pools(h, mask):
        total = tf.reduce_sum(h * mask, axis=1)
        count = tf.reduce_sum(mask, axis=1)
        return {"clamped": total / tf.maximum(count, 1e-9), "eps": total / (count + 1e-6)}

    with quiet_native():
        fm = tf.lite.TFLiteConverter.from_concrete_functions([pools.get_concrete_function()], pools).convert()
    divs = [op for op in read_model(fm).ops if op.name == "DIV"]
    assert len(divs) == 2
    hazards = divisor_hazards(fm)
    assert len(hazards) == 1 and set(hazards.values()) == {"DIV"}
    by_add = next(op for op in divs if op.outputs[0].name in hazards)
    producer = next(op for op in read_model(fm).ops if by_add.inputs[1].index in [t.index for t in op.outputs])
    assert producer.name == "ADD"
