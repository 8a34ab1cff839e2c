"""A detector head that joins box coordinates in pixels and sigmoid class scores in one output (YOLOv8
exported with its decoding, NudeNet 320n): in one int8 scale the scores were flattened to 0 or 1 step
by both the TFLite converter and the LiteRT quantizer. edgeq writes that join in float."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import save_keras
from edgeq.calibration import CalibrationConfig
from edgeq.convert import ConvertOptions, convert
from edgeq.float_joins import FINER, float_joins, written
from edgeq.tflite_model import read_model


def _detector(tf):
    """A tiny anchor-free head: 4 box channels scaled to 0..320 pixels, 3 sigmoid score channels,
    joined on the channel axis as [1, 7, anchors]."""
    L = tf.keras.layers
    tf.keras.utils.set_random_seed(0)
    inp = tf.keras.Input((16, 16, 3))
    x = L.Conv2D(16, 3, padding="same", activation="relu")(inp)
    x = L.Conv2D(16, 3, strides=2, padding="same", activation="relu")(x)
    boxes = L.Conv2D(4, 1, activation="sigmoid")(x) * 320.0
    scores = L.Conv2D(3, 1, activation="sigmoid")(x)
    out = L.Permute((2, 1))(L.Reshape((64, 7))(L.Concatenate()([boxes, scores])))
    return tf.keras.Model(inp, out)


@pytest.fixture(scope="module")
def detector(tf, tmp_path_factory):
    d = tmp_path_factory.mktemp("det")
    np.save(d / "x.npy", np.random.default_rng(0).random((60, 16, 16, 3)).astype(np.float32))
    return save_keras(tf, _detector(tf), d / "det.keras"), d / "x.npy", d


def _run(model: bytes | str, x: np.ndarray) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(model)) if not isinstance(model, bytes) else Interpreter(model_content=model)
    r = it.get_signature_runner()
    name = next(iter(r.get_input_details()))
    return np.concatenate([next(iter(r(**{name: s[None]}).values())) for s in x])


@pytest.mark.parametrize("level", ["none", "fast"])
def test_the_scores_keep_their_own_scale(tf, detector, level):
    """`--optimize none` (the TFLite converter) and the default level (the LiteRT quantizer) both
    write the join as a float CONCATENATION of DEQUANTIZEd int8 inputs, say so, and the scores come
    back within a few of their own 1/256 steps of float, where the int8 join's step is ~1.3."""
    from edgeq.optimize import OptimizeLevel

    model, data, d = detector
    out = d / f"{level}.tflite"
    r = convert(model, ConvertOptions(out, calib=CalibrationConfig(str(data), samples=40, eval_samples=20),
                                      optimize=OptimizeLevel(level)))
    info = read_model(out)
    joins = written(info)  # the join, then the reshape and transpose to the output
    assert [op.name for op in joins] == ["CONCATENATION", "RESHAPE", "TRANSPOSE"]
    assert joins[-1].outputs[0].index == info.outputs[0].index and len(joins[0].inputs) == 2
    assert all(str(op.precision) == "float" for op in joins)
    assert [op.name for op in info.ops].count("CONCATENATION") == 1 and info.ops[-1] == joins[-1]
    assert sum("written float at the model output" in w for w in r.warnings) == 1
    assert not any("stayed float" in w for w in r.warnings)
    x = np.load(data)[40:]
    want = np.asarray(tf.keras.models.load_model(model)(x))
    got = _run(out, x)
    assert np.abs(got[:, 4:] - want[:, 4:]).max() < 0.03  # scores: a few 1/256 steps
    assert np.abs(got[:, :4] - want[:, :4]).max() < 320 * 0.05  # boxes: as an int8 0..320 tensor


def _quantizer_model(fm: bytes, samples: list[dict]) -> bytes:
    """What the LiteRT quantizer itself writes for int8 with float I/O (no edgeq post-pass)."""
    from litert_quantizer import quantizer

    from edgeq.optimize import plan_recipe
    from edgeq.quiet import quiet_native

    qt = quantizer.Quantizer(bytearray(fm))
    qt.load_quantization_recipe(plan_recipe(fm, "int8", ()))
    with quiet_native():
        return bytes(qt.quantize(qt.calibrate({"serving_default": samples})).quantized_model)


