"""--max-size (issue 16): the most accurate scheme whose file fits, then the room it leaves spent on
its most damaging int4 layers at 8 bits. size_goal.py orders and stops (stdlib only, the CLI uses it);
this module quantizes and measures the candidates for convert."""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from itertools import islice
from typing import Callable

from .budget import ANALYSIS_SAMPLES, weight_bytes_added
from .budget_moves import int4_moves, measured_int4_order
from .convert_policy import conversion_plan
from .fidelity import fidelity
from .litert_quant import per_op_from_plan
from .precision import INT4_FALLBACK, INT4_PRECISIONS, IoType, Scheme
from .quantize import QuantizeRequest, quantize
from .size_goal import Measured, choose_for_size, size_candidates, spend_room


@dataclass(frozen=True)
class SizeRequest:
    max_bytes: int  # --max-size
    fixed: bool  # the user or a device profile fixed the scheme: only mixes of it are tried
    scheme: Scheme
    io: IoType
    adjust: Callable[[dict], dict] | None = None  # range selection for static schemes (--calibration)
    # int4 candidates are measured as they would be written: with the conversion's GPTQ rounding
    # (optimize.gptq_finisher, shared with convert so the written plan's layers are solved once).
    finish: Callable[[bytes], bytes] | None = None
    # The user's --max-drop as a test of a Fidelity (None without one). When two int4 mixes both
    # meet it, the one with larger blocks is written: its kernels are faster (MiniLM at 13 MB, 1
    # thread: int4-b128 + 9 layers at 8 bits 2.78x float, int4-b32 + 1 layer 2.36x).
    meets: Callable[[object], bool] | None = None


def plan_for_size(req: SizeRequest, source, data, profile, float_info, eval_samples, reference, class_outputs,
                  progress) -> tuple[Scheme, dict, dict]:
    """(the most accurate candidate scheme whose file fits --max-size, the manifest's size_goal, plan
    overrides: an int4 scheme's most damaging layers at 8 bits in the room left under the size)."""
    candidates = size_candidates(req.scheme, req.io, fixed=req.fixed)
    io, adjust, finish, meets = req.io, req.adjust, req.finish, req.meets

    def measure(s: Scheme, overrides=None, finished: bool = False, quiet: bool = False) -> tuple[bytes, float, bool]:
        # Candidate schemes are sized with nearest rounding (GPTQ keeps the layout, so the size);
        # the mixes of the chosen one are measured `finished`, as they would be written.
        req = QuantizeRequest(s, io, per_op_from_plan(conversion_plan(float_info, profile, s, overrides)),
                              adjust if s.needs_calibration else None)
        with (nullcontext() if quiet else progress.task(
                f"--max-size: quantizing {s.value}" + (f" with {len(overrides)} layer(s) at 8 bits" if overrides
                                                       else ""))):
            model = quantize(source, req, data.calibration if s.needs_calibration else None)
            if finished and finish is not None and s.is_int4:
                model = finish(model)
        fid = fidelity(source.float_tflite, model, eval_samples, reference, class_outputs) if eval_samples else None
        met = fid is not None and meets is not None and meets(fid)
        return model, fid.worst("cosine") if fid else float("nan"), met

    choice = choose_for_size([(s.value, s) for s in candidates], req.max_bytes, lambda s: measure(s)[:2])
    chosen = choice.chosen
    goal = {"max_bytes": req.max_bytes, "chosen": chosen.label, "tried": [_row(m) for m in choice.tried]}
    overrides, reached, met = _size_mix(chosen, req.max_bytes, source, data, profile, float_info, measure, goal,
                                        progress)
    # The most accurate int4 scheme that fits may barely fit, and a later one's room at 8 bits buy
    # more (MiniLM under 13.1 MB: int4-b32 fits with 96 KB left, int4-b128 with 1.14 MB): the first
    # later int4 scheme that leaves at least twice the room is measured the same way and the better
    # result kept, so a larger size does not give a worse model; or the later one when both meet the
    # accuracy target (req.meets), as its larger blocks run faster.
    later = candidates[candidates.index(chosen.candidate) + 1:] if chosen.candidate.is_int4 else []
    for s in later if reached == reached else []:
        model, fid, _ = measure(s)
        alt = Measured(s, s.value, len(model), fid, model)
        goal["tried"].append(_row(alt))
        if req.max_bytes - alt.size_bytes < 2 * max(req.max_bytes - chosen.size_bytes, 1):
            continue
        label = goal["chosen"]
        goal["chosen"] = alt.label
        alt_overrides, alt_reached, alt_met = _size_mix(alt, req.max_bytes, source, data, profile, float_info,
                                                        measure, goal, progress)
        if alt_reached > reached or (alt_met and met):
            if alt_reached <= reached:
                goal["why"] = (f"meets the accuracy target as {label} does, {alt_reached:.4f} vs {reached:.4f}, "
                               "and its larger blocks run faster")
            return alt.candidate, goal, alt_overrides
        goal["chosen"] = label
        break
    return chosen.candidate, goal, overrides


