"""Per-op precision plan for one target, decided from its device profile (pure; no TensorFlow).

Two parts: the profile policy (which scheme and I/O dtype a profile asks for: `default_scheme`,
`profile_scheme`, `profile_io`, `integer_only`) and the per-op plan (`plan_precision`), which the
produced file is checked against (`Plan.mismatches`).

Input: the ops of the FLOAT model (edgeq.tflite_model.read_ops). For each op, in order:
  1. no float tensors (shape/index math)            -> "other": nothing to quantize
  2. an override (the accuracy-budget loop)         -> its precision, refused if the target cannot
                                                       run it where it runs the rest of the model
  3. the profile's [ops] policy                     -> int8 / int16x8 / float / fp16 / int4...; "hybrid"
                                                       only if the op has a constant weight, else float;
                                                       an int4 precision only where the quantizer writes
                                                       it for the op, the weight fits its block size and
                                                       the runtime's [int4] table runs it, else the
                                                       8-bit fallback (precision.INT4_FALLBACK)
  4. the accelerator does not take the op           -> falls back to the CPU at the accelerator's
                                                       fallback_precision (the graph splits there)
  5. otherwise                                      -> the profile's scheme
Each entry also records where the op runs ("accelerator" or "cpu") so the cost of a split is visible.
Without a profile (profile None) steps 3 and 4 do not apply and every op runs on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from .errors import ProfileError, QuantizationError
from .precision import (FLOAT_ACTIVATION_PRECISIONS, INT4_BLOCK_SIZE, INT4_FALLBACK, INT4_PRECISIONS,
                        POLICY_PRECISIONS, RECIPE_PRECISION, SCHEME_IO, IoType, Precision, Scheme, scheme_for,
                        slower_than_float_on_cpu)
from .profiles import DeviceProfile, Fallback
from .tflite_model import BOUNDARY_OPS, ModelInfo, OpInfo
from .tflite_ops import (INT4_MIN_WEIGHT_ELEMENTS, MIN_WEIGHT_ELEMENTS, has_float_tensors, quantizer_int4_ops,
                         weight_tensor)


# --------------------------------------------------------------------------------------------
# Profile policy: the scheme and I/O dtype a conversion uses when the user does not say.


def default_scheme(profile: DeviceProfile | None, fmt: str) -> Scheme:
    """The profile's scheme; without a profile int8, or dynamic for a Hugging Face source (`fmt` "hf")."""
    if profile is not None:
        return profile_scheme(profile)
    # Transformer encoders lose badly in plain full int8; dynamic-range keeps cosine 0.999 at ~3x.
    return Scheme.DYNAMIC if fmt == "hf" else Scheme.INT8


def profile_scheme(profile: DeviceProfile) -> Scheme:
    """The Scheme a profile's `scheme` names; QuantizationError when it is no scheme (e.g. float)."""
    scheme = scheme_for(profile.scheme)
    if scheme is None:
        raise QuantizationError(f"{profile.id}: scheme {profile.scheme} is not a quantization scheme; pass --scheme")
    return scheme


def profile_io(profile: DeviceProfile, scheme: Scheme) -> IoType:
    """The profile's input dtype where the scheme can produce it (full-integer only), else float32."""
    want = profile.io.input
    return want if want in SCHEME_IO[scheme] else IoType.FLOAT32


def integer_only(profile: DeviceProfile | None, scheme: Scheme) -> bool:
    """Will every op be int8? Full int8 without a profile, or a profile whose accelerator and
    fallback take int8 only (Edge TPU). CPU/GPU profiles keep some ops float or hybrid."""
    if scheme is not Scheme.INT8:
        return False
    if profile is None:
        return True
    accel = profile.accelerator
    return (accel is not None and set(accel.precisions) == {Precision.INT8}
            and accel.fallback_precision is Precision.INT8)


def int8_accelerator(profile: DeviceProfile | None) -> bool:
    """A profile whose accelerator hands what it does not map to int8 CPU kernels or nothing
    (NNAPI, QNN HTP, Edge TPU): a float op there leaves the accelerator. On XNNPACK CPUs a float op
    between int8 ones costs little (its QUANTIZE/DEQUANTIZE run in the same delegated graph)."""
    accel = profile.accelerator if profile is not None else None
    return accel is not None and accel.fallback_precision is Precision.INT8


# --------------------------------------------------------------------------------------------
# The per-op plan


