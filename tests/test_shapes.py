"""Dynamic input dimensions (edgeq/sources/shapes.py): Keras, SavedModel and float .tflite models
whose height and width (or sequence length) are left open, as keras.applications.MobileNetV3 is.

Real parts throughout: Keras models built here with a seeded RNG, the real TFLite converter, the
LiteRT quantizer and interpreter. Before, an open image size with .npy data crashed inside the
LiteRT quantizer's calibrator (XNNPACK failed to prepare) with a traceback.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from edgeq.cli import main
from edgeq.errors import ModelFormatError
from edgeq.sources import load_source
from edgeq.sources.shapes import check_given, parse_shape, pin_tflite, suggestion

SIZE = 24


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _dynamic_cnn(tf):
    """A small CNN that takes any image size (GlobalAveragePooling before the head)."""
    tf.keras.utils.set_random_seed(3)
    L = tf.keras.layers
    x = tf.keras.Input((None, None, 3), name="image")
    h = L.Conv2D(8, 3, padding="same", activation="relu")(x)
    h = L.DepthwiseConv2D(3, padding="same", activation="relu")(h)
    h = L.Conv2D(12, 1, activation="relu")(h)
    return tf.keras.Model(x, L.Dense(5)(L.GlobalAveragePooling2D()(h)))


def _images(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    out = []
    for _ in range(n):
        a, b, c = rng.uniform(-4, 4, 3)
        out.append(np.stack([np.sin(a * xx + b * yy + c + k) for k in range(3)], -1))
    return np.asarray(out, np.float32)


@pytest.fixture(scope="module")
def dyn(tf, tmp_path_factory):
    d = tmp_path_factory.mktemp("dyn")
    model = _dynamic_cnn(tf)
    model.save(d / "cnn.keras")
    model.export(str(d / "cnn_sm"), verbose=False)
    (d / "cnn.tflite").write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    np.save(d / "x.npy", _images(60, 0))
    return d, model


def _input_shape(path) -> list[int]:
    from ai_edge_litert.interpreter import Interpreter

    d = Interpreter(str(path)).get_input_details()[0]
    assert list(d["shape_signature"]) == list(d["shape"])  # static: no -1 left
    return [int(v) for v in d["shape"]]


def _keras_agreement(model, written, x) -> float:
    """Cosine of the written int8 model's outputs with Keras' own, over samples x."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(str(written))
    it.allocate_tensors()
    i, o = it.get_input_details()[0], it.get_output_details()[0]
    got = []
    for s in x:
        it.set_tensor(i["index"], s[None])
        it.invoke()
        got.append(it.get_tensor(o["index"])[0])
    got, want = np.asarray(got), model.predict(x, verbose=0)
    return float(np.mean(np.sum(got * want, 1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))))


def test_open_image_size_with_a_photo_folder_names_the_fix(dyn, tmp_path):
    d, _ = dyn
    from PIL import Image

    (tmp_path / "photos").mkdir()
    for i, x in enumerate(_images(6, 1)):
        Image.fromarray(((x + 1) * 127.5).astype(np.uint8)).save(tmp_path / "photos" / f"p{i}.png")
    out = tmp_path / "m.tflite"
    for model in (d / "cnn.keras", d / "cnn_sm"):
        r = run("convert", model, "-o", out, "--calib", tmp_path / "photos")
        assert r.exit_code == 1 and "Traceback" not in r.output, r.output
        assert "has dynamic dimensions (?,?,?,3)" in r.output and "--input-shape 1,224,224,3" in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1 and not out.exists()
    r = run("convert", d / "cnn.tflite", "-o", out, "--calib", tmp_path / "photos")
    assert r.exit_code == 1 and "re-export the .tflite with static shapes" in r.output and not out.exists()

    # With the size given, the photos calibrate a static int8 model of that size.
    r = run("convert", d / "cnn.keras", "-o", out, "--calib", tmp_path / "photos", "--input-shape", "1,32,32,3",
            "--calib-samples", "4", "--eval-samples", "2", "--optimize", "none", "--no-floor")
    assert r.exit_code == 0, r.output
    assert _input_shape(out) == [1, 32, 32, 3]
    assert "dynamic dimensions of image (?,?,?,3) pinned to 1,32,32,3" in r.output


