"""LEAKY_RELU islands: the LiteRT quantizer leaves DEQUANTIZE -> LEAKY_RELU -> QUANTIZE float between
int8 layers (no int8 recipe), where the bare TFLite converter writes the op in int8."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import save_keras
from edgeq.calibration import CalibrationConfig
from edgeq.convert import ConvertOptions, convert
from edgeq.fidelity import run_model
from edgeq.int8_islands import fold_islands
from edgeq.litert_quant import OpPrecision, quantize_per_op
from edgeq.precision import Precision as P
from edgeq.tflite_model import read_model


def _leaky_cnn(tf):
    """A Darknet-style stack: every convolution followed by LeakyReLU(0.1)."""
    tf.keras.utils.set_random_seed(0)
    x = inp = tf.keras.Input((24, 24, 3))
    for c in (8, 16, 16):
        x = tf.keras.layers.LeakyReLU(negative_slope=0.1)(tf.keras.layers.Conv2D(c, 3, padding="same")(x))
    x = tf.keras.layers.GlobalAveragePooling2D()(x)
    return tf.keras.Model(inp, tf.keras.layers.Dense(5)(x))


@pytest.fixture(scope="module")
def leaky(tf, tmp_path_factory):
    d = tmp_path_factory.mktemp("leaky")
    np.save(d / "x.npy", np.random.default_rng(0).random((80, 24, 24, 3)).astype(np.float32))
    return save_keras(tf, _leaky_cnn(tf), d / "leaky.keras"), d / "x.npy"


def _samples(model: bytes, x: np.ndarray) -> list[dict]:
    from ai_edge_litert.interpreter import Interpreter

    key = next(iter(Interpreter(model_content=model).get_signature_runner().get_input_details()))
    return [{key: s[None]} for s in x]


def _island_model(float_model: bytes, samples: list[dict]) -> bytes:
    """What the LiteRT quantizer itself writes for the uniform int8 recipe (no edgeq post-pass)."""
    from litert_quantizer import quantizer, recipe

    from edgeq.quiet import quiet_native

    qt = quantizer.Quantizer(bytearray(float_model))
    qt.load_quantization_recipe(recipe.static_wi8_ai8())
    with quiet_native():
        return bytes(qt.quantize(qt.calibrate({"serving_default": samples})).quantized_model)


def test_fold_runs_the_island_in_int8_with_the_same_values(tf, leaky):
    """Each DEQUANTIZE -> LEAKY_RELU -> QUANTIZE becomes one int8 LEAKY_RELU (its input the tensor the
    DEQUANTIZE read, its output the QUANTIZE's): 6 converts fewer, and the outputs equal the
    island model's within an output step or two."""
    from edgeq.sources import load_source

    fm = load_source(leaky[0]).float_tflite
    x = np.load(leaky[1])
    island = _island_model(fm, _samples(fm, x[:40]))
    names = [op.name for op in read_model(island).ops]
    assert [str(op.precision) for op in read_model(island).ops if op.name == "LEAKY_RELU"] == ["float"] * 3
    folded, n = fold_islands(island)
    info = read_model(folded)
    assert n == 3 and [str(op.precision) for op in info.ops if op.name == "LEAKY_RELU"] == ["int8"] * 3
    assert len(info.ops) == len(names) - 6 and [op.version for op in info.ops if op.name == "LEAKY_RELU"] == [1] * 3
    held = _samples(fm, x[40:])
    a, b = (next(iter(run_model(m, held).values())) for m in (island, folded))
    step = info.outputs[0].scale[0] if info.outputs[0].scale else np.abs(a).max() / 127
    assert np.abs(a - b).max() <= 3 * max(step, np.abs(a).max() / 127)


def test_a_plan_that_keeps_it_float_is_kept(tf, leaky):
    from edgeq.sources import load_source

    fm = load_source(leaky[0]).float_tflite
    x = np.load(leaky[1])
    leaky_outputs = [op.outputs[0].name for op in read_model(fm).ops if op.name == "LEAKY_RELU"]
    kept = [OpPrecision("LEAKY_RELU", leaky_outputs[1], P.FLOAT)]
    q = quantize_per_op(fm, P.INT8, kept, _samples(fm, x[:40]))
    got = {op.outputs[0].name: str(op.precision) for op in read_model(q).ops if op.name == "LEAKY_RELU"}
    assert list(got.values()) == ["int8", "float", "int8"]  # the planned one only


def test_convert_default_is_all_int8_in_one_partition_and_not_worse_than_the_converter(tf, leaky, tmp_path):
    """Before: `edgeq convert`'s default level left the three LEAKY_RELUs float (warned "the LiteRT
    quantizer has no int8 recipe"), 6 converts between int8 layers, while --optimize none (the
    TFLite converter) wrote all-int8. Now both are all-int8, run as one XNNPACK partition, and the
    default's held-out error is at most the converter's (rel. L2 0.006 against 0.010 here)."""
    from edgeq.optimize import OptimizeLevel

    calib = CalibrationConfig(str(leaky[1]), samples=60, eval_samples=20)
    runs = {level: convert(leaky[0], ConvertOptions(tmp_path / f"{level}.tflite", calib=calib,
                                                    optimize=OptimizeLevel(level))) for level in ("none", "fast")}
    for level, r in runs.items():
        info = read_model(tmp_path / f"{level}.tflite")
        assert [str(op.precision) for op in info.ops if op.name == "LEAKY_RELU"] == ["int8"] * 3, level
        assert [op.name for op in info.ops].count("QUANTIZE") == 1 and not info.float_ops(), level
        assert not any("stayed float" in w for w in r.warnings), level
    assert runs["fast"].manifest["verification"]["delegation"]["partitions"] == 1
    rel = {level: r.manifest["fidelity"]["outputs"][0]["rel_l2"] for level, r in runs.items()}
    assert rel["fast"] <= rel["none"], rel


def test_dilated_convolutions_and_elu_convert_all_int8(tf, tmp_path):
    """The converter writes a dilated Conv2D as SPACE_TO_BATCH_ND -> CONV_2D (a batch of 4-16 maps)
    -> BATCH_TO_SPACE_ND. Before: the default level's weight rounding died on the batched input
    (tempocnn's fcn.h5: "cannot reshape array of size 25344 into shape (8,132,12)"), and with
    --optimize none the moves and the ELU stayed float islands. Now every op is int8 (the moves at
    one scale in and out, as their int8 kernels need), weight rounding ran on the dilated layers,
    and the answer is float's."""
    L = tf.keras.layers
    tf.keras.utils.set_random_seed(0)
    x = inp = tf.keras.Input((40, 24, 1))
    x = L.Conv2D(8, 3, padding="same", activation="elu")(x)
    x = L.Conv2D(8, 3, padding="same", dilation_rate=2, activation="relu")(x)
    x = L.Conv2D(8, 3, padding="same", dilation_rate=4, activation="relu")(x)
    model = save_keras(tf, tf.keras.Model(inp, L.Dense(5)(L.GlobalAveragePooling2D()(x))), tmp_path / "d.keras")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((100, 40, 24, 1)).astype(np.float32))
    r = convert(model, ConvertOptions(tmp_path / "q.tflite", calib=CalibrationConfig(str(tmp_path / "x.npy"))))
    info = read_model(tmp_path / "q.tflite")
    moves = [op for op in info.ops if op.name in ("SPACE_TO_BATCH_ND", "BATCH_TO_SPACE_ND")]
    assert len(moves) == 4 and all(str(op.precision) == "int8" and op.version == 2 for op in moves)
    assert all(op.inputs[0].scale == op.outputs[0].scale and op.inputs[0].zero_point == op.outputs[0].zero_point
               for op in moves)
    assert [str(op.precision) for op in info.ops if op.name == "ELU"] == ["int8"] and not info.float_ops()
    assert [op.name for op in info.ops].count("QUANTIZE") == 1
    steps = {s["step"]: s for s in r.manifest["optimize"]["steps"]}
    assert steps["weight_rounding"]["detail"]["layers"] >= 3  # the dilated layers included
    assert r.manifest["fidelity"]["outputs"][0]["cosine"] > 0.99


