"""Calibration range methods (edgeq/ranges.py) on constructed data with a known outlier.

A tiny TF model is converted with the real TFLite converter, calibrated with the real
litert-quantizer, and run with the real LiteRT interpreter.
"""

from __future__ import annotations

import numpy as np
import pytest

from edgeq.errors import CalibrationError
from edgeq.ranges import RangeMethod, mse_range, percentile_range, select_ranges

SEED = 7


def _gauss_hist(bins=2048, lo=-1000.0, hi=1000.0, n=200_000, outlier=1000.0):
    rng = np.random.default_rng(SEED)
    x = np.concatenate([rng.normal(0, 1, n), [outlier]])
    h, _ = np.histogram(x, bins=bins, range=(lo, hi))
    return h


def test_percentile_clips_a_single_outlier():
    h = _gauss_hist()
    a, b = percentile_range(h, -1000.0, 1000.0, 99.99)
    # 0.01% tails of N(0,1) are at +-3.7; bins are ~1 wide, so the range lands within a bin of that.
    assert -6.0 < a < -2.0 and 2.0 < b < 6.0
    # A looser percentile keeps more, never less.
    a2, b2 = percentile_range(h, -1000.0, 1000.0, 99.0)
    assert a2 >= a and b2 <= b


def test_percentile_keeps_zero_in_range_for_positive_data():
    h, _ = np.histogram(np.random.default_rng(SEED).uniform(5, 10, 10_000), bins=256, range=(0.0, 10.0))
    a, b = percentile_range(h, 0.0, 10.0, 99.9)
    assert a == 0.0 and 9.5 < b <= 10.0


def test_mse_clips_outlier_but_not_a_clean_uniform():
    h = _gauss_hist()
    a, b = mse_range(h, -1000.0, 1000.0, num_bits=8)
    assert -25.0 < a < -2.0 and 2.0 < b < 25.0, (a, b)  # far inside the outlier's 1000
    # Uniform data with no outlier: clipping only hurts, so MSE keeps (nearly) the full range.
    u, _ = np.histogram(np.random.default_rng(SEED).uniform(-4, 4, 100_000), bins=2048, range=(-4.0, 4.0))
    a, b = mse_range(u, -4.0, 4.0, num_bits=8)
    assert a <= -3.8 and b >= 3.8, (a, b)


def test_mse_with_more_bits_clips_less():
    h = _gauss_hist()
    _, b8 = mse_range(h, -1000.0, 1000.0, num_bits=8)
    _, b16 = mse_range(h, -1000.0, 1000.0, num_bits=16)
    assert b16 > b8  # finer steps make the clipping trade-off favour a wider range


@pytest.fixture(scope="module")
def tiny_model(tf):
    """y = relu(x @ W + b) @ V: two FULLY_CONNECTED ops, signature 'serving_default'."""
    rng = np.random.default_rng(SEED)
    w = tf.constant(rng.normal(0, 0.3, (16, 32)).astype(np.float32))
    bias = tf.constant(rng.normal(0, 0.1, (32,)).astype(np.float32))
    v = tf.constant(rng.normal(0, 0.3, (32, 8)).astype(np.float32))

    class M(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([1, 16], tf.float32, name="x")])
        def serve(self, x):
            h = tf.nn.relu(tf.matmul(x, w) + bias)
            return {"y": tf.matmul(h, v)}

    m = M()
    conv = tf.lite.TFLiteConverter.from_concrete_functions([m.serve.get_concrete_function()], m)
    return conv.convert()


def _calib(n=200):
    rng = np.random.default_rng(SEED)
    xs = [rng.normal(0, 1, (1, 16)).astype(np.float32) for _ in range(n)]
    xs[17] = xs[17] * 0 + 400.0  # one corrupt sample: a huge outlier in every activation
    return [{"x": x} for x in xs]


def _quantize(model, samples, method):
    from litert_quantizer import Quantizer

    qt = Quantizer(model)
    qt.add_static_config(".*", "*", 8, 8)
    base = qt.calibrate({"serving_default": samples})
    res = select_ranges(model, samples, method, base)
    out = bytes(qt.quantize(res, enable_progress_report=False).quantized_model)
    return base, res, out


def _error(float_model, quant_model):
    from ai_edge_litert.interpreter import Interpreter

    f = Interpreter(model_content=float_model).get_signature_runner()
    q = Interpreter(model_content=quant_model).get_signature_runner()
    rng = np.random.default_rng(SEED + 1)  # held-out, outlier-free
    errs = []
    for _ in range(100):
        x = rng.normal(0, 1, (1, 16)).astype(np.float32)
        errs.append(np.mean((f(x=x)["y"] - q(x=x)["y"]) ** 2))
    return float(np.mean(errs))


def test_select_ranges_clips_outlier_and_lowers_error(tiny_model):
    samples = _calib()
    results = {m: _quantize(tiny_model, samples, m) for m in RangeMethod}
    base, same, _ = results[RangeMethod.MINMAX]
    assert same is base  # minmax returns the quantizer's own result untouched
    # The input tensor saw the 400 outlier; min-max keeps it, the others clip it.
    inp = next(k for k in base if k.endswith("x:0") or k == "serving_default_x:0")
    assert float(np.max(base[inp]["max"])) == pytest.approx(400.0)
    for m in (RangeMethod.PERCENTILE, RangeMethod.MSE):
        r = results[m][1]
        assert float(np.max(r[inp]["max"])) < 10.0, m
        assert float(np.min(r[inp]["min"])) < -1.0, m  # the normal bulk (down to ~-3) is kept
        for name in base:  # never widened, format preserved
            assert float(np.max(r[name]["max"])) <= float(np.max(base[name]["max"])) + 1e-6
            assert np.shape(r[name]["min"]) == np.shape(base[name]["min"])
    err = {m: _error(tiny_model, results[m][2]) for m in RangeMethod}
    # On outlier-free held-out data the clipped ranges must be much more accurate.
    assert err[RangeMethod.PERCENTILE] < 0.2 * err[RangeMethod.MINMAX], err
    assert err[RangeMethod.MSE] < 0.2 * err[RangeMethod.MINMAX], err


def test_select_ranges_rejects_bad_arguments(tiny_model):
    with pytest.raises(CalibrationError, match="percentile"):
        select_ranges(tiny_model, _calib(4), "percentile", {"t": {"min": np.zeros(1), "max": np.ones(1)}},
                      percentile=100.0)
    with pytest.raises(CalibrationError, match="samples"):
        select_ranges(tiny_model, [], "mse", {})
    with pytest.raises(ValueError):
        select_ranges(tiny_model, _calib(4), "kl", {})