@pytest.mark.parametrize("name", ["cnn.keras", "cnn_sm", "cnn.tflite"])
def test_npy_data_fixes_the_open_size(dyn, tmp_path, name):
    """Keras, SavedModel and float .tflite: the .npy samples' size pins the model, which converts to
    int8 and answers like Keras at that size (before: a traceback from the quantizer's calibrator)."""
    d, model = dyn
    out = tmp_path / "m.tflite"
    r = run("convert", d / name, "-o", out, "--calib", d / "x.npy", "--calib-samples", "48", "--eval-samples", "12",
            "--json", "--quiet")
    assert r.exit_code == 0, r.output
    manifest = json.loads(r.output)
    assert _input_shape(out) == [1, SIZE, SIZE, 3]
    assert any("pinned to the calibration data's shape" in w and f"to 1,{SIZE},{SIZE},3" in w
               for w in manifest["warnings"]), manifest["warnings"]
    assert manifest["op_summary"].get("int8", 0) >= 4  # the convolutions and the head run in int8
    assert _keras_agreement(model, out, _images(12, 7)) > 0.99


def test_input_shape_pins_keras_and_saved_model(tf, dyn):
    d, model = dyn
    for path in (d / "cnn.keras", d / "cnn_sm"):
        src = load_source(path, input_shapes=((1, 40, 36, 3),))
        assert [tuple(s.shape) for s in src.inputs] == [(1, 40, 36, 3)] and src.converter is not None
        assert any("pinned to 1,40,36,3" in n for n in src.notes)
        from ai_edge_litert.interpreter import Interpreter

        it = Interpreter(model_content=src.float_tflite)
        it.allocate_tensors()
        x = np.random.default_rng(0).normal(size=(1, 40, 36, 3)).astype(np.float32)
        it.set_tensor(it.get_input_details()[0]["index"], x)
        it.invoke()
        got = it.get_tensor(it.get_output_details()[0]["index"])
        assert np.allclose(got, model.predict(x, verbose=0), atol=1e-5)
        with pytest.raises(ModelFormatError, match=r"does not fit input .*\(\?,\?,\?,3, \? = dynamic\)"):
            load_source(path, input_shapes=((1, 40, 36, 4),))
        with pytest.raises(ModelFormatError, match="has 1 input"):
            load_source(path, input_shapes=((1, 8, 8, 3), (1, 8, 8, 3)))


def test_input_shape_is_refused_where_it_cannot_apply(dyn, tmp_path):
    d, _ = dyn
    r = run("convert", d / "cnn.tflite", "-o", tmp_path / "m.tflite", "--calib", d / "x.npy", "--input-shape", "1,8,8,3")
    assert r.exit_code == 1 and "--input-shape applies to Keras, SavedModel and torch.export sources" in r.output
    assert not (tmp_path / "m.tflite").exists()


def test_pin_tflite_writes_litert_shapes_and_keeps_the_outputs(tf, dyn):
    d, _ = dyn
    from ai_edge_litert.interpreter import Interpreter

    data = (d / "cnn.tflite").read_bytes()
    x = _images(1, 5)
    pinned = pin_tflite(data, {"image": x})
    it = Interpreter(model_content=pinned)
    it.allocate_tensors()  # static now: no resize needed, and XNNPACK prepares it
    details = it.get_tensor_details()
    assert all(-1 not in list(t["shape_signature"]) for t in details if len(t["shape_signature"]))
    it.set_tensor(it.get_input_details()[0]["index"], x)
    it.invoke()
    got = it.get_tensor(it.get_output_details()[0]["index"])
    ref = Interpreter(model_content=data)
    ref.resize_tensor_input(ref.get_input_details()[0]["index"], list(x.shape))
    ref.allocate_tensors()
    ref.set_tensor(ref.get_input_details()[0]["index"], x)
    ref.invoke()
    assert np.array_equal(got, ref.get_tensor(ref.get_output_details()[0]["index"]))