def _feed(model: bytes, x: np.ndarray) -> list[dict]:
    from ai_edge_litert.interpreter import Interpreter

    name = next(iter(Interpreter(model_content=model).get_signature_runner().get_input_details()))
    return [{name: s[None]} for s in x]


def test_the_pass_changes_only_what_loses_levels(tf, detector):
    """Read back from the bytes: the int8 join it replaces had one scale >= FINER x the scores'
    own, and its scores were far from float; after the pass they are within a few 1/256 steps. A join
    of inputs at similar scales (an Inception block's) is left as it is."""
    from edgeq.sources import load_source

    model, data, _ = detector
    fm = load_source(model).float_tflite
    x = np.load(data)
    plain = _quantizer_model(fm, _feed(fm, x[:40]))
    (concat,) = [op for op in read_model(plain).ops if op.name == "CONCATENATION"]
    assert str(concat.precision) == "int8"
    fixed, done = float_joins(plain)
    assert len(done) == 1 and done[0].finer >= FINER and done[0].inputs == 2
    want = np.asarray(tf.keras.models.load_model(model)(x[40:]))
    a, b = _run(plain, x[40:]), _run(fixed, x[40:])
    assert np.abs(a[:, 4:] - want[:, 4:]).max() > 0.3 > 0.03 > np.abs(b[:, 4:] - want[:, 4:]).max()
    assert np.abs(b[:, :4] - a[:, :4]).max() < 320 / 127  # the boxes as they were, within a step
    L = tf.keras.layers
    inp = tf.keras.Input((16, 16, 3))
    same = tf.keras.Model(inp, L.Concatenate()([L.Conv2D(4, 1)(inp), L.Conv2D(4, 1)(inp)]))
    fm2 = load_source(save_keras(tf, same, data.parent / "same.keras")).float_tflite
    q2 = _quantizer_model(fm2, _feed(fm2, x[:20]))
    assert float_joins(q2) == (q2, ())


def test_the_levels_judge_splits_a_joined_output_into_its_parts(tf, detector):
    """The level's steps are judged on each part of a joined output as an output of its own: its error
    (the largest over outputs) is the scores' error, not the boxes' (320x larger values, which alone
    decided it before). Outputs of one size stay whole."""
    from edgeq.range_search import PartedReference, compare_outputs, judge_reference, score, split_parts
    from edgeq.sources import load_source

    model, data, _ = detector
    L = tf.keras.layers
    inp = tf.keras.Input((16, 16, 3), batch_size=1)
    x = L.GlobalAveragePooling2D()(L.Conv2D(8, 3, activation="relu")(inp))
    head = tf.keras.Model(inp, L.Concatenate()([L.Dense(4, activation="sigmoid")(x) * 320.0,
                                                L.Dense(3, activation="sigmoid")(x)]))
    fm = load_source(save_keras(tf, head, data.parent / "head.keras")).float_tflite
    x = np.load(data)
    feed = _feed(fm, x[:16])
    ref = judge_reference(fm, feed)
    assert isinstance(ref, PartedReference) and len(ref) == 2 and all(v.shape[1] in (4, 3) for v in ref.values())
    q = _quantizer_model(fm, _feed(fm, x[:40]))  # the int8 join: scores flattened
    from edgeq.fidelity import run_model

    whole = compare_outputs(run_model(fm, feed), run_model(q, feed))
    parted = score(ref, q, feed)
    assert parted.rel_l2 > 0.3 > 10 * whole.rel_l2 and len(parted.cosines) == 2
    assert score(ref, float_joins(q)[0], feed).rel_l2 < 0.1
    same = {"a": np.ones((2, 6)), "b": np.ones((2, 3))}
    assert type(split_parts(same, {"a": ((1, ((0, 3), (3, 6))),)})) is dict
