"""The accuracy-budget loop: when the first result misses its target (accuracy_target.py), move
ops out of the scheme's precision until it holds.

1. Calibrate once. `litert_quant.Requantizer` keeps the LiteRT quantizer's calibration result and
   quantizes every plan the loop tries with it (the result depends on the float model and the
   samples, not on the recipe); convert uses it for its first result too.
2. Find moves that can buy accuracy (budget_moves.py): under static activations, from each tensor's
   measured int8 rounding noise (tier 1: weight-less regions, cheap to keep float; tier 2: a matmul
   with its neighbours, hybrid where the target runs it, else float; where every such move at hybrid
   misses, the tier again with them float); under dynamic schemes, single ops ranked by measured damage.
3. Probe end to end, a tier at a time: all of its moves first (if that misses, the tier stays and
   the next is tried; after the last, the phase ends), then a binary search for the shortest
   ranked prefix that meets the target, then one probe without tier-1 regions of negligible noise.
   Each probe is a real quantization measured on the held-out samples, and one step of the report
   (the ops moved, the file's size, the fidelity reached).

int4 schemes start one level lower (issue 16). Phase 1 moves int4 layers (embedding tables
included) to their 8-bit fallback (int4 -> hybrid, int4x8 -> int8): each layer is moved alone and
measured end to end, and layers are ranked by what that bought per byte added
(budget_moves.measured_int4_order). If even every damaging layer at 8 bits misses
the target, phase 2 starts from there and runs the 8-bit loop above (hybrid -> float; int8 ->
hybrid/float), the phase-1 moves kept.

Under --max-size (`BudgetContext.max_bytes`) a plan whose file is larger cannot be chosen: each tier
keeps only the moves that fit in the bytes left (most damaging first, a move too big skipped), so
every probe of the search fits, and a loop that cannot meet the target there says what it reached
within the size.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping, Sequence

from .accuracy_target import Metric, Requirement, Target
from .budget_moves import Move, int4_moves, measured_int4_order, measured_moves, static_moves
from .errors import ProfileError, QuantizationError
from .fidelity import Fidelity, ModelRunError, fidelity
from .litert_quant import STATIC_PRECISIONS, Requantizer, per_op_from_plan
from .precision import INT4_FALLBACK, INT4_PRECISIONS, RECIPE_PRECISION, Precision, Scheme
from .size_goal import human_size, spend_room
from .tflite_ops import weight_tensor

ANALYSIS_SAMPLES = 8  # calibration samples the noise analysis runs (the float model, once)
REFUSALS_LISTED = 20  # device refusals the report lists (all are counted)
# Quantize-and-measure probes per loop: two whole tiers, a binary search over ~50 moves, one prune.
MAX_PROBES = 12

# The loop's phases: int4 layers to 8 bits (int4 schemes only), then 8-bit ops to hybrid/float.
INT4_PHASE = "int4 -> 8-bit"
EIGHT_BIT_PHASE = "8-bit -> hybrid/float"


@dataclass
class BudgetContext:
    """What the loop works with (convert builds it)."""

    float_info: object  # tflite_model.ModelInfo of the float model
    profile: object  # DeviceProfile or None
    scheme: Scheme
    requantizer: Requantizer
    eval_samples: list
    reference: dict
    class_outputs: frozenset = frozenset()
    analysis_samples: Callable[[], list] = list  # a few calibration samples
    max_probes: int = MAX_PROBES
    progress: object = None
    max_bytes: int | None = None  # --max-size: no plan with a larger file is chosen
    # Plan overrides the first result was made with (--max-size's int4 layers at 8 bits): every probe
    # keeps them. Without them the probes were quantized from the bare scheme, smaller and worse than
    # the first result they were measured against (MiniLM int4-b128: 0.9834 at 12.03 MB vs 0.9879 at 12.85).
    overrides: Mapping[int, tuple[Precision, str]] = field(default_factory=dict)


# Bytes a weight value takes at each precision (scales aside), for what a move adds under --max-size.
_WEIGHT_BYTES = {Precision.FLOAT: 4.0, Precision.FP16: 2.0, Precision.HYBRID: 1.0, Precision.INT8: 1.0,
                 Precision.INT16X8: 1.0, **{p: 0.5 for p in INT4_PRECISIONS}}


def weight_bytes_added(op, to: Precision, before: Precision) -> float:
    """Bytes moving op (an OpInfo of the float model) from `before` to `to` adds to the file: its
    weights' values at the new width less the old (0 for a weight-less op)."""
    w = weight_tensor(op)
    if w is None:
        return 0.0
    n = math.prod(max(int(d), 1) for d in w.shape)
    return n * (_WEIGHT_BYTES.get(to, 4.0) - _WEIGHT_BYTES.get(before, 4.0))


