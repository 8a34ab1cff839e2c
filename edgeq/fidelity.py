"""Fidelity: run the float and the quantized model on the same held-out samples and compare.

Each output gets a kind (`OutputKind`), which decides whether top-1 agreement is measured and what
the default fidelity floor asks of it (budget.default_floor)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from enum import StrEnum
from typing import Collection, Sequence

import numpy as np

from .errors import CalibrationError, EdgeqError, QuantizationError, first_line
from .signature import signature_runner
from .quiet import quiet_native


class ModelRunError(QuantizationError):
    """LiteRT failed to invoke a model on a sample (a kernel's run-time check, e.g. int8 DIV by a
    divisor that rounds to zero): a one-line error, or a candidate a search drops."""


class OutputKind(StrEnum):
    CLASS_SCORES = "class_scores"  # probabilities, or declared (--class-output / --metric top1)
    MAYBE_CLASS_SCORES = "maybe_class_scores"  # a short score vector: top-1 shown, judged by cosine
    EMBEDDING = "embedding"  # named like a feature vector (embedding, pooled, hidden state)
    OTHER = "other"  # maps, boxes, landmarks, anything else

    @property
    def has_top1(self) -> bool:
        return self in (OutputKind.CLASS_SCORES, OutputKind.MAYBE_CLASS_SCORES)


# Up to "a few thousand" columns a score vector may be classes (ImageNet 1000/1001, 21k tags are not).
MAX_CLASSES = 4096
# Words in an output name that say it is not class scores.
NOT_CLASS_WORDS = ("embed", "hidden", "pool", "feature", "sentence", "vector", "descriptor", "landmark",
                   "keypoint", "coord", "box", "regress", "contour", "mesh", "iris", "crop", "depth", "mask",
                   "segment")
EMBEDDING_WORDS = ("embed", "hidden", "pool", "feature", "sentence", "vector", "descriptor")
# Outputs with fewer values per sample (flags, a few scores) are compared as one vector over all
# samples: a per-sample cosine of one number is only its sign (benchmarks/zoo.py does the same).
_MIN_COSINE_VALUES = 16
# Where a sample's float values share an offset of at least OFFSET_RATIO times their spread (median
# over samples), a plain cosine cannot tell a working output from a broken one: one stuck at that
# offset reads r / sqrt(1 + r^2), 0.949 at 3x, the default floor's 0.95. There the cosine is taken
# around float's per-sample mean. BirdNET's 6522 sigmoid logits (all near -15, 6.5x their spread)
# read 0.990 plain with top-1 agreement 5 %, 0.387 around the mean; the zoo's outputs sit at
# 0.02-1.45x, except the palm detectors' anchor logits (about 3x: 0.997 -> 0.950-0.965 on the zoo's
# held-out photos) and Objectron's box (3.3x: 0.998 -> 0.980), which still meet the floor.
OFFSET_RATIO = 3.0
# Short outputs (compared as one vector over all samples) whose values share an offset over the
# samples: SSR-Net's age (one value, 39 +- 5.5 years on photos), written at 0.56x float's by a broken
# draft of ranges.live_ranges, read cosine 0.9995 against the floor's 0.95: a cosine cannot see a
# scale error. There the
# cosine is capped at what the relative L2 error would give at the right scale, 1 - rel_l2^2 / 2
# (0.90 for the age's 0.44). Judging around float's mean instead, as for long outputs, also failed
# faithful models: a face flag at -8 +- 1.5 on photos without faces moved 73 ops of a face-landmark
# model to float to keep noise int8 adds to a value the data never moves.
# A float output this close to 0 everywhere has no direction: an int8 output of exact zeros there
# matches it (a wake-word score of 3e-8 on audio without the word), and cosine reads it as 1.
NEGLIGIBLE = 1e-6
# An output joined from parts whose float values differ in size this much (a detector's pixel boxes
# and 0..1 scores, float_joins.py) gets each part judged too: the larger part carries the whole
# output's cosine (NudeNet 320n: 0.9998 with every score lost).
PART_RATIO = 16.0
# An output whose float values are exactly 0 this often on the samples barely responds to them: a
# face descriptor on photos without faces (FaceRes: 1 of 1024 values non-zero, cosine 0.46) is
# judged on noise, and a refusal should say the data is the thing to change. (Exact zeros: a ReLU's;
# a confident softmax holds many values under 1e-6, and class scores are never called silent.)
SILENT_SHARE = 0.95


@dataclass(frozen=True)
class PartFidelity:
    axis: int
    start: int
    stop: int
    cosine: float
    rel_l2: float
    reference_max_abs: float

    def to_json(self) -> dict:
        return {"axis": self.axis, "start": self.start, "stop": self.stop, "cosine": self.cosine,
                "rel_l2": self.rel_l2, "reference_max_abs": self.reference_max_abs}


@dataclass(frozen=True)
class OutputFidelity:
    name: str
    cosine: float
    rel_l2: float
    max_abs: float
    top1_agreement: float | None  # only for (maybe) class scores
    kind: OutputKind = OutputKind.OTHER
    # the float values' shared offset (median per-sample mean) when `cosine` is taken around float's
    # mean (OFFSET_RATIO), and the plain cosine it replaces; None otherwise
    offset: float | None = None
    plain_cosine: float | None = None
    reference_max_abs: float | None = None  # the float output's largest |value| on these samples
    # An output joined from parts of very different size (PART_RATIO): each part's own fidelity
    parts: tuple[PartFidelity, ...] = ()
    reference_zero_share: float | None = None  # share of the float output's values that are exactly 0
    capped_by_rel_l2: bool = False  # a short output on an offset: `cosine` is 1 - rel_l2^2 / 2 (offset above)

    @property
    def silent(self) -> bool:
        """The samples barely make this output respond (SILENT_SHARE of its float values are 0)."""
        return (self.kind is not OutputKind.CLASS_SCORES and self.reference_zero_share is not None
                and self.reference_zero_share >= SILENT_SHARE)

    def silence(self) -> str:
        """Why this output's numbers say little, for a refusal or a note ("" when it responds)."""
        if not self.silent:
            return ""
        return (f"on these samples float's {self.name} is 0 in {self.reference_zero_share:.1%} of its values: "
                "the data barely makes it respond, so calibrate and judge on the inputs the model is made for "
                "(faces for a face model, a detector's positive examples)")

    def to_json(self) -> dict:
        d = {"name": self.name, "kind": str(self.kind), "cosine": self.cosine, "rel_l2": self.rel_l2,
             "max_abs": self.max_abs, "top1_agreement": self.top1_agreement}
        if self.capped_by_rel_l2:
            d.update(capped_by_rel_l2=True, offset=self.offset, plain_cosine=self.plain_cosine)
        elif self.offset is not None:
            d.update(cosine_around_mean=True, offset=self.offset, plain_cosine=self.plain_cosine)
        if self.parts:
            d["parts"] = [p.to_json() for p in self.parts]
        if self.silent:
            d["reference_zero_share"] = round(self.reference_zero_share, 4)
        return d

    @property
    def worst_part(self) -> PartFidelity | None:
        """The part with the lowest cosine, when it is below the whole output's."""
        worst = min(self.parts, key=lambda p: p.cosine, default=None)
        return worst if worst is not None and worst.cosine < self.cosine else None

    @property
    def worst_part_cosine(self) -> float:
        return self.worst_part.cosine if self.worst_part else self.cosine

    def notes(self) -> list[str]:
        """What a reader of the cosine must know: taken around an offset, or of an output that is 0."""
        out = []
        if self.capped_by_rel_l2:
            out.append(f"output {self.name}: its few values share an offset over the samples ({self.offset:.4g}, "
                       f"at least {OFFSET_RATIO:g}x their spread), where a cosine cannot see a scale error: it "
                       f"reads {self.cosine:.4f} from its relative L2 error {self.rel_l2:.4f} "
                       f"({self.plain_cosine:.4f} plain)")
        elif self.offset is not None:
            out.append(f"output {self.name}: its float values share an offset ({self.offset:.4g}, at least "
                       f"{OFFSET_RATIO:g}x their spread), so its cosine is taken around float's mean: "
                       f"{self.cosine:.4f} ({self.plain_cosine:.4f} plain, which an output stuck at the offset "
                       "would also reach)")
        if self.parts and self.worst_part_cosine < self.cosine - 0.02:
            each = ", ".join(f"[{p.start}:{p.stop}] {p.cosine:.4f} (float up to {p.reference_max_abs:.3g})"
                             for p in self.parts)
            out.append(f"output {self.name} joins parts of very different size on axis {self.parts[0].axis}; "
                       f"cosine per part: {each}. Its cosine {self.cosine:.4f} is the larger part's: judge the "
                       "small part before deploying (a detector's scores)")
        if self.reference_max_abs is not None and self.reference_max_abs <= NEGLIGIBLE:
            out.append(f"output {self.name} is 0 on every held-out sample (float's largest value "
                       f"{self.reference_max_abs:.1g}): fidelity cannot show how the int8 model treats it; "
                       "calibrate and judge on data where it responds (a detector's positive examples)")
        elif self.silent:
            out.append(f"output {self.name}: {self.silence()}")
        return out