def test_shape_helpers():
    assert parse_shape("1x224x224x3") == (1, 224, 224, 3) == parse_shape(" 1, 224 ,224,3 ")
    for bad in ("1,x,8,8,3", "1,,8,8,3", "1x8,8", "1,8,", "x"):  # the first two were read as 1,8,8,3
        with pytest.raises(ValueError, match="is not a shape; give positive sizes like 1,3,224,224"):
            parse_shape(bad)
    assert suggestion((-1, -1, -1, 3)) == "1,224,224,3" and suggestion((None, 3, None, None)) == "1,3,224,224"
    assert suggestion((-1, -1, 8)) == "1,128,8"
    assert check_given([("a", (None, None, 8))], [(1, 10, 8)], "m") == [
        "dynamic dimensions of a (?,?,8) pinned to 1,10,8 by --input-shape"]
    assert check_given([("a", (None, 10, 8))], [(1, 10, 8)], "m") == []  # only a batch: nothing to say
    with pytest.raises(ModelFormatError, match="dimension < 1|does not fit"):
        check_given([("a", (None, None))], [(1, 0)], "m")


def _squeeze_excite(tf):
    """A Keras squeeze-excite block (EfficientNet's, MobileNetV3's): Reshape after global pooling,
    which the converter computes at run time (SHAPE -> STRIDED_SLICE -> PACK) for a dynamic batch."""
    tf.keras.utils.set_random_seed(4)
    L = tf.keras.layers
    x = tf.keras.Input((16, 16, 3))
    h = L.Conv2D(8, 3, padding="same", activation="relu")(x)
    s = L.Reshape((1, 1, 8))(L.GlobalAveragePooling2D()(h))
    h = L.Multiply()([h, L.Conv2D(8, 1, activation="sigmoid")(s)])
    return tf.keras.Model(x, L.Dense(3)(L.GlobalAveragePooling2D()(h)))


def test_dynamic_batch_is_pinned_where_it_costs_shape_ops(tf, tmp_path):
    from ai_edge_litert.interpreter import Interpreter
    from edgeq.tflite_model import read_model

    model = _squeeze_excite(tf)
    model.save(tmp_path / "se.keras")
    model.export(str(tmp_path / "se_sm"), verbose=False)
    bare = [op.name for op in read_model(tf.lite.TFLiteConverter.from_keras_model(model).convert()).ops]
    assert "SHAPE" in bare  # what a dynamic batch costs, written by the converter itself
    x = np.random.default_rng(0).normal(size=(1, 16, 16, 3)).astype(np.float32)
    for path in (tmp_path / "se.keras", tmp_path / "se_sm"):
        src = load_source(path)
        ops = [op.name for op in read_model(src.float_tflite).ops]
        assert not {"SHAPE", "STRIDED_SLICE", "PACK"} & set(ops) and len(ops) < len(bare), ops
        assert [tuple(s.shape) for s in src.inputs] == [(1, 16, 16, 3)]
        # Keras: predicted from its Reshape layer, converted once; SavedModel: converted again, counted.
        said = ("converted at batch 1: a dynamic batch makes the Reshape/Flatten targets run-time ops"
                if path.suffix == ".keras" else f"converted at batch 1: a dynamic batch costs {len(bare) - len(ops)} "
                "run-time shape op(s)")
        assert said in src.description and not src.notes, (src.description, src.notes)
        it = Interpreter(model_content=src.float_tflite)
        it.allocate_tensors()
        it.set_tensor(it.get_input_details()[0]["index"], x)
        it.invoke()
        assert np.allclose(it.get_tensor(it.get_output_details()[0]["index"]), model.predict(x, verbose=0), atol=1e-5)
    # Without SHAPE ops the batch stays as the model declares it (nothing to gain, nothing changed).
    tf.keras.Sequential([tf.keras.Input((8,)), tf.keras.layers.Dense(2)]).save(tmp_path / "plain.keras")
    plain = load_source(tmp_path / "plain.keras")
    assert plain.inputs[0].shape[0] == -1 and not plain.notes and not plain.description