@dataclass
class BudgetResult:
    model: bytes
    plan: object  # plan.Plan
    fidelity: Fidelity
    report: dict
    per_op: tuple = ()


@dataclass
class _Probe:
    moves: tuple[Move, ...]
    model: bytes
    fid: Fidelity
    met: bool
    step: dict = field(default_factory=dict)
    to: dict = field(default_factory=dict)  # op index -> the precision this probe moved it to


# Regions of a tier kept whole with less than this share of its largest noise are tried without
# (one probe): a region whose tensors barely round buys nothing worth a float op.
PRUNE_SHARE = 0.01


def run_budget(ctx: BudgetContext, target: Target, first_model: bytes, first_fid: Fidelity, first_litert: bool,
               plan) -> BudgetResult:
    """Meet `target` starting from the first result (`first_litert`: it came from ctx.requantizer's
    quantizer); QuantizationError, nothing written, if it cannot. When it cannot within --max-size,
    the loop runs again without the size, so the error names the size where the target holds."""
    try:
        return _Loop(ctx, target, first_model, first_fid, first_litert, plan).run()
    except _MissedWithinSize as missed:
        if ctx.progress is not None:
            ctx.progress.note("Accuracy budget: not met within --max-size; finding the size where it is met")
        try:
            free = _Loop(replace(ctx, max_bytes=None), target, first_model, first_fid, first_litert, plan).run()
        except QuantizationError:
            raise QuantizationError(missed.message(None)) from None
        raise QuantizationError(missed.message(len(free.model))) from None


