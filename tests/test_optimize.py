"""Accuracy levels (edgeq/optimize.py) on the tiny seeded CNN: what each step bought, kept only if it helped.

Real TFLite converter, LiteRT quantizer and interpreter.
"""

from __future__ import annotations

import pytest

from test_equalize import calib, held_out, int8_session, output_error, tiny_cnn  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def levels(tiny_cnn, calib):
    from edgeq.optimize import optimize

    return {lvl: optimize(tiny_cnn, calib, int8_session(), lvl) for lvl in ("none", "fast")}


def test_none_is_the_quantizers_own_ranges(levels):
    none = levels["none"]
    assert [s.name for s in none.steps] == ["quantize"]
    assert none.steps[0].detail == {"ranges": "minmax-ema"}


def test_fast_measures_each_step_and_beats_none(tiny_cnn, calib, held_out, levels):
    none, fast = levels["none"], levels["fast"]
    assert [s.name for s in fast.steps] == ["ranges", "equalize", "bias_correction"]
    # Steps chain: each one starts from the best so far, and the final score is the last kept one.
    best = fast.steps[0].after if fast.steps[0].kept else fast.steps[0].before
    for s in fast.steps[1:]:
        assert s.before == best
        if s.kept:
            assert s.after.rel_l2 < s.before.rel_l2
            best = s.after
    assert fast.score == best
    # On this CNN equalization is what matters (channel scales 0.003..1 before a depthwise conv).
    eq = next(s for s in fast.steps if s.name == "equalize")
    assert eq.kept and eq.detail["pairs"] == 5 and eq.after.rel_l2 < 0.5 * eq.before.rel_l2
    # Judged on calibration samples; the held-out ones agree that fast is much better than none.
    assert fast.judged_on == 32 and fast.samples == 48
    assert output_error(tiny_cnn, fast.model, held_out) < 0.5 * output_error(tiny_cnn, none.model, held_out)
    assert fast.to_json()["steps"][1]["detail"]["per_pair"][0]["activation"] == "RELU6"
    assert all(s.line(fast.objective) for s in fast.steps)


def test_fast_keeps_the_float_model_it_quantized(tiny_cnn, calib, levels):
    from edgeq.equalize import equalization_error

    fast = levels["fast"]
    assert fast.float_model != tiny_cnn  # equalized
    assert equalization_error(tiny_cnn, fast.float_model, calib) < 1e-5


@pytest.mark.slow
def test_best_adds_refinement_and_learned_rounding(tiny_cnn, calib, held_out, levels):
    from edgeq.optimize import Budget, optimize

    best = optimize(tiny_cnn, calib, int8_session(), "best", budget=Budget(refine_seconds=5.0, rounding_seconds=15.0))
    assert [s.name for s in best.steps] == ["ranges", "equalize", "refine_ranges", "bias_correction",
                                            "learned_rounding"]
    assert best.score.rel_l2 <= levels["fast"].score.rel_l2 * 1.000001
    assert best.seconds < 5.0 + 15.0 + 60.0
    rounding = next(s for s in best.steps if s.name == "learned_rounding")
    assert rounding.detail["layers"] == 7