@dataclass(frozen=True)
class Fidelity:
    samples: int
    outputs: tuple[OutputFidelity, ...]

    def worst(self, metric: str) -> float:
        """Worst value over outputs; for rel_l2 higher is worse, else lower is worse."""
        vals = [getattr(o, metric) for o in self.outputs if getattr(o, metric) is not None]
        if not vals:
            return float("nan")
        return max(vals) if metric == "rel_l2" else min(vals)

    def output(self, name: str) -> OutputFidelity:
        return next(o for o in self.outputs if o.name == name)

    def to_json(self) -> dict:
        return {"samples": self.samples, "outputs": [o.to_json() for o in self.outputs]}

    def notes(self) -> list[str]:
        return [line for o in self.outputs for line in o.notes()]


def run_model(model: bytes, samples: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Outputs (float, dequantized) for every sample, stacked on axis 0, keyed by signature output."""
    return run_signature(signature_runner(model), samples)


def run_signature(runner, samples: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """run_model on an already prepared signature runner (float data quantized for integer inputs)."""
    in_details = runner.get_input_details()
    out_details = runner.get_output_details()
    collected = {name: _Stack(len(samples)) for name in out_details}
    with quiet_native():  # the first invoke announces the XNNPACK delegate on stderr
        for i, s in enumerate(samples):
            feed = {}
            for name, d in in_details.items():
                x = np.asarray(s[name])
                feed[name] = quantize_input(x, d) if x.dtype.kind == "f" else x.astype(d["dtype"])
            try:
                outs = runner(**feed)
            except RuntimeError as e:  # a kernel refusing this input (int8_hazards.py), not a bug of the caller
                raise ModelRunError(f"LiteRT could not run the model on sample {i + 1}: {first_line(e)}"
                                    f"{_resized_first_axis(in_details, feed)}") from None
            except ValueError as e:  # "Tensor data is null": the signature runner under XNNPACK cannot read
                # an output another op also reads once a QUANTIZE writes it (a budget-loop probe of PyPI
                # akiki's voice detector, its GRU state): a traceback before
                raise ModelRunError(f"LiteRT could not run the model on sample {i + 1}: {first_line(e)} (an "
                                    "output another op also reads, under XNNPACK)") from None
            for name, d in out_details.items():
                collected[name].add(dequantize_output(np.asarray(outs[name]), d))
    return {k: v.result() for k, v in collected.items()}


def _resized_first_axis(details: dict, feed: dict) -> str:
    """A hint when a sample was fed as one item of a fixed first axis other than 1 (calibration's
    rule for a Keras batch_size): that axis may be the model's own (Silero VAD's 16 audio chunks),
    and the model only runs on samples of the input's whole shape."""
    for name, d in details.items():
        want = [int(v) for v in d.get("shape_signature", d["shape"])]
        got = np.shape(feed[name])
        if want and want[0] > 1 and got and got[0] != want[0]:
            return (f" (input {name!r} is {tuple(want)} and the samples were fed as {tuple(got)}; if its first "
                    f"axis is not a batch, give samples of its whole shape {tuple(want)})")
    return ""