class _Loop:
    def __init__(self, ctx: BudgetContext, target: Target, first_model: bytes, first_fid: Fidelity,
                 first_litert: bool, plan):
        from .progress import SILENT

        self.ctx, self.target, self.plan = ctx, target, plan
        self.first_model, self.first_fid, self.first_litert = first_model, first_fid, first_litert
        self.progress = ctx.progress or SILENT
        self.phase = INT4_PHASE if ctx.scheme.is_int4 else EIGHT_BIT_PHASE
        # The recipe precision this phase moves ops out of (phase 1 of int4: any int4 precision).
        self.default = ctx.scheme.op_precision
        self.ops = [op for op in ctx.float_info.ops if op.subgraph == 0]
        self.names = {op.index: op.name for op in self.ops}
        self.by_index = {op.index: op for op in self.ops}
        self.primary = target.worst(first_fid)  # its metric is the one the report charts
        self.base: dict[int, tuple[Precision, str]] = {}  # moves of an earlier phase every probe keeps
        self.base_moves: list[dict] = []  # ... as report lines
        self.current: bytes | None = first_model if first_litert else None  # what measured ranking runs
        self.moves: list[Move] = []
        self.probes: dict[tuple, _Probe] = {}
        self.move_to: dict[int, Precision] = {}
        self.float_too: set[int] = set()  # hybrid candidates the target also runs float (a last tier)
        self.int4_of: dict[int, Precision] = {}  # phase 1: each candidate's int4 precision
        self.measured: set[tuple[int, ...]] = set()  # phase 1: moves measured end to end (noise = gain)
        self.steps = [self._step(0, "as converted", (), first_model, first_fid)]
        self.report = {**target.to_json(), "metric": str(self.primary.metric), "met": target.met(first_fid),
                       "loop": False, "steps": self.steps, "moves": [], "refused": [], "candidates": 0}
        if self.report["max_drop"] is None:  # the floor's primary requirement as a drop (what reports chart)
            self.report["max_drop"] = _drop_bound(self.primary)
        if ctx.max_bytes is not None:
            self.report["max_bytes"] = ctx.max_bytes

    def make_plan(self, overrides):
        from .plan import plan_precision
        return plan_precision(list(self.ctx.float_info.ops), self.ctx.profile,
                              {**self.ctx.overrides, **self.base, **overrides},
                              scheme=self.ctx.scheme, min_weight_elements=0, litert=True)

    def run(self) -> BudgetResult:
        started = time.monotonic()
        if self.target.met(self.first_fid):
            self.report["final_drop"] = self._charted(self.first_fid).drop(self.first_fid)
            return BudgetResult(self.first_model, self.plan, self.first_fid, self.report, per_op_from_plan(self.plan))
        self.report["loop"] = True
        self.report["phases"] = []
        try:
            chosen = self._run_phase()
            # Phase 2 starts from every int4 layer at 8 bits, a file --max-size has already refused.
            if chosen is None and self.phase == INT4_PHASE and self.ctx.max_bytes is None:
                self._next_phase()
                chosen = self._run_phase()
            if chosen is not None:
                chosen = self._prune(chosen, self.moves)
        except _OutOfProbes:
            chosen = min((p for p in self.probes.values() if p.met), default=None,
                         key=lambda p: len(p.step["moved"]))
            self.report["note"] = f"stopped after {self.ctx.max_probes} probes"
        self.report["seconds"] = round(time.monotonic() - started, 1)
        self.report["probes"] = len(self.probes)
        if chosen is None:
            self._fail()
        return self._result(chosen)

    def _run_phase(self) -> _Probe | None:
        self.report["phases"].append(self.phase)
        self._candidates()
        what = "int4 loses accuracy" if self.phase == INT4_PHASE else "int8 loses accuracy"
        with self.progress.task(f"Accuracy budget: measuring where {what}"):
            self.moves = self._moves()
        left = self.ctx.max_probes - len(self.probes)
        with self.progress.task("Accuracy budget: probing plans", total=left) as self._advance:
            return self._search(self.moves)

    def _next_phase(self) -> None:
        """Every damaging int4 layer at 8 bits missed: keep them there and move 8-bit ops on."""
        moved = {i for mv in self.moves for i in mv.ops if i in self.move_to}
        reason = "accuracy budget: int4 weights lose too much here (every damaging int4 layer at 8 bits)"
        self.base = {i: (self.move_to[i], reason) for i in sorted(moved)}
        self.base_moves = self._move_lines(self.moves)
        probe = self.probes.get(self._key(moved))
        self.current = probe.model if probe is not None else None
        self.phase = EIGHT_BIT_PHASE
        self.default = INT4_FALLBACK[self.ctx.scheme.op_precision]  # hybrid (dynamic int4) or int8 (int4x8)
        self.move_to = {}

    def _candidates(self) -> None:
        """The move each candidate op makes, unless the device profile refuses it. Phase 1 of int4:
        an int4 op to its 8-bit fallback. Otherwise: hybrid if it has a weight and the activations
        are static, else float. A refusal depends on the op type, version and precision only: each
        is asked of the profile once."""
        static = self.default in (Precision.INT8, Precision.INT16X8)
        asked: dict[tuple, str | None] = {}

        def refusal(op, want: Precision) -> str | None:
            key = (op.name, op.version, want)
            if key not in asked:
                asked[key] = _refusal(self.ctx.profile, self.make_plan, op.index, want)
            why = asked[key]
            return re.sub(r"op \d+ \(", f"op {op.index} (", why) if why else None

        refused = []
        for e in self.make_plan({}).entries:
            if e.subgraph != 0:
                continue
            op = self.by_index[e.index]
            if self.phase == INT4_PHASE:
                if e.precision not in INT4_PRECISIONS:
                    continue
                want = INT4_FALLBACK[e.precision]
                self.int4_of[e.index] = e.precision
            elif RECIPE_PRECISION.get(e.precision) != self.default:
                continue
            else:
                want = Precision.HYBRID if static and op.has_weights else Precision.FLOAT
            why = refusal(op, want)
            if want is Precision.HYBRID and not refusal(op, Precision.FLOAT):
                if why:
                    want, why = Precision.FLOAT, None
                elif self.phase == EIGHT_BIT_PHASE:
                    self.float_too.add(e.index)
            if why:
                refused.append(f"#{e.index} {e.op}: {why}")
            else:
                self.move_to[e.index] = want
        self.report["candidates"] = self.report.get("candidates", 0) + len(self.move_to)
        self.report["refused"] = (self.report.get("refused", []) + refused)[:REFUSALS_LISTED]
        self.report["refused_count"] = self.report.get("refused_count", 0) + len(refused)

    def _moves(self) -> list[Move]:
        ctx = self.ctx
        samples = ctx.analysis_samples()
        if self.phase == INT4_PHASE:
            candidates = {i: self.int4_of[i] for i in self.move_to}
            self._analysis(f"int4 weight error of {len(candidates)} ops on {len(samples)} calibration samples")
            prior = int4_moves(ctx.requantizer.float_model, self.ops, candidates, samples)
            return self._measured_int4(prior)
        if self.phase == EIGHT_BIT_PHASE and self.default in STATIC_PRECISIONS:
            from .layer_error import rounding_noise
            from .litert_quant import SYMMETRIC_INT8_OPS

            bits = 16 if self.default is Precision.INT16X8 else 8
            symmetric = {t.name for op in self.ops if bits == 16 or op.name in SYMMETRIC_INT8_OPS
                         for t in (*op.inputs, *op.outputs)}
            noise = rounding_noise(ctx.requantizer.float_model, samples, ctx.requantizer.ranges(), bits, symmetric)
            self._analysis(f"rounding noise of {len(noise)} tensors on {len(samples)} calibration samples")
            return static_moves(self.ops, set(self.move_to), noise)
        from .layer_error import layer_errors

        current = self.current or ctx.requantizer.quantize(per_op_from_plan(self.make_plan({})))
        errors = layer_errors(ctx.requantizer.float_model, current, ctx.float_info, samples)
        self._analysis(f"measured error of every op on {len(samples)} calibration samples")
        return measured_moves(errors, set(self.move_to))

    def _measured_int4(self, prior: list[Move]) -> list[Move]:
        """Each int4 layer (that fits under --max-size) at 8 bits alone, measured end to end on the
        judging samples; ordered by what it buys per byte (budget_moves.measured_int4_order)."""
        if self.ctx.max_bytes is not None:
            room = self.ctx.max_bytes - len(self.first_model)
            prior = [mv for mv in prior if self._extra(mv) <= room]
        if len(prior) < 2:
            return prior
        first = _margin(self.first_fid, self.target)

        def gain(mv: Move) -> float:
            overrides = {i: (self.move_to[i], "accuracy budget (measuring)") for i in mv.ops}
            model = self.ctx.requantizer.quantize(per_op_from_plan(self.make_plan(overrides)))
            try:
                fid = fidelity(self.ctx.requantizer.float_model, model, self.ctx.eval_samples, self.ctx.reference,
                               self.ctx.class_outputs)
            except ModelRunError:  # a plan LiteRT cannot run buys nothing (see _probe)
                return float("-inf")
            return _margin(fid, self.target) - first

        started = time.monotonic()
        with self.progress.task("Accuracy budget: each int4 layer at 8 bits alone", total=len(prior)) as advance:
            moves, self.measured = measured_int4_order(prior, gain, self._extra, advance=advance)
        self._analysis(f"{len(self.measured)} of {len(prior)} int4 layers at 8 bits alone, measured end to "
                       f"end on the judging samples ({time.monotonic() - started:.0f}s); ranked by what each buys "
                       "per byte added")
        return moves

    def _analysis(self, text: str) -> None:
        done = self.report.get("analysis")
        self.report["analysis"] = f"{done}; then {text}" if done else text

    def _probe(self, chosen: Sequence[Move], label: str) -> _Probe:
        """Quantize with these moves and measure end to end on the held-out samples."""
        ids = sorted({i for mv in chosen for i in mv.ops if i in self.move_to})
        if self._key(ids) in self.probes:
            return self.probes[self._key(ids)]
        if len(self.probes) >= self.ctx.max_probes:
            raise _OutOfProbes
        t0 = time.monotonic()
        overrides = {i: (self.move_to[i], f"accuracy budget ({label})") for i in ids}
        model = self.ctx.requantizer.quantize(per_op_from_plan(self.make_plan(overrides)))
        try:
            fid = fidelity(self.ctx.requantizer.float_model, model, self.ctx.eval_samples, self.ctx.reference,
                           self.ctx.class_outputs)
            failed = ""
        except ModelRunError as e:  # a plan LiteRT cannot run (an output it cannot read under XNNPACK):
            fid, failed = self.first_fid, str(e)  # counted as buying nothing, never chosen
        step = self._step(len(self.steps), label, ids, model, fid)
        step["seconds"] = round(time.monotonic() - t0, 2)
        if failed:
            step["met"], step["failed"] = False, failed
        if not self._fits(model):
            step["met"], step["over_max_size"] = False, True
        self.steps.append(step)
        self._advance(1)
        probe = self.probes[self._key(ids)] = _Probe(tuple(chosen), model, fid, step["met"], step,
                                                     {i: self.move_to[i] for i in ids})
        return probe

    def _key(self, ids) -> tuple:
        """A probe's identity: its phase and each op moved with where to (a matmul hybrid, then float)."""
        return self.phase, tuple((i, self.move_to[i]) for i in sorted(ids))

    def _fits(self, model: bytes) -> bool:
        return self.ctx.max_bytes is None or len(model) <= self.ctx.max_bytes

    def _fitting(self, moves: list[Move], fixed: list[Move]) -> list[Move]:
        """Under --max-size: the moves (in order) whose added weight bytes fit in what the size leaves
        after the first result and the `fixed` moves; all of them without a size."""
        if self.ctx.max_bytes is None:
            return moves
        room = self.ctx.max_bytes - len(self.first_model) - sum(self._extra(mv) for mv in fixed)
        return spend_room([(mv, self._extra(mv)) for mv in moves], room)

    def _extra(self, mv: Move) -> int:
        """Bytes the move adds to the file: its ops' weights at the precision moved to, less as they were."""
        total = 0.0
        for i in mv.ops:
            if i in self.move_to:
                before = self.int4_of.get(i, self.default) if self.phase == INT4_PHASE else self.default
                total += weight_bytes_added(self.by_index[i], self.move_to[i], before)
        return max(0, math.ceil(total))

    def _search(self, moves: list[Move]) -> _Probe | None:
        """Every move of a tier at once; if that meets the target, the shortest prefix that does
        (binary search, most noise or damage first); if not, the whole tier stays and the next one is tried.
        Under static activations a last tier takes the matmul moves float where hybrid missed and the
        target runs float (a CPU does): EfficientNet-B0 for rpi4 stopped at cosine 0.9828 with every
        matmul hybrid, for 0.99 asked, where float meets it."""
        found = self._tiers(moves)
        hybrid = {i for mv in moves if mv.tier == 2 for i in mv.ops if i in self.float_too}
        if found is not None or not hybrid:
            return found
        for i in hybrid:
            self.move_to[i] = Precision.FLOAT
        return self._tiers(moves, "float ")

    def _tiers(self, moves: list[Move], to: str = "") -> _Probe | None:
        fixed: list[Move] = []
        for n in (1, 2):
            tier = self._fitting([mv for mv in moves if mv.tier == n], fixed)
            if not tier:
                continue
            if self.phase == INT4_PHASE:
                what, whats = "int4 layer to 8 bits", "int4 layers to 8 bits:"
            else:
                what = "weight-less region" if n == 1 else f"{to}matmul move"
                whats = what + "s"
            plus = "every region + " if fixed else ""
            found = self._probe(fixed + tier, f"{plus}every {what} ({len(tier)})")
            if not found.met:
                fixed += tier
                continue
            lo, hi = 0, len(tier)  # fixed + tier[:lo] misses, fixed + tier[:hi] meets
            while hi - lo > 1:
                mid = (lo + hi) // 2
                p = self._probe(fixed + tier[:mid], f"{plus}{whats} 1-{mid} of {len(tier)}")
                if p.met:
                    hi, found = mid, p
                else:
                    lo = mid
            return found
        return None

    def _prune(self, chosen: _Probe, moves: list[Move]) -> _Probe:
        """A tier kept whole (it alone could not meet the target) may hold regions whose tensors barely
        round: try without them once."""
        searched = max(mv.tier for mv in chosen.moves)
        weak = [mv for mv in chosen.moves if mv.tier < searched
                and mv.noise < PRUNE_SHARE * max(m.noise for m in moves if m.tier == mv.tier)]
        if not weak:
            return chosen
        p = self._probe([mv for mv in chosen.moves if mv not in weak],
                        f"without {len(weak)} region(s) under {PRUNE_SHARE:.0%} of the largest noise")
        return p if p.met else chosen

    def _fail(self) -> None:
        self.report["met"] = False
        fitting = [p for p in self.probes.values() if self._fits(p.model)]
        best = max(fitting, key=lambda p: _margin(p.fid, self.target), default=None)
        moved = f"{len(best.step['moved'])} op(s) moved" if best else "no op that could move"
        no_better = (best is not None and self._fits(self.first_model)
                     and _margin(self.first_fid, self.target) >= _margin(best.fid, self.target))
        if no_better:
            # Moving ops read no better than the model as converted (the level's weights and biases
            # were fitted to int8 inputs): say what was reached, not the best of the other plans.
            best, moved = None, f"no op moved (the {len(fitting)} plan(s) that moved ops read no better)"
        fid = best.fid if best else self.first_fid
        n = self.report["refused_count"]
        refused = f"; {n} op(s) the device cannot move" if n else ""
        reached = f"best {self.target.reached(fid)} with {moved}{refused}"
        if self.ctx.max_bytes is not None:
            size = len(best.model if best else self.first_model)
            if best is None and not no_better:
                left = human_size(max(0, self.ctx.max_bytes - size))
                reached = f"{self.target.reached(fid)}, and no move fits in the {left} left{refused}"
            raise _MissedWithinSize(
                f"{'fidelity floor' if self.target.floor else 'accuracy budget'} not met within --max-size "
                f"{human_size(self.ctx.max_bytes)}, nothing written: {reached} at {human_size(size)} "
                f"({self.report['probes']} probes)",
                f"--max-drop {drop}" if (drop := _suggest_drop(fid, self.target)) else "--no-floor (it does not follow float)")
        silence = self.target.silence(fid)
        if self.target.floor:
            drop = _suggest_drop(fid, self.target)
            accept = f"accept less with --max-drop {drop}, " if drop else ""
            raise QuantizationError(
                f"fidelity floor not met, nothing written: {reached} ({self.report['probes']} probes, "
                f"{self.report['seconds']:.0f}s); {silence + '; or ' if silence else ''}{accept}"
                f"try {_wider_scheme(self.ctx.scheme, self.ctx.profile)}another --device profile, or turn the floor "
                "off with --no-floor")
        wider = _wider_scheme(self.ctx.scheme, self.ctx.profile, budget=True)  # "--scheme X or " or ""
        raise QuantizationError(f"accuracy budget not met: {reached}; {silence + '; or ' if silence else ''}"
                                f"raise --max-drop, {'try ' + wider if wider else ''}improve calibration data")

    def _kept(self, chosen: _Probe) -> list[Move]:
        return [mv for mv in chosen.moves if any(i in self.move_to for i in mv.ops)]

    def _move_lines(self, moves: Sequence[Move]) -> list[dict]:
        measured = self.phase == INT4_PHASE
        return [{"what": mv.describe(self.names), "tier": mv.tier, "phase": self.phase,
                 "noise": round(mv.noise if measured else math.sqrt(mv.noise), 4),
                 **({"gain": round(mv.noise, 5), "noise": None} if mv.ops in self.measured else {}),
                 "ops": [f"#{i} {self.names[i]} -> {self.move_to[i]}" for i in mv.ops if i in self.move_to]}
                for mv in moves if any(i in self.move_to for i in mv.ops)]

    def _result(self, chosen: _Probe) -> BudgetResult:
        self.move_to.update(chosen.to)  # a probe of the hybrid tier chosen after the float tier began
        kept = self._kept(chosen)
        overrides: dict[int, tuple[Precision, str]] = dict(self.base)  # this phase's moves win
        ours: set[int] = set()
        for mv in kept:  # an op in several moves: the reason of the first (most noise)
            for i in mv.ops:
                if i in self.move_to and i not in ours:
                    ours.add(i)
                    overrides[i] = (self.move_to[i], "accuracy budget: " + _why(mv, self.phase,
                                                                                  mv.ops in self.measured))
        self.base = {}
        final_plan = self.make_plan(overrides)
        self.report.update(met=True, final_drop=self._charted(chosen.fid).drop(chosen.fid),
                           chosen_step=chosen.step["step"])
        self.report["moves"] = self.base_moves + self._move_lines(kept)
        self.report["moved"] = {"ops": len(overrides), "float": 0, "hybrid": 0,
                                **Counter(str(p) for p, _ in overrides.values())}
        return BudgetResult(chosen.model, final_plan, chosen.fid, self.report, per_op_from_plan(final_plan))

    def _charted(self, fid: Fidelity) -> Requirement:
        """The requirement a step's value and drop show: of those on the report's metric and bound
        (its max_drop), the one furthest from it in this plan (O-Net's steps read value 1.0 from the output worst as
        converted while its bbox output missed)."""
        same = [r for r in self.target.requirements
                if r.metric is self.primary.metric and r.bound == self.primary.bound]  # the same max_drop
        return min(same, key=lambda r: r.margin(fid))

    def _step(self, n: int, label: str, ops: Sequence[int], model: bytes, fid: Fidelity) -> dict:
        moved = {**{i: p for i, (p, _) in self.base.items()}, **{i: self.move_to[i] for i in ops}}
        counts = Counter(str(p) for p in moved.values())
        return {"step": n, "probe": label, "moved": [f"#{i} {self.names[i]} -> {p}" for i, p in moved.items()],
                "float": counts.get("float", 0), "hybrid": counts.get("hybrid", 0), **counts,
                "output": (r := self._charted(fid)).output, "value": r.value(fid), "drop": r.drop(fid),
                "met": self.target.met(fid),
                "bytes": len(model), "values": {r.output: r.value(fid) for r in self.target.requirements}}


