"""Calibration range methods (edgeq/ranges.py) on constructed data with a known outlier.

A tiny TF model is converted with the real TFLite converter, calibrated with the real
litert-quantizer, and run with the real LiteRT interpreter.
"""

from __future__ import annotations

import numpy as np
import pytest

from edgeq.errors import CalibrationError
from edgeq.ranges import RangeMethod, mse_range, percentile_range, select_ranges, true_minmax

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


def test_mse_trades_clipping_against_rounding():
    rng = np.random.default_rng(SEED)
    x = rng.normal(0, 1, 1_000_000)
    m = float(np.abs(x).max())  # ~4.9 sigma
    h, _ = np.histogram(x, bins=2048, range=(-m, m))
    a, b = mse_range(h, -m, m, num_bits=8)
    # The known 8-bit MSE optimum for a Gaussian is a clip near 3.9 sigma: inside min-max.
    assert 3.3 < b < 4.3 and -4.3 < a < -3.3, (a, b)
    # With 16 bits rounding is negligible, so clipping anything only adds error: full range.
    a16, b16 = mse_range(h, -m, m, num_bits=16)
    assert a16 == pytest.approx(-m) and b16 == pytest.approx(m)


def test_mse_clips_an_outlier_when_the_bulk_outweighs_it():
    h = _gauss_hist(n=1_000_000, lo=-100.0, hi=100.0, outlier=100.0)
    a, b = mse_range(h, -100.0, 100.0, num_bits=8)
    assert 3.0 < b < 60.0, (a, b)  # clipped well inside the outlier at 100
    # Uniform data with no outlier: clipping only hurts, so MSE keeps (nearly) the full range.
    u, _ = np.histogram(np.random.default_rng(SEED).uniform(-4, 4, 100_000), bins=2048, range=(-4.0, 4.0))
    a, b = mse_range(u, -4.0, 4.0, num_bits=8)
    assert a <= -3.8 and b >= 3.8, (a, b)


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
    if n > 17:
        xs[17][0, 3] = 400.0  # one corrupt value in 3200: a huge outlier
    return [{"x": x} for x in xs]


def _quantize(model, samples, method):
    """(calibration result, quantized model); method "true" = the data's real extremes."""
    from litert_quantizer import Quantizer

    qt = Quantizer(model)
    qt.add_static_config(".*", "FULLY_CONNECTED", 8, 8)  # float I/O, int8 FCs
    base = qt.calibrate({"serving_default": samples})
    if method == "true":
        res = true_minmax(model, samples, base)
    else:
        # 99.9: the tail 0.1% (3 of 3200 values) may go, so the single outlier can be clipped.
        res = select_ranges(model, samples, method, base, percentile=99.9)
        if method == RangeMethod.MINMAX:
            assert res is base  # minmax hands the quantizer's own result back untouched
    return res, bytes(qt.quantize(res, enable_progress_report=False).quantized_model)


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
    from ai_edge_litert.interpreter import Interpreter

    samples = _calib()
    # The fixed rules select_ranges applies (AUTO measures candidates instead: search_ranges).
    methods = ["true", RangeMethod.MINMAX, RangeMethod.PERCENTILE, RangeMethod.MSE]
    results = {m: _quantize(tiny_model, samples, m) for m in methods}
    inp = Interpreter(model_content=tiny_model).get_signature_runner().get_input_details()["x"]["name"]
    rng = {m: (float(np.min(r[inp]["min"])), float(np.max(r[inp]["max"]))) for m, (r, _) in results.items()}
    assert rng["true"][1] == pytest.approx(400.0)  # the real extremes include the corrupt sample
    # The quantizer's own "minmax" is a moving average of per-sample extremes: the single outlier
    # sample barely moves it, and it sits inside the true range.
    assert rng[RangeMethod.MINMAX][1] < 50.0
    lo, hi = rng[RangeMethod.PERCENTILE]
    assert 2.0 < hi < 10.0 and -10.0 < lo < -2.0  # outlier clipped, normal bulk (+-3.5) kept
    for m in (RangeMethod.PERCENTILE, RangeMethod.MSE):
        for name, q in results[m][0].items():  # within the true range, format preserved
            t = results["true"][0][name]
            assert float(np.max(q["max"])) <= float(np.max(t["max"])) + 1e-6
            assert float(np.min(q["min"])) >= float(np.min(t["min"])) - 1e-6
            assert np.shape(q["min"]) == np.shape(t["min"])
    err = {m: _error(tiny_model, results[m][1]) for m in methods}
    # On outlier-free held-out data, clipping the outlier must be much more accurate than the
    # true min-max. MSE also weighs the outlier's own clipping error, so it may clip less, but
    # must never be worse than true min-max.
    assert err[RangeMethod.PERCENTILE] < 0.2 * err["true"], err
    assert err[RangeMethod.MSE] <= 1.05 * err["true"], err


