"""level_summary: what convert prints and the report shows of a manifest's `optimize` section
(shapes as optimize.optimize_report writes them; the convert + report test in test_cli.py runs the
real thing)."""

from edgeq.level_summary import level_lines, level_table


def _step(name, kept, before, after, **detail):
    return {"step": name, "kept": kept, "seconds": 1.5, "detail": detail,
            "before": {"kl": before, "top1_agreement": 0.9}, "after": {"kl": after, "top1_agreement": 0.95}}


def test_steps_table_and_time_line():
    o = {"level": "fast", "ran": True, "objective": "kl", "judged_on_calibration_samples": 20, "seconds": 12.5,
         "superseded": None,
         "steps": [_step("ranges", True, 0.35, 0.04, chosen="minmax-ema"),
                   _step("equalize", False, 0.04, 0.05, pairs=31),
                   _step("bias_correction", True, 0.04, 0.02, channels_changed=48, layers_corrected=3)]}
    title, heads, rows = level_table(o)
    assert title == "--optimize fast: each step judged on 20 calibration samples (kl to float)"
    assert heads == ["step", "what it changed", "before", "after", "top-1 agree", "verdict", "s"]
    assert rows == [["ranges", "activation ranges: minmax-ema", "0.3500", "0.0400", "0.950", "kept", 1.5],
                    ["equalize", "31 layer pairs rescaled", "0.0400", "0.0500", "0.950", "dropped (no gain)", 1.5],
                    ["bias_correction", "48 bias channels in 3 layers", "0.0400", "0.0200", "0.950", "kept", 1.5]]
    assert level_lines(o) == ["optimize: fast in 12.5 s"]
    # rel. L2 (no class scores): no top-1 column
    o2 = {**o, "objective": "rel_l2", "steps": [{**_step("ranges", True, 0, 0), "before": {"rel_l2": 0.3},
                                                  "after": {"rel_l2": 0.1, "top1_agreement": None}}]}
    assert level_table(o2)[1] == ["step", "what it changed", "before", "after", "verdict", "s"]
    assert level_table(o2)[2][0][2:4] == ["0.3000", "0.1000"]
    # a level that stopped after the ranges says why (nsfwjs' InceptionV3: one row, and the reason on stderr only)
    settled = {**o, "steps": [_step("ranges", True, 0.35, 0.0003, chosen="mse", stopped="the error left is small")]}
    assert level_lines(settled) == ["optimize: fast in 12.5 s (the error left is small)"]
    o3 = {**o, "superseded": "missed the fidelity floor; the budget loop re-quantized"}
    assert level_lines(o3) == ["optimize: fast in 12.5 s; not in the written model: missed the fidelity floor; "
                               "the budget loop re-quantized"]


def test_nothing_ran_and_gptq():
    assert level_lines({"level": "none", "ran": False, "why": "--optimize none"}) == []
    assert level_table({"level": "none", "ran": False, "why": "--optimize none"}) is None
    assert level_lines({"level": "none", "ran": False, "why": "--scheme dynamic: x"}) == ["optimize: none (--scheme dynamic: x)"]
    gptq = {"level": "fast", "ran": True, "steps": [{"step": "gptq", "kept": True, "detail": {
        "samples": 64, "seconds": 3.1,
        "layers": [{"kept": True, "error_nearest": 0.2, "error_gptq": 0.1}, {"kept": False}],
        "tables": [{"changed": True, "shape": [30522, 384], "error_nearest": 0.05, "error_clipped": 0.04}]}}]}
    assert level_table(gptq) is None
    assert level_lines(gptq) == [
        "optimize: fast: GPTQ rounding of 1 of 2 int4 FULLY_CONNECTED layers, their own output error 0.2000 -> "
        "0.1000 on 64 calibration samples (3.1 s)",
        "optimize: fast: int4 table 30522x384: scales searched, relative error 0.0500 -> 0.0400"]
    none_kept = {**gptq, "steps": [{"step": "gptq", "kept": False, "detail": {"layers": [{"kept": False}]}}]}
    assert level_lines(none_kept) == ["optimize: fast: GPTQ rounding changed no int4 layer (1 measured)"]


def test_a_step_that_lowered_the_error_says_what_vetoed_it():
    """VWW's weight rounding took KL 0.0007 -> 0.0004 and flipped 2 of 32 sure answers: it read
    "dropped (no gain)"."""
    def step(before, after, sure_before, sure_after):
        return {"step": "weight_rounding", "kept": False, "seconds": 1.0, "detail": {"weights_flipped": 9, "layers": 2},
                "before": {"kl": before, "top1_agreement_sure": sure_before, "sure_samples": 32},
                "after": {"kl": after, "top1_agreement_sure": sure_after, "sure_samples": 32}}

    def verdict(s):
        return level_table({"level": "fast", "ran": True, "objective": "kl", "judged_on_calibration_samples": 32,
                            "steps": [s]})[2][0][5]

    assert verdict(step(0.0007, 0.0004, 1.0, 0.9375)) == "dropped (flips 2 of 32 sure answers)"
    assert verdict(step(0.0007, 0.0009, 1.0, 1.0)) == "dropped (no gain)"
    assert verdict(step(0.0007, 0.0004, 1.0, 1.0)) == ("dropped (a lower error, but an output fell below the "
                                                       "quantizer's own ranges)")