@dataclass(frozen=True)
class Override:
    """A precision forced for one op (by the accuracy-budget loop or the user) and why."""
    precision: Precision
    reason: str


@dataclass(frozen=True)
class PlanEntry:
    index: int  # op index within its subgraph
    subgraph: int
    op: str
    output: str  # name of the op's first output tensor (stable across conversions)
    precision: Precision
    reason: str
    source: str
    placement: str  # "accelerator" | "cpu"

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "subgraph": self.subgraph, "op": self.op, "output": self.output,
                "precision": str(self.precision), "placement": self.placement,
                "reason": self.reason, "source": self.source}


@dataclass(frozen=True)
class Plan:
    device: str | None  # None: no device profile (e.g. an accuracy-budget plan without --device)
    scheme: Precision
    accelerator: str | None
    entries: tuple[PlanEntry, ...]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in self.entries:
            out[str(e.precision)] = out.get(str(e.precision), 0) + 1
        return out

    @property
    def is_uniform(self) -> bool:
        """All ops int8 (ops with nothing to quantize ignored): a plain full-integer conversion."""
        return all(e.precision in (Precision.INT8, Precision.OTHER) for e in self.entries)

    def ops_at(self, *precisions: Precision) -> list[PlanEntry]:
        return [e for e in self.entries if e.precision in precisions]

    @property
    def cpu_ops(self) -> list[PlanEntry]:
        """Ops planned off the accelerator (empty for CPU targets)."""
        return [e for e in self.entries if e.placement == "cpu"] if self.accelerator else []

    def summary(self) -> str:
        """One line, e.g. '5 ops: 3 int8, 1 float, 1 other; 1 on the CPU (graph splits)'."""
        order = [str(p) for p in Precision]
        counts = self.counts()
        parts = ", ".join(f"{counts[p]} {p}" for p in order if p in counts)
        line = f"{len(self.entries)} ops: {parts}" if parts else "0 ops"
        if self.accelerator and self.cpu_ops:
            line += f"; {len(self.cpu_ops)} on the CPU instead of the {self.accelerator} (graph splits)"
        return line

    def warnings(self) -> list[str]:
        """One line per precision planned on a CPU that computes it slower than float (int4-weight-only)."""
        out = []
        for p in sorted({e.precision for e in self.entries if e.placement == "cpu"}, key=list(Precision).index):
            why = slower_than_float_on_cpu(p)
            if why:
                n = sum(e.precision is p and e.placement == "cpu" for e in self.entries)
                out.append(f"{n} op(s) planned {p} on the CPU: {why}")
        return out

    def to_json(self) -> dict[str, Any]:
        return {"device": self.device, "scheme": str(self.scheme), "accelerator": self.accelerator,
                "uniform": self.is_uniform, "counts": self.counts(), "summary": self.summary(),
                "warnings": self.warnings(), "ops": [e.to_json() for e in self.entries]}

    def planned_off_int8(self, op: OpInfo) -> bool:
        """Did the plan put this op of the produced model (found by its first output) at a precision
        with float activations (float, hybrid, dynamic or weight-only int4) by choice (the profile's,
        the user's, the budget loop's; not because the quantizer has no int8 recipe for it)?"""
        out = op.outputs[0].name if op.outputs else ""
        return any(e.output == out and RECIPE_PRECISION.get(e.precision) in FLOAT_ACTIVATION_PRECISIONS
                   and e.source != QUANTIZER_POLICY for e in self.entries)

    def mismatches(self, info: ModelInfo, excused: frozenset[str] = frozenset()) -> list[str]:
        """Planned ops whose precision in the produced model (found by output tensor name) differs,
        numbered as in the produced model (as the "stayed float" warning next to it is). Hybrid on an
        op without weights is float (litert_quant.effective_precision): --scheme dynamic plans every
        op hybrid, and its REDUCE_MIN, SUB, ... are float by design, not a disagreement. `excused`:
        output names kept float on purpose whatever the plan said (int8_hazards.py; warned apart)."""
        from .litert_quant import effective_precision

        by_output = {op.outputs[0].name: op for op in info.ops if op.outputs}
        bad = []
        for e in self.entries:
            want = RECIPE_PRECISION.get(e.precision)  # None: "other", nothing was planned
            op = by_output.get(e.output)
            if op is None or op.precision is Precision.OTHER or want is None or e.output in excused:
                continue
            want = effective_precision(want, e.op)
            if op.precision != want:
                bad.append(f"#{op.index} {e.op} planned {want}, file has {op.precision}")
        return bad