class _Stack:
    """Outputs of n samples stacked on axis 0, written into one array as they come: a list and a
    concatenate held them twice (EfficientPose's heatmaps, 50 samples: 0.87 GB instead of 0.43).
    Outputs whose shape varies between samples are concatenated at the end."""

    def __init__(self, n: int):
        self.n, self.out, self.at, self.parts = n, None, 0, []

    def add(self, y: np.ndarray) -> None:
        if self.out is None and not self.parts and y.ndim:
            self.out = np.empty((self.n * y.shape[0],) + y.shape[1:], y.dtype)
        if self.out is not None and y.shape[1:] == self.out.shape[1:] and self.at + len(y) <= len(self.out):
            self.out[self.at:self.at + len(y)] = y
            self.at += len(y)
            return
        if self.out is not None:  # a shape the first sample did not have: back to a list
            self.parts, self.out = [self.out[:self.at]], None
        self.parts.append(y)

    def result(self) -> np.ndarray:
        if self.out is not None:
            return self.out[:self.at] if self.at < len(self.out) else self.out
        return np.concatenate(self.parts, axis=0) if self.parts else np.zeros(0)


def quantize_input(x: np.ndarray, d: dict) -> np.ndarray:
    dt = np.dtype(d["dtype"])
    scale, zp = d.get("quantization", (0.0, 0))
    if dt.kind in "iu" and scale:
        info = np.iinfo(dt)
        return np.clip(np.round(x / scale + zp), info.min, info.max).astype(dt)
    return x.astype(dt)


