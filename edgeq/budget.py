"""Accuracy budget (`--max-drop`): move the most damaging ops out of int8 until fidelity holds.

Each step measures per-layer error (layers.py), moves the ops that add the most error to hybrid
(when they have weights and the target runs hybrid) or float, re-quantizes, re-measures, and
records what moved, the metric and the size. The device profile is respected: an op the target
cannot run at the new precision is not moved, and the reason is reported.
"""

from __future__ import annotations

from .errors import ProfileError, QuantizationError
from .layers import layer_errors
from .litert_quant import Reiterable, per_op_from_plan, quantize_per_op
from .plan import plan_precision
from .precision import IoType, Precision
from .validate import fidelity

_ANALYSIS_SAMPLES = 16  # per-layer error needs few samples; the fidelity check uses them all


def _drop(fid, metric: str) -> float:
    if metric == "cosine":
        return 1.0 - fid.worst("cosine")
    if metric == "top1":
        v = fid.worst("top1_agreement")
        if v != v:  # NaN: no class-score output
            raise QuantizationError("--metric top1 needs an output that looks like class scores; use cosine")
        return 1.0 - v
    return fid.worst("rel_l2")


def _value(fid, metric: str) -> float:
    return fid.worst({"cosine": "cosine", "top1": "top1_agreement", "rel_l2": "rel_l2"}[metric])


def run_budget(source, float_info, profile, scheme, io, data, eval_samples, reference, qbytes, plan, fid,
               budget, adjust, progress):
    """Returns (model bytes, plan, fidelity, report dict). Raises QuantizationError if unmet.

    The plan is a plan.Plan: for `profile`, or a device-less one (device None) when ops moved without one."""
    if not eval_samples:
        raise QuantizationError("--max-drop needs held-out samples; use --eval-samples > 0 with --calib")
    metric = budget.metric
    default = scheme.op_precision
    keep_float_io = io is IoType.FLOAT32

    def requantize(per_op):
        calib = Reiterable(data.calibration) if scheme.needs_calibration else None  # streamed each step
        return quantize_per_op(source.float_tflite, default, per_op, calib, keep_float_io=keep_float_io,
                               adjust_ranges=adjust)

    def make_plan(overrides):
        return plan_precision(list(float_info.ops), profile, overrides, scheme=scheme, min_weight_elements=0)

    overrides: dict[int, tuple[Precision, str]] = {}
    per_op = per_op_from_plan(make_plan(overrides))
    steps = [{"step": 0, "moved": [], "value": _value(fid, metric), "drop": _drop(fid, metric),
              "bytes": len(qbytes), "note": "as converted"}]
    if steps[0]["drop"] > budget.max_drop:
        # Per-layer analysis pairs tensors by name, so the loop's models all come from the LiteRT quantizer.
        with progress.task("Accuracy budget: baseline"):
            qbytes = requantize(per_op)
            fid = fidelity(source.float_tflite, qbytes, eval_samples, reference)
        steps.append({"step": 0, "moved": [], "value": _value(fid, metric), "drop": _drop(fid, metric),
                      "bytes": len(qbytes), "note": "baseline re-quantized with the LiteRT quantizer"})
    refused: list[str] = []
    blocked: set[int] = set()
    by_index = {op.index: op for op in float_info.ops if op.subgraph == 0}
    step = group_step = 0
    current_group = None
    with progress.task("Accuracy budget", total=budget.max_steps) as advance:
        while _drop(fid, metric) > budget.max_drop and step < budget.max_steps:
            step += 1
            errors = layer_errors(source.float_tflite, qbytes, float_info, eval_samples[:_ANALYSIS_SAMPLES])
            # Weight-less ops (norms, softmax, elementwise) go first: keeping them float costs little,
            # while matmuls/convs carry int8's speed and size. Within each group, most damaging first.
            errors.sort(key=lambda e: (by_index[e.index].has_weights, -e.damage))
            # Moves accumulate: one op rarely fixes a transformer block (its neighbours re-quantize the
            # error), so the number moved per step doubles once the first single-op steps are spent.
            pending = [e for e in errors if e.index not in overrides and e.index not in blocked]
            group = by_index[pending[0].index].has_weights if pending else None
            if group != current_group:  # a new group (weight-less ops, then matmuls) starts small again
                current_group, group_step = group, 0
            group_step += 1
            k = 1 if group_step <= 2 else 2 ** (group_step - 2)
            moved = []
            for e in pending:
                if len(moved) >= k:
                    break
                op = by_index[e.index]
                if op.has_weights != group:
                    break  # measure the weight-less moves before touching any matmul
                target = Precision.HYBRID if op.has_weights and default is Precision.INT8 else Precision.FLOAT
                refusal = _refusal(profile, make_plan, overrides, e.index, target)
                if (refusal and target is Precision.HYBRID
                        and not _refusal(profile, make_plan, overrides, e.index, Precision.FLOAT)):
                    target, refusal = Precision.FLOAT, None
                if refusal:
                    blocked.add(e.index)
                    refused.append(f"#{e.index} {op.name}: {refusal}")
                    continue
                overrides[e.index] = (target, f"accuracy budget step {step}: adds {e.damage:.3f} per-channel "
                                              f"error in {scheme.value}")
                moved.append(f"#{e.index} {op.name} -> {target}")
            if not moved:
                break
            qbytes = requantize(per_op_from_plan(make_plan(overrides)))
            fid = fidelity(source.float_tflite, qbytes, eval_samples, reference)
            steps.append({"step": step, "moved": moved, "value": _value(fid, metric), "drop": _drop(fid, metric),
                          "bytes": len(qbytes)})
            advance(1)
    met = _drop(fid, metric) <= budget.max_drop
    report = {"max_drop": budget.max_drop, "metric": metric, "met": met, "steps": steps, "refused": refused,
              "final_drop": _drop(fid, metric)}
    if not met:
        best = min(s["drop"] for s in steps)
        why = "; ".join(refused[:3]) if refused else f"{len(overrides)} op(s) moved out of {scheme.value}"
        raise QuantizationError(f"accuracy budget not met: {metric} drop {best:.4f} > {budget.max_drop} after "
                                f"{len(steps) - 1} step(s) ({why}); raise --max-drop, use --scheme dynamic, "
                                "or improve calibration data")
    if profile is not None or overrides:
        plan = make_plan(overrides)
    return qbytes, plan, fid, report


def _refusal(profile, make_plan, overrides, index, target) -> str | None:
    """Why the profile cannot run op `index` at `target` (None: it can)."""
    if profile is None:
        return None
    try:
        make_plan({**overrides, index: (target, "accuracy budget")})
    except ProfileError as e:
        return str(e)
    return None

