#!/usr/bin/env python3
"""Issue-2 benchmark: one run, same model (digits CNN) and samples, ratios measured side by side.

  - edgeq convert wall time vs the bare TFLiteConverter (same calibration samples)
  - float vs int8 size
  - float vs int8 median latency at 1 and 2 threads (edgeq bench, subprocess)
  - edgeq bench's median vs a raw in-process interpreter loop on the same model

Usage: python benchmarks/convert_and_bench.py [--runs 300] [--out out/bench]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgeq.calibration import CalibrationConfig  # noqa: E402
from edgeq.convert import ConvertOptions, convert  # noqa: E402
from edgeq.demo import digits_data, train_digits_cnn  # noqa: E402
from edgeq.runners import BenchOptions  # noqa: E402
from edgeq.runners.local import bench_local  # noqa: E402
from edgeq.sources import load_source  # noqa: E402
from edgeq.quiet import import_tf, quiet_native  # noqa: E402


def raw_loop(path: Path, threads: int, warmup: int, runs: int) -> float:
    from ai_edge_litert.interpreter import Interpreter
    it = Interpreter(model_path=str(path), num_threads=threads)
    it.allocate_tensors()
    d = it.get_input_details()[0]
    x = np.random.default_rng(0).random(d["shape"]).astype(d["dtype"])
    it.set_tensor(d["index"], x)
    for _ in range(warmup):
        it.invoke()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        it.invoke()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--out", type=Path, default=Path("out/bench"))
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    tf = import_tf()
    x_train, y_train, _, _ = digits_data()
    model = train_digits_cnn(x_train, y_train, epochs=6)
    keras_path = a.out / "digits.keras"
    with quiet_native():
        model.save(keras_path)
    np.save(a.out / "calib.npy", x_train)
    n_calib = 200

    t = time.perf_counter()
    convert(keras_path, ConvertOptions(a.out / "edgeq_int8.tflite", calib=CalibrationConfig(
        str(a.out / "calib.npy"), samples=n_calib, eval_samples=50), force=True))
    t_edgeq = time.perf_counter() - t

    src = load_source(keras_path)
    order = np.random.default_rng(0).permutation(len(x_train))[:n_calib]
    t = time.perf_counter()
    with quiet_native():
        m = tf.keras.models.load_model(keras_path)
        c = tf.lite.TFLiteConverter.from_keras_model(m)
        c.optimizations = [tf.lite.Optimize.DEFAULT]
        c.representative_dataset = lambda: ([x_train[i:i + 1]] for i in order)
        c.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
        bare = c.convert()
    t_bare = time.perf_counter() - t
    (a.out / "bare_int8.tflite").write_bytes(bare)
    float_path = a.out / "float.tflite"
    float_path.write_bytes(src.float_tflite)
    int8_path = a.out / "edgeq_int8.tflite"

    rows = [("convert wall time, edgeq (s) / bare TFLiteConverter (s)", t_edgeq, t_bare)]
    fs, qs = float_path.stat().st_size, int8_path.stat().st_size
    rows.append(("size, float (bytes) / int8 (bytes)", fs, qs))
    med = {}
    for threads in (1, 2):
        for name, p in (("float", float_path), ("int8", int8_path)):
            med[(name, threads)] = bench_local(p, BenchOptions(threads=threads, warmup=30, runs=a.runs))["runs"]["median_ms"]
        rows.append((f"median latency {threads} thread(s), float (ms) / int8 (ms)", med[("float", threads)],
                     med[("int8", threads)]))
    raw = raw_loop(int8_path, 1, 30, a.runs)
    rows.append(("int8 median 1 thread, edgeq bench (ms) / raw in-process loop (ms)", med[("int8", 1)], raw))

    print(f"\nmodel: digits CNN ({len(x_train)} train images), {n_calib} calibration samples, {a.runs} timed runs")
    print(f"{'measure':66} {'A':>12} {'B':>12} {'A/B':>7}")
    for label, x, y in rows:
        print(f"{label:66} {x:12.4f} {y:12.4f} {x / y:7.2f}")


if __name__ == "__main__":
    main()