def dequantize_output(y: np.ndarray, d: dict) -> np.ndarray:
    scale, zp = d.get("quantization", (0.0, 0))
    if y.dtype.kind in "iu" and scale:
        return (y.astype(np.float32) - zp) * scale
    return y.astype(np.float32)


def compare(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray],
            class_outputs: Collection[str] = (), parts: dict | None = None, samples: int | None = None,
            not_class: Collection[str] = ()) -> Fidelity:
    """Per output: cosine, relative L2, max abs error, and top-1 agreement for (maybe) class scores.

    `class_outputs`: reference output names the user says are class scores (any per-sample vector).
    `parts`: {output name: ((axis, ((start, stop), ...)), ...)} of outputs joined from parts (join_parts).
    `samples`: how many samples the outputs come from, when that is not their rows (outputs without
    a batch axis are stacked on their first one: a Khmer CRNN's 20 lines gave 2540 time steps).
    `not_class`: outputs that are never class scores whatever their values (fed_back)."""
    outs = []
    n = 0
    # Output names can differ between converters (keras float vs int8); pair them by order.
    for (name, ref), cand in zip(reference.items(), candidate.values()):
        split = _parts(ref, cand, (parts or {}).get(name, ()))
        kind = output_kind(name, ref, name in class_outputs, name in not_class)
        ref, cand = ref.reshape(ref.shape[0], -1), cand.reshape(cand.shape[0], -1)
        n = ref.shape[0]
        # Ties go to the first index, as the deployed model's argmax resolves them (an int8 softmax
        # has 256 levels: its top two tie often). Counting ties as 1/k was measured: in the levels'
        # judge it cost MobileNetV2 8 photos over the benchmark's 4 splits (docs/accuracy.md). (On
        # the float32 values: the same order as in float64.)
        top1 = float((ref.argmax(axis=1) == cand.argmax(axis=1)).mean()) if kind.has_top1 and n else None
        m = _RowMetrics(ref, cand)
        cos, offset, plain, short = m.cosine, None, None, False
        if n and ref.shape[1] >= _MIN_COSINE_VALUES:
            # an output constant within a sample has no spread to judge around: plain cosine there
            flat = m.spread <= 1e-6 * np.abs(m.mean)  # float32 rounding of a constant
            ratio = np.where(flat, 0.0, np.abs(m.mean) / np.maximum(m.spread, 1e-30))
            if np.median(ratio) >= OFFSET_RATIO:
                offset, plain, cos = float(np.median(m.mean)), cos, m.centered_cosine
        elif n >= 2 and not kind.has_top1:  # short: each value's offset over the samples
            mean, spread = ref.mean(axis=0, dtype=np.float64), ref.std(axis=0, dtype=np.float64)
            ratio = np.where(spread <= 1e-6 * np.abs(mean), 0.0, np.abs(mean) / np.maximum(spread, 1e-30))
            capped = 1.0 - m.rel_l2 ** 2 / 2
            if np.median(ratio) >= OFFSET_RATIO and capped < cos - 1e-3:  # (noise-level differences: plain)
                offset, plain, cos, short = float(np.median(mean)), cos, capped, True
        outs.append(OutputFidelity(name, cos, m.rel_l2, m.max_abs if n else 0.0,
                                   top1, kind, offset, plain, m.ref_max_abs if n else None, split,
                                   m.zeros / ref.size if ref.size else None, short))
    return Fidelity(samples if samples is not None else n, tuple(outs))