def test_select_ranges_rejects_bad_arguments(tiny_model):
    with pytest.raises(CalibrationError, match="percentile"):
        select_ranges(tiny_model, _calib(4), "percentile", {"t": {"min": np.zeros(1), "max": np.ones(1)}},
                      percentile=100.0)
    with pytest.raises(CalibrationError, match="samples"):
        select_ranges(tiny_model, [], "mse", {})
    with pytest.raises(ValueError):
        select_ranges(tiny_model, _calib(4), "kl", {})
    with pytest.raises(CalibrationError, match="search_ranges"):
        select_ranges(tiny_model, _calib(4), "auto", {})


# --- Measured choice (RangeMethod.AUTO) -------------------------------------------------------------

def _session(model, samples):
    """(calibrate() result, quantize(calibration) -> bytes) for int8 FCs with float I/O."""
    from litert_quantizer import Quantizer

    qt = Quantizer(model)
    qt.add_static_config(".*", "FULLY_CONNECTED", 8, 8)
    base = qt.calibrate({"serving_default": samples})
    return base, lambda cal: bytes(qt.quantize(cal, enable_progress_report=False).quantized_model)


def test_range_stats_match_the_quantizers_own_statistics(tiny_model):
    from edgeq.ranges import observed_ranges, range_stats

    samples = _calib(60)
    base, _ = _session(tiny_model, samples)
    from ai_edge_litert.interpreter import Interpreter

    sizes = {d["name"]: int(np.prod(d["shape"])) for d in Interpreter(model_content=tiny_model).get_tensor_details()}
    stats = range_stats(tiny_model, samples, base)
    assert stats.samples == 60 and set(stats.hists) == set(stats.extremes)
    for name, (lo, hi) in observed_ranges(tiny_model, samples, base).items():
        assert stats.extremes[name] == pytest.approx((lo, hi))
        # The moving average litert-quantizer keeps (factor 0.95), recomputed in the same pass.
        assert stats.moving[name] == pytest.approx((float(np.min(base[name]["min"])), float(np.max(base[name]["max"]))),
                                                   rel=1e-4, abs=1e-5)
        # The histogram holds every value of every sample (small tensors are not subsampled).
        assert stats.hists[name].sum() == 60 * sizes[name]


def test_range_stats_continue_a_prior_pass_as_one_pass_over_all_samples(tiny_model):
    """A pass given `prior` (the same model's statistics over earlier samples) continues it: its
    spans, histograms, true extremes and moving averages are those of one pass over all the samples
    in order (tensors this small are binned whole, so exactly)."""
    from edgeq.ranges import range_stats

    samples = _calib(60)
    base, _ = _session(tiny_model, samples)
    whole = range_stats(tiny_model, samples, base)
    first = range_stats(tiny_model, samples[:40], base)
    both = range_stats(tiny_model, samples[40:], base, prior=first)
    assert both.samples == 60 and both.spans == whole.spans and both.hists.keys() == whole.hists.keys()
    for name in whole.hists:
        np.testing.assert_array_equal(both.hists[name], whole.hists[name], err_msg=name)
        assert both.extremes[name] == whole.extremes[name]
        assert both.moving[name] == pytest.approx(whole.moving[name], rel=1e-12)
    assert any(first.hists[n].sum() < whole.hists[n].sum() for n in whole.hists)  # prior itself is not changed


def test_search_ranges_measures_every_candidate_and_keeps_the_best(tiny_model):
    from edgeq.range_search import search_ranges

    samples = _calib(200)
    base, quantize = _session(tiny_model, samples)
    found = search_ranges(tiny_model, samples, base, quantize)
    names = [c.name for c in found.candidates]
    assert names == ["minmax-ema", "minmax", "percentile-99.9", "percentile-99.99", "percentile-99.999", "mse"]
    errors = {c.name: c.score.rel_l2 for c in found.candidates}
    assert found.chosen == min(errors, key=errors.get)
    # The outlier (400 in one sample) makes the true min-max the worst choice; a clip wins.
    assert found.chosen != "minmax" and errors["minmax"] > 2 * errors[found.chosen]
    inp = "serving_default_x:0"
    assert float(np.max(found.calibration[inp]["max"])) < 50.0
    # Judged on the calibration samples only (an even spread of at most 64).
    assert all(c.score.samples == 64 for c in found.candidates)
    assert found.to_json()["chosen"] == found.chosen and len(found.to_json()["candidates"]) == 6


