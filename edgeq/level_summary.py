"""What an accuracy level (--optimize) did, read from a manifest's `optimize` section: the table and
lines `edgeq convert` prints and `edgeq report` shows (issue 13: every method reported in both).
Pure: plain strings and rows, no printing."""

from __future__ import annotations

# The verdict of a step the level did not keep, unless it says why (optimize.NOT_CHOSEN)
DROPPED = "dropped (no gain)"


def _num(x, digits: int = 4) -> str:
    return "n/a" if not isinstance(x, (int, float)) else f"{x:.{digits}f}"


def step_change(s: dict) -> str:
    """What a step changed in the model, in a few words."""
    d = s.get("detail") or {}
    return {"quantize": "the quantizer's own ranges",
            "ranges": f"activation ranges: {d.get('chosen')}",
            "equalize": f"{d.get('pairs', 0)} layer pairs rescaled",
            "weight_rounding": f"{d.get('weights_flipped', 0)} weights rounded the other way in {d.get('layers', 0)} layers",
            "bias_correction": f"{d.get('channels_changed', 0)} bias channels in {d.get('layers_corrected', 0)} layers",
            "refine_ranges": f"{d.get('tensors_refined', 0)} tensor ranges refined",
            "learned_rounding": f"{d.get('weights_flipped', 0)} weights re-rounded in {d.get('layers', 0)} layers",
            }.get(s.get("step"), "")


def dropped(s: dict, err: str) -> str:
    """The verdict of a step not kept: DROPPED, or, where it lowered the error, what vetoed it (the
    sure-answer check, optimize.keeps_sure): "dropped (no gain)" read wrong for KL 0.0007 -> 0.0004."""
    before, after = s.get("before") or {}, s.get("after") or {}
    b, a = before.get(err), after.get(err)
    if not isinstance(b, (int, float)) or not isinstance(a, (int, float)) or a >= b:
        return DROPPED
    sb, sa, n = before.get("top1_agreement_sure"), after.get("top1_agreement_sure"), after.get("sure_samples")
    if isinstance(sb, (int, float)) and isinstance(sa, (int, float)) and sa < sb and n:
        flips = round((sb - sa) * n)
        return f"dropped (flips {flips} of {n} sure answer{'s' if n > 1 else ''})"
    return "dropped (a lower error, but an output fell below the quantizer's own ranges)"


def _gptq(o: dict) -> bool:
    steps = o.get("steps") or []
    return bool(steps) and steps[0].get("step") == "gptq"


def level_table(o: dict) -> tuple[str, list[str], list[list]] | None:
    """(title, columns, rows): one row per step with its error before/after on the judging calibration
    samples and the verdict; None when no step ran (or GPTQ's int4 rounding, said in lines)."""
    if not o.get("ran") or _gptq(o) or not o.get("steps"):
        return None
    err = o.get("objective")
    classes = err == "kl"  # top-1 means something for class scores only (optimize.StepReport.line)
    rows = []
    for s in o["steps"]:
        before, after = s.get("before") or {}, s.get("after") or {}
        top1 = [_num(after.get("top1_agreement"), 3)] if classes else []
        rows.append([s.get("step"), step_change(s), _num(before.get(err)) if before else "", _num(after.get(err)),
                     *top1, (s.get("detail") or {}).get("verdict") or ("kept" if s.get("kept") else dropped(s, err)),
                     s.get("seconds")])
    title = (f"--optimize {o.get('level')}: each step judged on {o.get('judged_on_calibration_samples')} "
             f"calibration samples ({err} to float)")
    return title, ["step", "what it changed", "before", "after", *(["top-1 agree"] if classes else []),
                   "verdict", "s"], rows


def level_lines(o: dict) -> list[str]:
    """Why no level ran (nothing when none was asked for), GPTQ's summary, or the level's time and
    why the written model is not its result."""
    if not o.get("ran"):
        return [] if o.get("why") == "--optimize none" else [f"optimize: none ({o.get('why')})"]
    if _gptq(o):  # int4 weights: GPTQ rounding per layer
        d = o["steps"][0].get("detail") or {}
        layers = d.get("layers") or []
        kept = [x for x in layers if x.get("kept")]
        if kept:
            mean = sum(x["error_nearest"] for x in kept) / len(kept), sum(x["error_gptq"] for x in kept) / len(kept)
            lines = [f"optimize: {o['level']}: GPTQ rounding of {len(kept)} of {len(layers)} int4 "
                     f"FULLY_CONNECTED layers, their own output error {mean[0]:.4f} -> {mean[1]:.4f} on "
                     f"{d.get('samples')} calibration samples ({d.get('seconds')} s)"]
        else:
            lines = [f"optimize: {o['level']}: GPTQ rounding changed no int4 layer ({len(layers)} measured)"]
        return lines + [f"optimize: {o['level']}: int4 table {t['shape'][0]}x{t['shape'][1]}: scales searched, "
                        f"relative error {t['error_nearest']:.4f} -> {t['error_clipped']:.4f}"
                        for t in d.get("tables", []) if t.get("changed")]
    line = f"optimize: {o.get('level')} in {o.get('seconds')} s"
    # A level that stopped after its ranges says why beside its one-row table (it was on stderr only)
    stopped = ((o.get("steps") or [{}])[0].get("detail") or {}).get("stopped")
    if stopped:
        line += f" ({stopped})"
    if o.get("superseded"):
        line += f"; not in the written model: {o['superseded']}"
    return [line]