# Values (float64) of one block of samples compared at once: EfficientPose's 50 heatmap outputs
# (2.2M values a sample) compared whole took ~3.5 GB of temporaries, a block of them 0.25 GB.
BLOCK_BYTES = 64 << 20


def row_blocks(n: int, per_row: int) -> list[slice]:
    """Slices of n rows of per_row values each, BLOCK_BYTES of float64 at most (one row at least)."""
    step = max(1, BLOCK_BYTES // max(8 * per_row, 1))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)] or [slice(0, 0)]


def float64_blocks(ref: np.ndarray, cand: np.ndarray):
    """Yield float64 copies of the rows of ref and cand ([samples, values]), a block at a time
    (row_blocks); one (empty) block when there are no rows."""
    for b in row_blocks(len(ref), ref.shape[1]):
        yield ref[b].astype(np.float64), cand[b].astype(np.float64)


def joined_norm(norms: Sequence[float]) -> float:
    """The L2 norm of all the rows from their blocks' norms (one block's own, exactly)."""
    return float(norms[0]) if len(norms) == 1 else float(np.sqrt(np.sum(np.square(norms))))


class _RowMetrics:
    """compare()'s per-sample statistics of ref and cand ([samples, values] float32), computed in
    float64 a block of samples at a time: the same values row by row as on the whole arrays (and
    the same relative L2 when they fit one block), in bounded memory."""

    def __init__(self, ref: np.ndarray, cand: np.ndarray):
        diff, size, cos, centered, mean, spread, max_abs, ref_max_abs = [], [], [], [], [], [], [], []
        self.zeros = 0  # values of ref that are exactly 0
        for r, c in float64_blocks(ref, cand):
            self.zeros += r.size - int(np.count_nonzero(r))
            diff.append(np.linalg.norm(r - c))
            size.append(np.linalg.norm(r))
            m, sd = r.mean(axis=1, keepdims=True), r.std(axis=1, keepdims=True)
            cos.append(_row_cosines(r, c))
            centered.append(_row_cosines(r - m, c - m))
            mean.append(m)
            spread.append(sd)
            if r.size:
                max_abs.append(float(np.abs(r - c).max()))
                ref_max_abs.append(float(np.abs(r).max()))
        self.rel_l2 = joined_norm(diff) / max(joined_norm(size), 1e-12)
        self.mean, self.spread = np.concatenate(mean), np.concatenate(spread)
        self.max_abs, self.ref_max_abs = max(max_abs, default=0.0), max(ref_max_abs, default=0.0)
        if ref.shape[1] < _MIN_COSINE_VALUES:  # one vector over all samples (_cosine): few values
            self.cosine = _cosine(ref.astype(np.float64), cand.astype(np.float64))
        else:
            self.cosine = _mean_cosine(np.concatenate(cos))
        # around each sample's float mean (compare() uses it only for outputs of 16+ values a sample)
        self.centered_cosine = _mean_cosine(np.concatenate(centered))


def slices(v: np.ndarray, axis: int, bounds) -> list[tuple[int, int, np.ndarray]]:
    """(start, stop, v[start:stop] along axis) for each of bounds."""
    return [(a, b, np.take(v, range(a, b), axis=axis)) for a, b in bounds]


def uneven_parts(ref: np.ndarray, axis: int, bounds) -> list[tuple[int, int, np.ndarray]] | None:
    """slices() of float values `ref` when there are 2+ parts covering the axis and their largest
    |values| differ by PART_RATIO or more; None otherwise (the output is judged whole)."""
    if len(bounds) < 2 or not len(ref) or ref.ndim <= axis or bounds[-1][1] != ref.shape[axis]:
        return None
    pieces = slices(ref, axis, bounds)
    sizes = [float(np.abs(p).max()) if p.size else 0.0 for *_, p in pieces]
    return pieces if min(sizes) > NEGLIGIBLE and max(sizes) / min(sizes) >= PART_RATIO else None


def first_uneven(ref: np.ndarray, joins) -> tuple[int, tuple, list] | None:
    """(axis, bounds, pieces) of the first of an output's joins (join_parts) whose parts are uneven."""
    for axis, bounds in joins:
        if pieces := uneven_parts(ref, axis, bounds):
            return axis, bounds, pieces
    return None


def _parts(ref: np.ndarray, cand: np.ndarray, joins) -> tuple[PartFidelity, ...]:
    """Each part's fidelity when the parts' float values differ in size by PART_RATIO or more."""
    found = first_uneven(ref, joins) if cand.shape == ref.shape else None
    if found is None:
        return ()
    axis, bounds, pieces = found
    out = []
    for (a, b, r), (_, _, c) in zip(pieces, slices(cand, axis, bounds)):
        size = float(np.abs(r).max())
        r, c = r.reshape(len(r), -1).astype(np.float64), c.reshape(len(c), -1).astype(np.float64)
        out.append(PartFidelity(axis, a, b, _cosine(r, c), float(np.linalg.norm(r - c) / max(np.linalg.norm(r), 1e-12)),
                                size))
    return tuple(out)


@functools.lru_cache(maxsize=4)  # a budget loop judges dozens of models of one float model
def join_parts(float_model: bytes) -> dict:
    """{signature output name: ((axis, ((start, stop), ...)), ...)}: for each output, the axes
    (counted in the output's own shape, batch first) a CONCATENATION joins from parts, the join that
    writes the output first, then those found through the layout ops after it (a YOLO head joins
    its columns [boxes, scores] per level, then reshapes, joins the levels on the anchor axis and
    transposes). Which of them, if any, splits is up to the values (first_uneven). {} when none."""
    from . import tflite_edit as te

    if not te.has_ops(float_model, {"CONCATENATION"}):
        return {}
    from .tflite_model import read_model

    info = read_model(float_model)
    producer = {t.index: op for op in info.ops if op.subgraph == 0 for t in op.outputs}
    try:
        runner = signature_runner(float_model)
        details = runner.get_output_details()
    except EdgeqError:  # an interpreter without the model's custom ops: judged whole, as before
        return {}
    out = {}
    for name, d in details.items():
        joins = {}
        direct = _joined_axis(producer, d["index"], None, runner)
        if direct:
            joins[direct[0]] = direct[1]
        for axis in range(1, len(d["shape"])):
            if axis not in joins and (found := _joined_axis(producer, d["index"], axis, runner)):
                joins[axis] = found[1]
        if joins:
            out[name] = tuple(joins.items())
    return out


def _concat_axis(op) -> int | None:
    """The axis a CONCATENATION joins on, from its shapes (None when they do not tell)."""
    shapes = [tuple(t.shape) for t in op.inputs]
    whole = tuple(op.outputs[0].shape)
    axes = [a for a in range(len(whole)) if all(len(s) == len(whole) for s in shapes)
            and sum(s[a] for s in shapes) == whole[a]
            and all(s[k] == whole[k] for s in shapes for k in range(len(whole)) if k != a)]
    return axes[0] if len(axes) == 1 and len(shapes) >= 2 and min(min(s) for s in shapes) >= 1 else None


_MAX_LAYOUT_STEPS = 8


def _joined_axis(producer: dict, tensor: int, axis: int | None, runner) -> tuple | None:
    """(axis, bounds) of the CONCATENATION joining `tensor`'s axis `axis` (None: the one its writer
    joins on), followed back through TRANSPOSE, RESHAPE (where the axis keeps its size and place)
    and CONCATENATIONs on other axes; the axis is the CONCATENATION's own."""
    for _ in range(_MAX_LAYOUT_STEPS):
        op = producer.get(tensor)
        if op is None or not op.outputs or not op.inputs:
            return None
        if op.name == "CONCATENATION":
            joined = _concat_axis(op)
            if joined is None:
                return None
            if axis is None or joined == axis:
                stops = np.cumsum([t.shape[joined] for t in op.inputs])
                return joined, tuple((int(b - t.shape[joined]), int(b)) for b, t in zip(stops, op.inputs))
            tensor = op.inputs[0].index  # every input has the same layout on `axis`
        elif axis is not None and op.name == "TRANSPOSE":
            perm = _constant(runner, op.inputs[1].index)
            if perm is None or axis >= len(perm):
                return None
            axis, tensor = int(perm[axis]), op.inputs[0].index
        elif axis is not None and op.name == "RESHAPE":
            src, dst = tuple(op.inputs[0].shape), tuple(op.outputs[0].shape)
            lead = int(np.prod(dst[:axis]))
            same = [b for b in range(len(src)) if src[b] == dst[axis] and int(np.prod(src[:b])) == lead]
            if not same:
                return None
            axis, tensor = same[0], op.inputs[0].index
        else:
            return None
    return None


def _constant(runner, index: int):
    try:
        return runner._interpreter.get_tensor(index)  # noqa: SLF001 - the runner's own interpreter
    except (AttributeError, ValueError):
        return None


def _cosine(ref: np.ndarray, cand: np.ndarray) -> float:
    """Mean per-sample cosine; short outputs (< 16 values a sample) as one vector over all samples."""
    if ref.shape[1] < _MIN_COSINE_VALUES:
        ref, cand = ref.reshape(1, -1), cand.reshape(1, -1)
    return _mean_cosine(_row_cosines(ref, cand))


def _mean_cosine(cos: np.ndarray) -> float:
    return float(cos.mean()) if cos.size else 1.0


def _row_cosines(ref: np.ndarray, cand: np.ndarray) -> np.ndarray:
    num = (ref * cand).sum(axis=1)
    den = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
    # Exact zeros against a float output that is 0 to within NEGLIGIBLE match it (no direction to miss).
    same = np.abs(ref - cand).max(axis=1, initial=0.0) <= np.where(den > 0, 0.0, NEGLIGIBLE)
    return np.where(den > 0, num / np.maximum(den, 1e-30), np.where(same, 1.0, 0.0))


def is_vector_output(ref: np.ndarray) -> bool:
    """One vector of >= 2 values per sample (size-1 axes aside): what top-1 can be taken over."""
    return ref.ndim >= 2 and sum(d > 1 for d in ref.shape[1:]) == 1


def looks_like_class_scores(name: str, ref: np.ndarray) -> bool:
    """Probabilities (non-negative rows summing to 1), or a score vector of up to MAX_CLASSES values
    whose name does not say it is something else (an embedding, boxes, landmarks...)."""
    if not is_vector_output(ref):
        return False
    rows = ref.reshape(ref.shape[0], -1)
    if _probabilities(rows):
        return True
    return rows.shape[1] <= MAX_CLASSES and not any(w in name.lower() for w in NOT_CLASS_WORDS)


def output_kind(name: str, ref: np.ndarray, declared_class_scores: bool = False,
                not_class: bool = False) -> OutputKind:
    """What an output holds, from the user's word, its values and its name (float model's, stacked).
    `not_class`: the model says it is something else (fed_back: a state it takes back as an input)."""
    if declared_class_scores and is_vector_output(ref):
        return OutputKind.CLASS_SCORES
    if is_vector_output(ref) and _probabilities(ref.reshape(ref.shape[0], -1)):
        return OutputKind.CLASS_SCORES
    if not_class:
        return OutputKind.OTHER
    if any(w in name.lower() for w in EMBEDDING_WORDS) or (is_vector_output(ref) and _unit_rows(ref)):
        return OutputKind.EMBEDDING
    if looks_like_class_scores(name, ref):
        return OutputKind.MAYBE_CLASS_SCORES
    return OutputKind.OTHER


def _unit_rows(ref: np.ndarray) -> bool:
    """Every sample's vector has L2 norm 1: an L2-normalised embedding (efficientword-net's wake-word
    vectors, named "Identity", were judged as class scores by a softmax KL that read 0 throughout)."""
    rows = ref.reshape(ref.shape[0], -1).astype(np.float64)
    return rows.size > 0 and rows.shape[1] >= 2 and bool(np.allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-3))