def test_refining_per_tensor_is_never_worse(tiny_model):
    from edgeq.ranges import range_stats
    from edgeq.range_search import refine_ranges, search_ranges

    samples = _calib(100)
    base, quantize = _session(tiny_model, samples)
    stats = range_stats(tiny_model, samples, base)
    found = search_ranges(tiny_model, samples, base, quantize, stats=stats)
    refined = refine_ranges(tiny_model, samples, base, quantize, found, stats=stats, seconds=30.0)
    assert refined.refined_score is not None
    assert refined.best.rel_l2 <= found.best.rel_l2
    changed = [n for n in stats.hists if not np.array_equal(refined.calibration[n]["max"], found.calibration[n]["max"])
               or not np.array_equal(refined.calibration[n]["min"], found.calibration[n]["min"])]
    assert len(changed) == refined.tensors_refined


def test_kl_objective_for_class_scores(tiny_model):
    from edgeq.range_search import Objective, search_ranges

    samples = _calib(100)
    base, quantize = _session(tiny_model, samples)
    found = search_ranges(tiny_model, samples, base, quantize, objective=Objective.KL)
    kls = {c.name: c.score.kl for c in found.candidates}
    assert all(k is not None and k >= 0 for k in kls.values())
    assert found.chosen == min(kls, key=kls.get) and found.objective is Objective.KL
    # kept (in a level's report) exactly when it measured better than the quantizer's own ranges
    assert found.improved == (found.best.kl < found.baseline.kl)


def test_class_score_ranges_worse_than_the_quantizers_own_fall_back_to_it(tiny_model, monkeypatch):
    """For class scores every candidate keeps the outputs' true maximum; where that ends with a higher
    KL than the quantizer's own ranges on the judging samples, the search takes the quantizer's own:
    a level never starts below it, and 'not improved' always means the quantizer's ranges."""
    from dataclasses import replace

    import edgeq.range_search as rs

    samples = _calib(100)
    base, quantize = _session(tiny_model, samples)

    def worse(cal, best, outputs, base, stats, quantize, measure, on_step, floor):
        return cal, rs.RangeCandidate(best.name + "+outputs-worse", replace(floor, kl=floor.kl + 1.0))

    monkeypatch.setattr(rs, "_class_score_ranges", worse)
    found = rs.search_ranges(tiny_model, samples, base, quantize, objective=rs.Objective.KL)
    assert found.chosen == rs.OWN_RANGES and found.best == found.baseline and not found.improved


def test_ranges_are_reported_kept_when_they_beat_the_quantizers_own():
    """With class scores every candidate keeps the outputs' true maximum, `minmax-ema` included: on
    torchvision MobileNetV2 (Commons photos) that alone took KL from 0.197 to 0.026, and the level's
    report said 'dropped (no gain)' because the rule's name was the quantizer's."""
    from edgeq.range_search import OWN_RANGES, Objective, RangeCandidate, RangeSearch, Score

    def sc(kl):
        return Score(rel_l2=0.1, cosine=0.99, top1=0.9, kl=kl, samples=32)

    own = sc(0.197)

    def found(chosen, kl, objective=Objective.KL):
        return RangeSearch({}, chosen, (RangeCandidate(chosen, sc(kl)),), objective, baseline=own)

    assert found("minmax-ema", 0.026).improved
    assert found("mse", 0.1).improved
    assert not found("minmax-ema", 0.197).improved  # the same model: nothing changed
    assert not found(OWN_RANGES, 0.197).improved
    # rel. L2 (no class scores): minmax-ema is the quantizer's own model, measured as the floor
    assert not RangeSearch({}, "minmax-ema", (RangeCandidate("minmax-ema", own),), baseline=own).improved