def test_a_float_tflite_with_a_dynamic_batch_is_pinned_and_its_shape_ops_folded(tf, tmp_path):
    """The same block as a float .tflite made by the converter (as users export them): edgeq cannot
    re-convert it, so the SHAPE -> STRIDED_SLICE -> PACK chain is replaced by the constant it computes
    at batch 1, the RESHAPE then reads a constant target, and XNNPACK takes the whole int8 graph."""
    from edgeq.tflite_model import read_model
    from edgeq.fidelity import run_model

    model = _squeeze_excite(tf)
    path = tmp_path / "se.tflite"
    path.write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    bare = [op.name for op in read_model(path.read_bytes()).ops]
    assert {"SHAPE", "STRIDED_SLICE", "PACK"} <= set(bare)
    src = load_source(path)
    ops = [op.name for op in read_model(src.float_tflite).ops]
    assert not {"SHAPE", "STRIDED_SLICE", "PACK"} & set(ops) and "RESHAPE" in ops
    assert len(bare) - len(ops) == 3 and "pinned to batch 1: 3 op(s)" in src.description
    assert [tuple(s.shape) for s in src.inputs] == [(1, 16, 16, 3)]
    x = np.random.default_rng(1).normal(size=(4, 1, 16, 16, 3)).astype(np.float32)
    samples = [{src.inputs[0].name: s} for s in x]
    got = run_model(src.float_tflite, samples)
    from edgeq.signature import ensure_signature
    ref = run_model(ensure_signature(path.read_bytes())[0], samples)
    assert all(np.array_equal(got[k], ref[k]) for k in ref)  # the same function, bit for bit

    np.save(tmp_path / "x.npy", np.random.default_rng(2).normal(size=(40, 16, 16, 3)).astype(np.float32))
    r = run("convert", path, "-o", tmp_path / "q.tflite", "--calib", tmp_path / "x.npy", "--calib-samples", 30,
            "--eval-samples", 10, "--optimize", "none", "--no-floor")
    assert r.exit_code == 0, r.output
    assert "source: pinned to batch 1" in r.output
    assert "SHAPE" not in {op.name for op in read_model((tmp_path / "q.tflite").read_bytes()).ops}
    assert "RESHAPE" not in r.output  # XNNPACK ran it (a run-time target left it to the builtin kernels)


def test_shapes_that_data_decides_are_not_folded(tf, tmp_path):
    """A SHAPE of what WHERE writes is data: pinning must leave it computed at run time."""
    class Counted(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 6], tf.float32, name="x")])
        def __call__(self, x):
            n = tf.cast(tf.shape(tf.where(x > 0))[0], tf.float32)
            return {"y": tf.reshape(x, [tf.shape(x)[0], 6]) * n}

    m = Counted()
    tf.saved_model.save(m, str(tmp_path / "sm"), signatures=m.__call__)
    data = tf.lite.TFLiteConverter.from_saved_model(str(tmp_path / "sm")).convert()
    a = np.array([[1, -1, 1, -1, 1, -1]], np.float32)
    pinned = pin_tflite(data, {"x": a})
    from edgeq.fidelity import run_model
    from edgeq.signature import ensure_signature

    for x in (a, np.array([[1, 1, 1, 1, 1, -1]], np.float32)):  # 3, then 5 positives
        got = run_model(ensure_signature(pinned)[0], [{"x": x}])["y"]
        assert np.array_equal(got.reshape(x.shape), x * (x > 0).sum())
