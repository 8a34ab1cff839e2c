"""Models that scale their own pixels (edgeq/pixel_scale.py): photos are fed as 0..255 to them.

keras.applications' EfficientNet, MobileNetV3 and ConvNeXt carry a Rescaling or Normalization layer
and expect raw pixels; before, edgeq fed every model [0, 1] photos by default, so such a model was
calibrated for inputs 255x smaller than on the device, and judged on the same wrong scale. Real
converter, real LiteRT; tiny Keras models built here with a seeded RNG.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from edgeq.calibration import CalibrationConfig, Preprocess
from edgeq.convert import ConvertOptions, convert
from edgeq.calibration import load_calibration
from edgeq.fidelity import run_model
from edgeq.pixel_scale import (FLAT_SPREAD, FLAT_STEM, SPREAD_GAIN, flat_response, keras_pixel_scaling, output_spread,
                               own_pixel_scaling, stem_response)
from edgeq.sources import load_source
from edgeq.tflite_model import read_model


def _model(tf, first):
    tf.keras.utils.set_random_seed(0)
    L = tf.keras.layers
    x = tf.keras.Input((12, 12, 3))
    h = L.Conv2D(6, 3, activation="relu")(first(x) if first else x)
    return tf.keras.Model(x, L.Dense(4)(L.GlobalAveragePooling2D()(h)))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    d = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(20):
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(d / f"p{i}.png")
    return d


def _input_scale(path) -> float:
    """The int8 scale of the first quantized tensor: the range calibration saw at the input."""
    info = read_model(path.read_bytes())
    first = next(op for op in info.ops if op.name == "QUANTIZE")
    return float(first.outputs[0].scale[0])


def test_keras_layers_say_which_scale_the_model_expects(tf):
    L = tf.keras.layers
    assert "multiplies pixels by 0.003922 (1/255)" in keras_pixel_scaling(tf, _model(tf, L.Rescaling(1 / 255)))
    sym = keras_pixel_scaling(tf, _model(tf, L.Rescaling(1 / 127.5, offset=-1)))
    assert "(1/127.5)" in sym
    norm = L.Normalization(mean=[123.7, 116.3, 103.5], variance=[3409.0, 3262.0, 3291.0])
    assert "subtracts [123.7, 116.3, 103.5] from pixels" in keras_pixel_scaling(tf, _model(tf, norm))
    # [0, 1] or [-1, 1] inputs: no scaling layer, or one that is not a pixel scale.
    assert keras_pixel_scaling(tf, _model(tf, None)) is None
    assert keras_pixel_scaling(tf, _model(tf, L.Rescaling(2.0, offset=-1))) is None


def test_the_graph_says_so_where_the_layer_is_not_folded(tf, tmp_path):
    """A SavedModel / .tflite has no layers: the op that first touches the input tells."""
    class Scaled(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([1, 4, 4, 3], tf.float32, name="x")])
        def __call__(self, x):
            return {"y": tf.nn.relu(x * (1 / 255.0) - 0.5)}

    m = Scaled()
    tf.saved_model.save(m, str(tmp_path / "sm"), signatures=m.__call__)
    src = load_source(tmp_path / "sm")
    assert own_pixel_scaling(src.float_tflite, "x") == "its first op multiplies pixels by 0.003922 (1/255)"
    plain = load_source(_save(tf, _model(tf, None), tmp_path / "p.keras"))
    assert own_pixel_scaling(plain.float_tflite, plain.inputs[0].name) is None and plain.pixel_scaling is None


def _save(tf, model, path):
    model.save(path)
    return path


def test_photos_are_fed_raw_to_a_model_that_scales_them(tf, tmp_path, photos):
    path = _save(tf, _model(tf, tf.keras.layers.Rescaling(1 / 255)), tmp_path / "r.keras")
    cfg = CalibrationConfig(str(photos), samples=16, eval_samples=4)
    r = convert(path, ConvertOptions(tmp_path / "a.tflite", calib=cfg, floor=False))
    assert any("scales its own pixels (Rescaling layer" in w and "fed as 0..255" in w for w in r.warnings)
    assert _input_scale(r.output) > 0.5  # 0..255 in 256 steps: ~1.0 (for [0, 1] photos it would be ~1/255)

    # A scale the user chose is kept, and warned about.
    unit = CalibrationConfig(str(photos), samples=16, eval_samples=4, preprocess=Preprocess.UNIT)
    r = convert(path, ConvertOptions(tmp_path / "b.tflite", calib=unit, floor=False))
    assert any("yet --preprocess unit scales them first" in w for w in r.warnings)
    assert _input_scale(r.output) < 0.01

    # A model without its own scaling keeps the default [0, 1] and says nothing.
    plain = _save(tf, _model(tf, None), tmp_path / "p.keras")
    r = convert(plain, ConvertOptions(tmp_path / "c.tflite", calib=cfg, floor=False))
    assert not any("pixels" in w for w in r.warnings) and _input_scale(r.output) < 0.01


def _trained_on(tf, photos_dir, scale):
    """Conv + BatchNorm whose statistics come from photos at `scale`, as training leaves them: on that
    scale its activations are standardized. The converter folds the BatchNorm into the convolution,
    so nothing in the graph says which scale that was."""
    tf.keras.utils.set_random_seed(1)
    L = tf.keras.layers
    x = tf.keras.Input((12, 12, 3))
    bn = L.BatchNormalization(momentum=0.0)
    h = L.ReLU()(bn(L.Conv2D(8, 3)(x)))
    model = tf.keras.Model(x, L.Dense(4)(L.GlobalAveragePooling2D()(h)))
    pixels = np.stack([np.asarray(Image.open(p), np.float32) for p in sorted(photos_dir.glob("*.png"))])
    model(pixels * scale, training=True)  # moving statistics := these photos' (momentum 0)
    return model


@pytest.fixture(scope="module")
def colour_photos(tmp_path_factory):
    """Photos that differ as photos do: each its own colour and brightness, with texture."""
    d = tmp_path_factory.mktemp("colour")
    rng = np.random.default_rng(2)
    for i in range(20):
        base = rng.uniform(20, 235, 3)
        img = np.clip(base + rng.normal(0, 25, (12, 12, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(d / f"c{i}.png")
    return d


def test_output_spread():
    same = {"y": np.tile(np.array([[1.0, -2.0, 3.0]]), (5, 1))}
    assert output_spread(same) == 0.0
    rng = np.random.default_rng(0)
    assert output_spread({"y": rng.normal(size=(8, 10))}) > 0.9  # zero-mean rows differ by all they are
    assert output_spread({"a": same["y"], "b": rng.normal(size=(5, 3))}) > 0.9  # the largest output counts


def test_a_model_that_barely_responds_to_unit_photos_gets_0_255(tf, tmp_path, colour_photos):
    """The EfficientNet case as a SavedModel/.tflite: the scaling folded away, the response tells."""
    path = _save(tf, _trained_on(tf, colour_photos, 1.0), tmp_path / "raw.keras")
    src = load_source(path)
    assert src.pixel_scaling is None and own_pixel_scaling(src.float_tflite, src.inputs[0].name) is None
    at, raw = flat_response(CalibrationConfig(str(colour_photos)), src)
    assert at < FLAT_SPREAD and raw > SPREAD_GAIN * at

    cfg = CalibrationConfig(str(colour_photos), samples=16, eval_samples=4)
    r = convert(path, ConvertOptions(tmp_path / "a.tflite", calib=cfg, floor=False))
    assert any("expects 0..255 pixels" in w and "fed as 0..255" in w for w in r.warnings)
    assert _input_scale(r.output) > 0.5
    unit = CalibrationConfig(str(colour_photos), samples=16, eval_samples=4, preprocess=Preprocess.UNIT)
    r = convert(path, ConvertOptions(tmp_path / "b.tflite", calib=unit, floor=False))
    assert any("at --preprocess unit" in w and "--preprocess raw is what it meets" in w for w in r.warnings)
    assert _input_scale(r.output) < 0.01

    # The same network trained on [0, 1] photos responds to them: no note, the default kept.
    path = _save(tf, _trained_on(tf, colour_photos, 1 / 255), tmp_path / "unit.keras")
    assert flat_response(CalibrationConfig(str(colour_photos)), load_source(path)) is None

    # Trained on [0, 1] with a large output offset (a regression head, 300 +- a little): its outputs
    # are flat at [0, 1] and wild at 0..255 too, but its first layer responds: not mistaken for it.
    offset = _trained_on(tf, colour_photos, 1 / 255)
    w, b = offset.layers[-1].get_weights()
    offset.layers[-1].set_weights([w, b + 300.0])
    src = load_source(_save(tf, offset, tmp_path / "offset.keras"))
    photos8 = load_calibration(CalibrationConfig(str(colour_photos), samples=8, eval_samples=0), src.inputs)
    assert output_spread(run_model(src.float_tflite, list(photos8.calibration()))) < FLAT_SPREAD
    assert stem_response(src.float_tflite, list(photos8.calibration())) > 10 * FLAT_STEM
    assert flat_response(CalibrationConfig(str(colour_photos)), src) is None
    r = convert(path, ConvertOptions(tmp_path / "c.tflite", calib=cfg, floor=False))
    assert not any("pixels" in w for w in r.warnings) and _input_scale(r.output) < 0.01


def test_too_few_photos_to_tell(tf, tmp_path, colour_photos):
    few = tmp_path / "few"
    few.mkdir()
    for p in sorted(colour_photos.glob("*.png"))[:3]:
        (few / p.name).write_bytes(p.read_bytes())
    path = _save(tf, _trained_on(tf, colour_photos, 1.0), tmp_path / "raw.keras")
    assert flat_response(CalibrationConfig(str(few)), load_source(path)) is None