def test_an_outputs_cosine_floor_allows_noise_not_a_sacrifice():
    """Score.keeps: no output may end far below the quantizer's own ranges. Near cosine 1 that is
    0.002; where those ranges already leave an output far from float, a tenth of that distance.
    Measured: MediaPipe's hand landmarks (world landmarks 0.808 -> 0.800 with equalization, which
    lowered the error over all four outputs: kept, 0.969 on held-out photos after rounding, 0.925
    without it) and BlazeFace (anchor logits 0.976 -> 0.659 for a lower KL: refused)."""
    from edgeq.range_search import Score

    def sc(*cosines):
        return Score(rel_l2=0.1, cosine=min(cosines), top1=None, kl=None, samples=32, cosines=cosines)

    assert sc(0.9984, 1.0, 1.0, 0.8003).keeps(sc(0.9982, 1.0, 1.0, 0.8080))  # hand landmarks
    assert not sc(0.659, 0.99).keeps(sc(0.976, 0.99))  # BlazeFace
    assert sc(0.9975, 0.9).keeps(sc(0.9990, 0.9)) and not sc(0.9965, 0.9).keeps(sc(0.9990, 0.9))
    assert sc(0.61).keeps(sc(0.64)) and not sc(0.60).keeps(sc(0.64))  # error 0.39 vs 0.36 < a tenth more; 0.40 >
    assert sc(0.5).keeps(None)


def test_a_model_is_judged_once_however_many_candidates_quantize_to_it(tf, monkeypatch):
    """An int8 SOFTMAX output's range is fixed at [0, 1], so the output-range trials of a softmax
    classifier quantize to its chosen model again: each distinct model is run on the judging samples
    once (ConvNeXt-T: 4 judging runs, 34 s), and the trials carry its score."""
    import hashlib

    import edgeq.range_search as rs
    from edgeq.signature import ensure_signature
    from tests.conftest import int8_session

    rng = np.random.default_rng(SEED + 5)
    w = tf.constant(rng.normal(0, 0.4, (16, 10)).astype(np.float32))

    class M(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([1, 16], tf.float32, name="x")])
        def serve(self, x):
            return {"y": tf.nn.softmax(tf.matmul(x, w))}

    m = M()
    model = ensure_signature(bytes(tf.lite.TFLiteConverter.from_concrete_functions(
        [m.serve.get_concrete_function()], m).convert()))[0]
    samples = _calib(64)
    s = int8_session()(model, samples[:8])
    made, runs, real = [], [], rs.score

    def quantize(cal):
        out = s.quantize(cal)
        made.append(hashlib.sha256(out).digest())
        return out

    def counting(reference, q, judge):
        runs.append(hashlib.sha256(q).digest())
        return real(reference, q, judge)

    monkeypatch.setattr(rs, "score", counting)
    found = rs.search_ranges(model, samples, s.base, quantize, objective=rs.Objective.KL)
    # 6 range rules, the quantizer's own ranges (the floor) and 4 output-range trials quantized ...
    assert len(made) == 11
    # ... each distinct model judged once; the trials (the chosen model again) cost no run and, tied
    # with it, do not replace it.
    assert sorted(runs) == sorted(set(made)) and len(runs) <= len(made) - 4
    assert "+outputs-" not in found.chosen and found.best == next(c.score for c in found.candidates
                                                                  if c.name == found.chosen)


def _minus_inf_pad_model(tf) -> bytes:
    """conv -> ReLU -> PADV2 by -inf -> VALID max-pool -> dense: how ONNX exports (onnx2torch's
    OnnxPadStatic, open_nsfw) write a padded max-pool."""
    from edgeq.quiet import quiet_native
    from edgeq.signature import ensure_signature

    rng = np.random.default_rng(0)
    k = tf.constant(rng.normal(size=(3, 3, 3, 8)).astype(np.float32) * 0.3)
    w = tf.constant(rng.normal(size=(8 * 8 * 8, 4)).astype(np.float32) * 0.1)

    @tf.function(input_signature=[tf.TensorSpec([1, 16, 16, 3], tf.float32)])
    def f(x):
        h = tf.nn.relu(tf.nn.conv2d(x, k, 1, "SAME"))
        h = tf.pad(h, [[0, 0], [1, 1], [1, 1], [0, 0]], constant_values=-np.inf)
        h = tf.nn.max_pool2d(h, 3, 2, "VALID")
        return tf.matmul(tf.reshape(h, [1, -1]), w)

    with quiet_native():
        return ensure_signature(tf.lite.TFLiteConverter.from_concrete_functions([f.get_concrete_function()], f)
                                .convert())[0]