class _MissedWithinSize(QuantizationError):
    """The target missed within --max-size; run_budget completes the message once it knows whether
    (and at what size) the loop meets the target without the size."""

    def __init__(self, what: str, accept: str):
        super().__init__(what)
        self.what, self.accept = what, accept

    def message(self, size: int | None) -> str:
        if size is None:
            return f"{self.what}; the loop does not meet it at any size either: accept less with {self.accept}"
        return (f"{self.what}; it is met at {human_size(size)} (the loop without the size): raise --max-size, "
                f"or accept less with {self.accept}")


class _OutOfProbes(Exception):
    pass


def _wider_scheme(scheme: Scheme, profile=None, budget: bool = False) -> str:
    """The next scheme up to suggest after a miss ("--scheme X or "): not the one that just missed
    (pose_landmark_full under --scheme dynamic was told to try --scheme dynamic), nothing an accelerator
    without a CPU fallback cannot run, and saying where it runs and what it does not go with: "try
    --scheme fp16" after a --max-drop miss, which --max-drop itself refuses; "--scheme dynamic" for the
    Edge TPU, which runs none of it."""
    wider = {Scheme.DYNAMIC: Scheme.FP16, Scheme.FP16: None}.get(scheme, Scheme.DYNAMIC)
    if wider is None:
        return ""
    accel = getattr(profile, "accelerator", None)
    where = ""
    if accel is not None and wider.precision not in accel.precisions:
        if str(accel.fallback) == "none":
            return ""
        where = f" (on the CPU: the {accel.name} runs no {wider.precision})"
    alone = " without --max-drop" if budget and wider is Scheme.FP16 else ""
    return f"--scheme {wider.value}{alone}{where} or "