def _probabilities(rows: np.ndarray) -> bool:
    return rows.size > 0 and bool((rows >= 0).all()) and bool(np.allclose(rows.sum(axis=1), 1.0, atol=1e-3))


def check_finite(reference: dict[str, np.ndarray], what: str = "held-out samples",
                 labels: Sequence[str] | None = None) -> None:
    """The float model's own outputs must be numbers: NaN or inf there (a log front end fed digital
    silence) made every comparison read cosine 0 and the floor blamed int8 ("try --scheme dynamic")."""
    for name, v in reference.items():
        rows = np.asarray(v).reshape(len(v), -1)
        bad = ~np.isfinite(rows).all(axis=1)
        if bad.any():
            kind = "NaN" if np.isnan(rows).any() else "inf"
            k = int(np.argmax(bad))
            # rows are samples unless the output is stacked on an axis of its own (a time-first CRNN)
            per_sample = labels is not None and len(rows) == len(labels)
            count = f"{int(bad.sum())} of {len(rows)} " if per_sample else ""
            first = f"; first {labels[k]}" if per_sample else ""
            raise CalibrationError(f"the float model itself outputs {kind} on {count}{what} "
                                   f"(output {name!r}{first}); int8 cannot be judged "
                                   "against it: check those inputs (e.g. digital silence into a log) or the model")


def fidelity(float_model: bytes, quant_model: bytes, samples: Sequence[dict[str, np.ndarray]],
             reference: dict[str, np.ndarray] | None = None, class_outputs: Collection[str] = ()) -> Fidelity:
    ref = reference if reference is not None else run_model(float_model, samples)
    return compare(ref, run_model(quant_model, samples), class_outputs, join_parts(float_model), len(samples),
                   fed_back(float_model))


def fed_back(float_model: bytes) -> frozenset[str]:
    """Signature outputs of exactly the shape and dtype of one of several inputs: a recurrent state the
    caller feeds back, never class scores (unless they are probabilities, or the user says so). A
    voice detector's 128-value GRU state (PyPI akiki) was reported with "top-1 agree 0.58" and chose
    the level's ranges by a softmax KL over it, not by the speech probability. A model with one input
    is left alone: 8 features in, 8 class scores out is a classifier."""
    from .signature import signature_specs

    try:
        ins, outs = signature_specs(float_model)
    except EdgeqError:
        return frozenset()
    if len(ins) < 2:
        return frozenset()
    shapes = {(tuple(i.shape), str(i.dtype)) for i in ins}
    return frozenset(o.name for o in outs if (tuple(o.shape), str(o.dtype)) in shapes)