def test_a_pad_by_minus_infinity_gets_finite_ranges_and_converts(tf, tmp_path):
    """open_nsfw (ONNX -> torch.export) pads by -inf before its max-pool. edgeq's statistics of that
    tensor read min -inf, its MSE rule NaN, and the range trial quantized with it crashed LiteRT with
    a segmentation fault. (The TFLite converter writes the -inf as -FLT_MAX: the same sentinel.)
    Statistics skip the sentinels, a calibration result's sentinel ends become the extremes without
    them, and the model converts with the float answer."""
    from edgeq.calibration import CalibrationConfig
    from edgeq.convert import ConvertOptions, convert
    from edgeq.ranges import finite_calibration, range_stats
    from edgeq.tflite_model import read_model

    fm = _minus_inf_pad_model(tf)
    from ai_edge_litert.interpreter import Interpreter
    key = next(iter(Interpreter(model_content=fm).get_signature_runner().get_input_details()))
    x = np.random.default_rng(1).random((40, 16, 16, 3)).astype(np.float32)
    samples = [{key: s[None]} for s in x[:16]]
    pad_out = next(op.outputs[0].name for op in read_model(fm).ops if op.name == "PADV2")
    base = {pad_out: {"min": np.array(-np.inf, np.float32), "max": np.array(3.0, np.float32)}}
    stats = range_stats(fm, samples, base)
    lo, hi = stats.extremes[pad_out]
    assert np.isfinite([lo, hi]).all() and lo >= 0 and all(np.isfinite(v).all() for v in stats.spans.values())
    fixed = finite_calibration(fm, samples, base)
    assert finite_calibration(fm, samples, {pad_out: {"min": np.float32(-3.4e38), "max": np.float32(1.0)}})[
        pad_out]["min"] == 0.0
    assert float(fixed[pad_out]["min"]) == 0.0 and 0 < float(fixed[pad_out]["max"]) == pytest.approx(hi)
    (tmp_path / "pad.tflite").write_bytes(fm)
    np.save(tmp_path / "x.npy", x)
    r = convert(tmp_path / "pad.tflite", ConvertOptions(tmp_path / "q.tflite",
                                                       calib=CalibrationConfig(str(tmp_path / "x.npy"))))
    assert r.manifest["fidelity"]["outputs"][0]["cosine"] > 0.99
    assert [str(op.precision) for op in read_model(tmp_path / "q.tflite").ops if op.name == "MAX_POOL_2D"] == ["int8"]


def test_a_tensor_calibration_never_saw_move_gets_a_usable_scale(tf, tmp_path):
    """A ReLU layer dead on every calibration sample (SSR-Net's age heads) had the range [0, 0], which
    the quantizer wrote as scale 3.9e-12: XNNPACK refused the FULLY_CONNECTED writing it (its input
    x weight / output scale ratio was millions), so level fast's weight rounding crashed with a
    traceback, and every bias reading it had scale ~1e-14, clipped at the int32 limit. Now its range
    is [0, DEAD_WIDTH]: the model is written, runs under XNNPACK in one partition, and matches float."""
    from edgeq import tflite_edit as te
    from edgeq.calibration import CalibrationConfig
    from edgeq.convert import ConvertOptions, convert
    from edgeq.ranges import DEAD_WIDTH
    from tests.conftest import save_keras

    tf.keras.utils.set_random_seed(0)
    L = tf.keras.layers
    x = tf.keras.Input((16,))
    live = L.Dense(16, activation="relu")(x)
    dead = L.Dense(8, activation="relu", bias_initializer=tf.keras.initializers.Constant(-100.0))(x)
    y = L.Dense(4)(L.Concatenate()([live, L.Dense(8)(dead)]))
    src = save_keras(tf, tf.keras.Model(x, y), tmp_path / "m.keras")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(120, 16)).astype(np.float32))
    from edgeq.optimize import OptimizeLevel
    from edgeq.verify import check_runs

    data = np.load(tmp_path / "x.npy")
    for level in (OptimizeLevel.FAST,):  # the LiteRT quantizer's paths (the TFLite converter's: not yet)
        out = tmp_path / f"{level.value}.tflite"
        r = convert(src, ConvertOptions(out, calib=CalibrationConfig(str(tmp_path / "x.npy"), samples=100,
                                                                     eval_samples=20), optimize=level))
        assert r.manifest["fidelity"]["outputs"][0]["cosine"] > 0.99
        from ai_edge_litert.interpreter import Interpreter

        # Keras numbers input layers per process (input_layer_85 in a full run): the signature's name
        name = next(iter(Interpreter(model_content=out.read_bytes()).get_signature_runner().get_input_details()))
        run = check_runs(out.read_bytes(), [{name: data[i:i + 1]} for i in range(3)])
        assert run.delegation.delegated == run.delegation.nodes and run.delegation.partitions == 1
        m = te.load(out.read_bytes())
        sg = m.subgraphs[0]
        scales = sorted(float(te.qparams(t)[0][0]) for t in sg.tensors
                        if t.type == 9 and te.qparams(t) is not None and len(te.qparams(t)[0]) == 1)
        assert scales[0] == pytest.approx(DEAD_WIDTH / 255, rel=1e-6) or scales[0] > 1e-4
        assert scales[0] > 1e-6

    # The written file with the quantizer's old scale put back on the dead layer's output: XNNPACK
    # refuses it, and the level's captures say so in one line (they raised a RuntimeError traceback).
    from edgeq.fidelity import ModelRunError
    from edgeq.weight_layers import capture

    m = te.load(out.read_bytes())
    sg = m.subgraphs[0]
    dead_out = next(i for i, t in enumerate(sg.tensors) if t.type == 9 and te.qparams(t) is not None
                    and len(te.qparams(t)[0]) == 1 and abs(te.qparams(t)[0][0] - DEAD_WIDTH / 255) < 1e-9)
    sg.tensors[dead_out].quantization.scale = [1e-9 / 255]
    with pytest.raises(ModelRunError, match="LiteRT could not run the model on sample 1: .*XNNPACK"):
        capture(te.pack(m), [{name: data[:1]}], [dead_out], lambda *a: None)