def _row(m: Measured) -> dict:
    return {"scheme": m.label, "bytes": m.size_bytes, "cosine": None if m.fidelity != m.fidelity else m.fidelity}


def _size_mix(chosen, max_bytes: int, source, data, profile, float_info, measure, goal: dict,
              progress) -> tuple[dict, float, bool]:
    """Spend the bytes an int4 choice leaves under --max-size: its layers that buy the most fidelity
    per byte at 8 bits (each measured alone, as the budget loop's int4 phase does:
    budget_moves.measured_int4_order), as many as fit; kept if the file fits and fidelity rose. (Plan
    overrides, {} when nothing is kept; the fidelity reached as written; whether that meets the accuracy
    target); the attempt is recorded in `goal`."""
    scheme, room = chosen.candidate, max_bytes - chosen.size_bytes
    if not scheme.is_int4 or chosen.fidelity != chosen.fidelity:
        return {}, chosen.fidelity, False
    model, base, base_met = measure(scheme, {}, finished=True)  # as it would be written (GPTQ, when the level runs)
    if model != chosen.model:
        goal["tried"].append({"scheme": f"{scheme.value} + GPTQ", "bytes": len(model), "cosine": base})
    if room <= 0:
        return {}, base, base_met
    plan = conversion_plan(float_info, profile, scheme)
    int4 = {e.index: e.precision for e in plan.entries if e.subgraph == 0 and e.precision in INT4_PRECISIONS}
    ops = [op for op in float_info.ops if op.subgraph == 0]
    by_index = {op.index: op for op in ops}
    moves = int4_moves(source.float_tflite, ops, int4, list(islice(data.calibration(), ANALYSIS_SAMPLES)))

    def extra(i: int) -> int:
        return math.ceil(weight_bytes_added(by_index[i], INT4_FALLBACK[int4[i]], int4[i]))

    moves = [mv for mv in moves if extra(mv.ops[0]) <= room]
    if not moves:
        return {}, base, base_met

    why = "--max-size: at 8 bits alone it bought the most fidelity per byte, room left for 8 bits"

    def gain(mv) -> float:  # one layer at 8 bits, measured as it would be written
        return measure(scheme, {mv.ops[0]: (INT4_FALLBACK[int4[mv.ops[0]]], why)}, True, True)[1] - base

    with progress.task("--max-size: each int4 layer at 8 bits alone", total=len(moves)) as advance:
        moves, measured = measured_int4_order(moves, gain, lambda mv: extra(mv.ops[0]), advance=advance)
    moves = [mv for mv in moves if mv.ops not in measured or mv.noise > 0]
    picked = spend_room([(mv.ops[0], extra(mv.ops[0])) for mv in moves], room)
    while picked:
        overrides = {i: (INT4_FALLBACK[int4[i]], why) for i in picked}
        model, fid, met = measure(scheme, overrides, finished=True)
        row = {"scheme": f"{scheme.value} + {len(picked)} layer(s) at 8 bits", "bytes": len(model), "cosine": fid}
        goal["tried"].append(row)
        if len(model) <= max_bytes:
            if fid > base:
                goal["chosen"] = row["scheme"]
                return overrides, fid, met
            return {}, base, base_met
        picked = _shed(picked, len(model) - max_bytes, extra)
    return {}, base, base_met


def _shed(picked: list[int], over: int, extra: Callable[[int], int]) -> list[int]:
    """`picked` (best first) less the fewest last layers whose bytes cover `over`, the bytes the file
    came out above the size (the estimate counts weights, not their scales and the file's layout):
    MiniLM int4-b128 with 8 layers at 8 bits was 5.8 KB over 13 MB; dropping a quarter of them left
    146 KB unspent, dropping the last one 72 KB."""
    shed = 0
    while picked and shed < over:
        shed += extra(picked[-1])
        picked = picked[:-1]
    return picked