def grouped_entries(ops: list[dict], keys: tuple[str, ...]) -> list[tuple[tuple, list[dict]]]:
    """Plan entries (Plan.to_json()["ops"]) grouped by their values of `keys`, groups in the order of
    their first op: an int4 MiniLM plan keeps 265 weightless ops float for one reason each kind (40
    RESHAPEs...), and MiniLM int8 has 1272 ops: one line per op hides the few lines that matter."""
    groups: dict[tuple, list[dict]] = {}
    for e in ops:
        groups.setdefault(tuple(e.get(k) or "" for k in keys), []).append(e)

    def first(entries: list[dict]) -> tuple:  # a report may read a manifest it did not write: no index, last
        i = entries[0].get("index")
        return (0, i) if isinstance(i, int) else (1, 0)

    return sorted(groups.items(), key=lambda kv: first(kv[1]))


def index_list(ix: list[int]) -> str:
    """Op indices for one line: all of up to three, else the first two and how many."""
    return ", ".join(map(str, ix)) if len(ix) <= 3 else f"{ix[0]}, {ix[1]}, ... ({len(ix)} ops)"


def plan_precision(ops, profile: DeviceProfile | None,
                   overrides: Mapping[int | tuple[int, int], Override | tuple[str, str]] | None = None,
                   *, scheme: Scheme | Precision | None = None, allow_cpu_fallback: bool = False,
                   min_weight_elements: int = MIN_WEIGHT_ELEMENTS, litert: bool = False) -> Plan:
    """Plan each op's precision for `profile`, or for no device (profile None: `scheme` for every
    op but the overridden ones, all on the CPU; a Precision such as int4-b32 may stand for the
    scheme, since int4 has no convert --scheme yet).

    `ops`: OpInfo list read from the float model. `overrides`: op index (subgraph 0) or
    (subgraph, index) -> Override(precision, reason). An override the target cannot run where it
    runs the scheme (e.g. float on the Edge TPU) raises ProfileError naming the cost, unless
    `allow_cpu_fallback` accepts that the op moves to the CPU. `min_weight_elements`: smallest
    weight the quantizer stores as int8 (TFLiteConverter: 1024; pass the quantizer's own value).
    `litert`: the LiteRT quantizer writes the plan, so an op it has no int8 recipe for is planned
    float, with that reason (it writes the op float between QUANTIZE/DEQUANTIZE whatever was asked).
    """
    norm = _normalize_overrides(overrides or {}, ops)
    if profile is None:
        if scheme is None:
            raise ValueError("plan_precision without a profile needs the scheme")
        default = scheme.precision if isinstance(scheme, Scheme) else Precision(scheme)
        return _plan_without_device(ops, default, norm, min_weight_elements)
    # The user's --scheme, when given, replaces the profile's for the ops its [ops] table leaves open.
    default = profile.scheme
    default_why = f"default scheme of {profile.id}"
    if scheme is not None:
        chosen = scheme.precision if isinstance(scheme, Scheme) else Precision(scheme)
        if chosen is not profile.scheme:
            default, default_why = chosen, f"--scheme {chosen} (the profile of {profile.id} has {profile.scheme})"
    accel = profile.accelerator
    entries = []
    cut = False  # single-segment accelerators (Edge TPU): everything after the first CPU op stays on the CPU
    for op in ops:
        key = (op.subgraph, op.index)
        output = op.outputs[0].name if op.outputs else ""
        refused = accel.refuses(op.name, op.version) if accel else None
        fallback_path = False

        if _nothing_to_quantize(op):
            prec, reason, source = Precision.OTHER, _NOTHING_TO_QUANTIZE, "edgeq"
        elif key in norm:
            ov = norm[key]
            _check_override(profile, op, ov.precision, refused, allow_cpu_fallback)
            prec, reason = _weights_or_float(op, ov.precision, ov.reason, min_weight_elements, profile)
            source = "override"
        elif op.name in profile.ops:
            pol = profile.ops[op.name]
            prec, reason = _weights_or_float(op, pol.precision, pol.reason, min_weight_elements, profile)
            source = pol.source
        elif refused:
            prec, fallback_path = accel.fallback_precision, True
            reason = f"{refused}: runs {prec} on the CPU (the graph splits here)"
            source = accel.source
        else:
            prec, reason = _int4_or_fallback(op, default, default_why, min_weight_elements, profile)
            source = str(profile.path)
        if litert and source != "override" and (why := _no_int8_recipe(op, prec)):
            prec, reason, source = Precision.FLOAT, f"{reason}; {why}, so float", QUANTIZER_POLICY

        # the runtime's kernel at the version the quantizer writes (runtime table [kernels])
        if prec is not Precision.OTHER and (wrong := profile.kernel_refuses(op.name, prec)) \
                and prec not in INT4_PRECISIONS:  # (int4 is checked with its 8-bit fallback above)
            if source == "override":  # the budget loop asks: a refusal sends it to float
                raise ProfileError(f"{profile.id} cannot run op {op.index} ({op.name}) as {prec}: {wrong}")
            prec, reason = Precision.FLOAT, f"{reason}; {wrong}, so float"
        placement = "cpu"
        if accel is not None:
            if prec is Precision.OTHER:
                placement = "cpu" if (refused or cut) else "accelerator"
            elif refused:
                if not fallback_path:
                    reason += f"; {refused}, so it runs on the CPU (the graph splits here)"
            elif prec not in accel.precisions:
                reason += f"; {accel.name} does not run {prec}, so it runs on the CPU (the graph splits here)"
            elif cut:
                reason += (f"; on the CPU: the {accel.name} compiler maps only the ops before the first one it "
                           "cannot take")
            else:
                placement = "accelerator"
            if accel.single_segment and op.subgraph == 0 and placement == "cpu" and prec is not Precision.OTHER:
                cut = True
        slow = slower_than_float_on_cpu(prec) if placement == "cpu" else None
        if slow:
            reason += f"; WARNING: {slow}"
        entries.append(PlanEntry(op.index, op.subgraph, op.name, output, prec, reason, source, placement))
    return Plan(profile.id, default, accel.name if accel else None, tuple(entries))