def test_anchor_logits_are_judged_after_their_sigmoid():
    """A detector's per-anchor score logits ([N, anchors, 1], mostly far below 0) are judged by the L2
    of their sigmoids: the empty anchors' -100..-300 decide nothing, and judged raw they dominated
    the error, so MediaPipe's sparse BlazeFace got a score range of [-286, 0] (a step of 1.12 logits
    at the 0.5 decision point) and found other faces than float (anchor Jaccard 0.575, bare 0.630).
    Box outputs and maps already in 0..1 stay judged as they are."""
    from edgeq.range_search import anchor_logits, compare_outputs

    rng = np.random.default_rng(SEED)
    logits = rng.uniform(-250, -10, (8, 512, 1)).astype(np.float32)
    near = rng.choice(512, 40, replace=False)
    logits[:, near, 0] = rng.uniform(-3, 2, (8, 40))  # candidate faces around the decision point
    boxes = rng.normal(0, 50, (8, 512, 4)).astype(np.float32)
    # a coarse step on the empty tail (what a wide range does to it) vs 0.8 logits near 0
    tail_off = np.where(logits < -10, logits * rng.uniform(0.8, 1.2, logits.shape), logits).astype(np.float32)
    near_off = logits + np.where(logits >= -10, rng.uniform(-0.8, 0.8, logits.shape), 0).astype(np.float32)

    def rel(q):
        return compare_outputs({"boxes": boxes, "scores": logits}, {"boxes": boxes, "scores": q}).rel_l2

    assert anchor_logits(logits) and not anchor_logits(boxes)
    assert not anchor_logits(1 / (1 + np.exp(-logits)))  # a map already through its sigmoid
    assert not anchor_logits(logits[:, :8])  # too few values to be anchors
    # a level in dB (-77..-17 per frame) never reaches the decision point: a measurement, judged raw
    # (after a sigmoid only its loudest frames counted, and every range candidate read 1.0)
    assert not anchor_logits(rng.uniform(-77, -17, (8, 64, 1)))
    assert rel(tail_off) < 1e-3 < 0.05 < rel(near_off)
    # raw, the tail error would have counted over 10x the decision-point one
    raw = [np.linalg.norm(q - logits) for q in (tail_off, near_off)]
    assert raw[0] > 10 * raw[1]
    # boxes of the same shape family are still judged raw
    moved = boxes + 1.0
    assert compare_outputs({"b": boxes}, {"b": moved}).rel_l2 == pytest.approx(
        np.linalg.norm(moved - boxes) / np.linalg.norm(boxes), rel=1e-6)


def test_top1_is_taken_over_vectors_not_maps():
    """Score.top1 is an argmax agreement: over a [N, C] score vector it means something, over CRAFT's
    160x160x2 text map (which the manifest's step scores read as "top-1 0.69") nothing."""
    from edgeq.range_search import compare_outputs

    rng = np.random.default_rng(SEED)
    scores, text_map = rng.normal(size=(8, 10)), rng.normal(size=(8, 16, 16, 2))
    got = compare_outputs({"s": scores}, {"s": scores + rng.normal(0, 0.01, scores.shape)})
    assert got.top1 == 1.0
    assert compare_outputs({"m": text_map}, {"m": text_map * 1.01}).top1 is None