def test_tile_runs_in_int8_as_the_converter_writes_it(tf, tmp_path):
    """ESRGAN-slim repeats its input image (TILE) to add it to the upsampled one: the LiteRT quantizer
    left both TILEs float islands where the TFLite converter writes int8 TILE v3. Now int8 at one
    scale in and out, as its kernel needs, and the answer is float's."""
    L = tf.keras.layers
    tf.keras.utils.set_random_seed(0)
    inp = tf.keras.Input((12, 12, 3), batch_size=1)
    x = L.Conv2D(8, 3, padding="same", activation="relu")(inp)
    x = L.Conv2D(12, 3, padding="same")(x) + tf.keras.ops.tile(inp, [1, 1, 1, 4])
    model = save_keras(tf, tf.keras.Model(inp, L.Conv2D(3, 1)(x)), tmp_path / "t.keras")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((80, 12, 12, 3)).astype(np.float32))
    r = convert(model, ConvertOptions(tmp_path / "q.tflite", calib=CalibrationConfig(str(tmp_path / "x.npy"))))
    info = read_model(tmp_path / "q.tflite")
    (tile,) = [op for op in info.ops if op.name == "TILE"]
    assert str(tile.precision) == "int8" and tile.version == 3 and not info.float_ops()
    assert tile.inputs[0].scale == tile.outputs[0].scale and tile.inputs[0].zero_point == tile.outputs[0].zero_point
    assert not any("stayed float" in w for w in r.warnings)
    assert r.manifest["fidelity"]["outputs"][0]["cosine"] > 0.99