_NOTHING_TO_QUANTIZE = "no float tensors: nothing to quantize"
# The source of a plan entry the LiteRT quantizer decides (no int8 recipe), not the profile or the user.
QUANTIZER_POLICY = "LiteRT quantizer default policy (static_wi8_ai8)"


def _no_int8_recipe(op, prec: Precision) -> str | None:
    """Why the LiteRT quantizer writes this op float where int8 was planned (None: it does not).
    MediaPipe's face mesh: 23 PRELU planned int8 for rpi4, written float, and a warning that the
    file disagrees with the plan. Ops int8_islands folds into int8 afterwards are not among them."""
    from .int8_islands import FOLDABLE
    from .litert_quant import quantizer_int8_ops

    if prec is not Precision.INT8 or op.is_custom or op.name in FOLDABLE or op.name in quantizer_int8_ops():
        return None
    return f"the LiteRT quantizer has no int8 recipe for {op.name}"


def _nothing_to_quantize(op) -> bool:
    return not has_float_tensors(op) or op.name in BOUNDARY_OPS


def _plan_without_device(ops, precision: Precision, norm: dict[tuple[int, int], Override],
                         min_weight_elements: int) -> Plan:
    entries = []
    for op in ops:
        if _nothing_to_quantize(op):
            prec, reason, source = Precision.OTHER, _NOTHING_TO_QUANTIZE, "edgeq"
        elif (op.subgraph, op.index) in norm:
            ov = norm[(op.subgraph, op.index)]
            prec, reason = _weights_or_float(op, ov.precision, ov.reason, min_weight_elements)
            source = "override"
        else:
            prec, reason = _int4_or_fallback(op, precision, "scheme default", min_weight_elements)
            source = "edgeq"
        slow = slower_than_float_on_cpu(prec)
        if slow:
            reason += f"; WARNING: {slow}"
        entries.append(PlanEntry(op.index, op.subgraph, op.name, op.outputs[0].name if op.outputs else "",
                                 prec, reason, source, "cpu"))
    return Plan(None, precision, None, tuple(entries))


