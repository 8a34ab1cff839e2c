"""The embedded default job: a small CNN trained offline on scikit-learn's digits (real 8x8 scans of
handwritten digits, shipped inside the scikit-learn wheel), converted to full int8 with calibration
from the training images, checked on held-out test images, and benchmarked float vs int8 here.
"""

from __future__ import annotations

import io
import platform
import tempfile
from pathlib import Path

import numpy as np

from .calibration import CalibrationConfig
from .convert import ConvertOptions, convert
from .files import atomic_write, disk_full_error, unwritable_error, write_all
from .progress import SILENT, Progress
from .precision import Scheme
from .runners import BenchOptions
from .runners.local import bench_local
from .quiet import quiet_native
from .fidelity import run_model

SEED = 0


def digits_data():
    """(x_train, y_train, x_test, y_test): 8x8x1 float32 in [0, 1]; fixed split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[..., None]
    y = d.target.astype(np.int64)
    order = np.random.default_rng(SEED).permutation(len(x))
    x, y = x[order], y[order]
    n_train = int(len(x) * 0.8)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def train_digits_cnn(x, y, epochs: int = 12):
    from .quiet import import_tf
    tf = import_tf()

    tf.keras.utils.set_random_seed(SEED)
    m = tf.keras.Sequential([
        tf.keras.Input((8, 8, 1)),
        tf.keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
        tf.keras.layers.Conv2D(32, 3, activation="relu"),
        tf.keras.layers.Flatten(),
        tf.keras.layers.Dense(64, activation="relu"),
        tf.keras.layers.Dense(10),
        tf.keras.layers.Softmax(),
    ])
    m.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    m.fit(x, y, epochs=epochs, batch_size=32, verbose=0)
    return m


def _accuracy(model: bytes, x: np.ndarray, y: np.ndarray, name: str) -> float:
    outs = run_model(model, [{name: x[i:i + 1]} for i in range(len(x))])
    scores = next(iter(outs.values()))
    return float((scores.argmax(axis=1) == y).mean())


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def run_demo(out_dir: Path, runs: int = 200, progress: Progress = SILENT) -> dict:
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise disk_full_error(e, out_dir, None) or unwritable_error(e, out_dir) from None
    x_train, y_train, x_test, y_test = digits_data()
    keras_path = out_dir / "digits_cnn.keras"
    with progress.task("Training a small CNN on scikit-learn digits"):
        model = train_digits_cnn(x_train, y_train)
        try:
            with quiet_native(), tempfile.TemporaryDirectory(dir=out_dir, prefix=".digits.") as tmp:
                model.save(Path(tmp) / keras_path.name)  # Keras writes in place: a full disk left half a file
                keras_bytes = (Path(tmp) / keras_path.name).read_bytes()
        except OSError as e:
            raise disk_full_error(e, keras_path, None) or unwritable_error(e, keras_path) from None
    calib = out_dir / "digits_train.npy"
    write_all([(keras_path, keras_bytes), (calib, _npy(x_train)), (out_dir / "digits_test.npy", _npy(x_test))])

    out = out_dir / "digits_int8.tflite"
    res = convert(keras_path, ConvertOptions(out, Scheme.INT8, calib=CalibrationConfig(str(calib), seed=SEED),
                                             force=True), progress)
    source = res.source
    float_path = out_dir / "digits_float.tflite"
    atomic_write(float_path, source.float_tflite)
    name = source.inputs[0].name

    acc_float = _accuracy(source.float_tflite, x_test, y_test, name)
    acc_int8 = _accuracy(out.read_bytes(), x_test, y_test, name)
    bench = {}
    for threads in (1, 2):
        for label, path in (("float", float_path), ("int8", out)):
            opts = BenchOptions(threads=threads, warmup=20, runs=runs)
            with progress.task(f"Benchmarking {label} with {threads} thread(s)"):
                bench[f"{label} x{threads}"] = bench_local(path, opts)
    speedup = bench["float x1"]["runs"]["median_ms"] / bench["int8 x1"]["runs"]["median_ms"]
    size_ratio = res.manifest["sizes"]["ratio"]
    summary = (f"test accuracy on {len(y_test)} held-out digits: float {acc_float:.4f}, int8 {acc_int8:.4f} "
               f"(drop {acc_float - acc_int8:+.4f}); int8 is {size_ratio:.2f}x smaller and {speedup:.2f}x the speed "
               f"of float (1 thread, median). Files in {out_dir}/")
    return {"manifest": res.manifest, "bench": bench, "host": f"{platform.machine()} {platform.processor()}".strip(),
            "accuracy": {"float": acc_float, "int8": acc_int8, "test_samples": len(y_test)},
            "speedup_1thread": speedup, "summary": summary, "convert_result": res}