def _drop_bound(r: Requirement) -> float:
    return r.bound if r.metric is Metric.REL_L2 else 1.0 - r.bound


def _margin(fid: Fidelity, target: Target) -> float:
    return min(r.margin(fid) for r in target.requirements)


def _why(mv: Move, phase: str, measured: bool = False) -> str:
    if phase == INT4_PHASE and measured:
        return (f"at 8 bits alone it brought the result {mv.noise:.4f} closer to the target (measured; most per "
                "byte first)")
    if phase == INT4_PHASE:
        return f"its int4 weights add error {mv.noise:.3f} to its output (relative, per channel; most first)"
    what = "a weight-less region" if mv.tier == 1 else "a matmul with its neighbours"
    return f"{what} whose int8 rounding adds noise {math.sqrt(mv.noise):.3f}"


def _suggest_drop(fid: Fidelity, target: Target) -> str | None:
    """A --max-drop (on the worst requirement's metric) that the best plan found would meet; None
    where that would accept an output that no longer follows float (a cosine at or below 0)."""
    r = target.worst(fid)
    d = r.drop(fid)
    if d != d:
        return "0.1"
    if r.metric == "cosine" and r.value(fid) <= 0:
        return None
    return f"{math.ceil(d * 100 + 1e-9) / 100:g} --metric {r.metric}"


def _refusal(profile, make_plan, index: int, target: Precision) -> str | None:
    """Why the profile cannot run op `index` at `target` (None: it can)."""
    if profile is None:
        return None
    try:
        make_plan({index: (target, "accuracy budget")})
    except ProfileError as e:
        return str(e)
    return None