def _weights_or_float(op, precision: Precision, reason: str, min_elements: int,
                      profile: DeviceProfile | None = None) -> tuple[Precision, str]:
    """'hybrid' needs a constant weight big enough for the converter to quantize; else float.
    An int4 precision also needs the quantizer to write it for this op, a weight whose last
    dimension the block size divides, and (with a profile) the runtime's int4 kernel for it; else
    the 8-bit fallback (INT4_FALLBACK), itself checked the same way."""
    if precision in INT4_PRECISIONS:
        why = _int4_refusal(op, precision, min_elements, profile)
        if why is None:
            return precision, reason
        fallback = INT4_FALLBACK[precision]
        return _weights_or_float(op, fallback, f"{reason}; {why}, so {fallback}", min_elements, profile)
    if precision is not Precision.HYBRID:
        return precision, reason
    w = weight_tensor(op)
    if w is None:
        return Precision.FLOAT, f"{reason}; no constant weight to store as int8, so float instead of hybrid"
    n = 1
    for d in w.shape:
        n *= max(d, 1)
    if n < min_elements:
        return Precision.FLOAT, (f"{reason}; weight has {n} elements (< {min_elements}, the quantizer "
                                 "keeps it float), so float instead of hybrid")
    return Precision.HYBRID, reason


def _int4_or_fallback(op, precision: Precision, reason: str, min_elements: int,
                      profile: DeviceProfile | None = None) -> tuple[Precision, str]:
    """A scheme default: int4 precisions are checked op by op (_weights_or_float); the others apply
    as they are (a dynamic scheme's "hybrid" on an op without weights is the quantizer's business)."""
    if precision in INT4_PRECISIONS:
        return _weights_or_float(op, precision, reason, min_elements, profile)
    return precision, reason


def _int4_refusal(op, precision: Precision, min_elements: int, profile: DeviceProfile | None) -> str | None:
    """Why this op cannot be `precision` (an int4 one) in the produced file, or None."""
    if op.name not in quantizer_int4_ops(str(precision)):
        return f"the LiteRT quantizer writes no {precision} {op.name}"
    w = weight_tensor(op)
    if w is None:
        return "no constant weight to store as int4"
    n = 1
    for d in w.shape:
        n *= max(d, 1)
    least = max(min_elements, INT4_MIN_WEIGHT_ELEMENTS)
    if n < least:
        return f"weight has {n} elements (< {least}: int4 saves too little there)"
    block = INT4_BLOCK_SIZE[precision]
    if block and w.shape[-1] % block:
        return f"weight's last dimension {w.shape[-1]} is not a multiple of the block size {block}"
    return profile.int4_refuses(op.name, precision) if profile is not None else None


def _check_override(profile: DeviceProfile, op, precision: Precision, refused: str | None,
                    allow_cpu_fallback: bool) -> None:
    accel = profile.accelerator
    if accel is None or refused or precision in accel.precisions:
        return  # the CPU runs every precision; a refused op is on the CPU anyway
    what = f"{profile.id}: op {op.index} ({op.name}) cannot run {precision} on the {accel.name} " \
           f"(it runs {', '.join(accel.precisions)})"
    if accel.fallback is Fallback.NONE:
        raise ProfileError(f"{what} and there is no CPU fallback; keep it {profile.scheme}")
    if not allow_cpu_fallback:
        raise ProfileError(f"{what}; {precision} would move it to the CPU and split the graph "
                           f"(a CPU<->{accel.name} transfer each inference); keep it {profile.scheme} "
                           "or allow CPU fallback")


def _normalize_overrides(overrides, ops) -> dict[tuple[int, int], Override]:
    known = {(op.subgraph, op.index) for op in ops}
    out = {}
    for key, value in overrides.items():
        k = (0, key) if isinstance(key, int) else tuple(key)
        if k not in known:
            raise ProfileError(f"override for op {key}: no such op in the model (subgraph {k[0]}, index {k[1]}); "
                               "use the op index from the plan")
        if not isinstance(value, Override):
            precision, reason = value
            try:
                value = Override(Precision(precision), reason)
            except ValueError:
                raise ProfileError(f"override for op {key}: unknown precision {precision!r}; use "
                                   f"{_PRECISION_CHOICES}") from None
        if value.precision not in POLICY_PRECISIONS:
            raise ProfileError(f"override for op {key}: '{value.precision}' is not a precision; use "
                               f"{_PRECISION_CHOICES}")
        out[k] = value
    return out


_PRECISION_CHOICES = ", ".join(POLICY_PRECISIONS[:-1]) + " or " + POLICY_PRECISIONS[-1]
