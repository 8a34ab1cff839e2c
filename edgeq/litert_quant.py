"""Per-op quantization with the LiteRT quantizer: a recipe built from an op → precision plan.

The TFLite converter can only keep ops float (QuantizationDebugger denylists); the LiteRT quantizer
also does per-op dynamic-range ("hybrid") and int4 weights, so every mixed plan goes through here.
It needs a float .tflite with a SignatureDef (see `signature.ensure_signature`).

- recipe lines: `op_config`, `recipe_lines`, `build_recipe`, `per_op_from_plan`;
- `Requantizer`: one float model, calibrated once, quantized per any number of plans (convert's
  first result, the accuracy-budget loop's probes, a little-data refit); `quantize_per_op` is one
  plan through it.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from .errors import QuantizationError, first_line
from .bias_overflow import candidates as overflow_candidates, fix as fix_bias_overflow
from .float_joins import float_joins
from .int8_hazards import INT8_ACTIVATIONS, divisor_hazards
from .int8_constraints import typed_unread_outputs
from .int8_islands import fold_islands, kept_float
from .precision import INT4_BLOCK_SIZE, INT4_FALLBACK, INT4_PRECISIONS, RECIPE_PRECISION, RECIPE_PRECISIONS, Precision
from .signature import SIGNATURE_KEY
from .tflite_ops import WEIGHT_OPERAND, quantizer_int4_ops
from .quiet import quiet_native
from .ranges import live_ranges
from .tflite_model import read_model

_WEIGHTS = {"num_bits": 8, "symmetric": True, "granularity": "CHANNELWISE", "dtype": "INT"}


def _int4_weights(precision: Precision) -> dict:
    block = INT4_BLOCK_SIZE[precision]
    return {"num_bits": 4, "symmetric": True, "granularity": f"BLOCKWISE_{block}" if block else "CHANNELWISE",
            "dtype": "INT"}


# Ops whose int8 activations are made symmetric (zero point 0). XNNPACK runs int8 BATCH_MATMUL with
# two non-constant inputs only when both have zero point 0; with the quantizer's default asymmetric
# int8 each one falls back to the builtin kernel and cuts the delegated graph (MiniLM, seq 128, this
# host: 22.8 ms in 11 partitions vs 10.3 ms in one).
SYMMETRIC_INT8_OPS = frozenset({"BATCH_MATMUL"})


# Ops whose constant weights are quantized per tensor under static int8 / int16x8: LiteRT's
# quantized BATCH_MATMUL (builtin and XNNPACK) reads one scale for its right-hand side; given
# per-channel scales it outputs zeros (openWakeWord's melspectrogram.tflite, a [257, 32] constant
# filter bank: cosine 0.0000 to float). Hybrid BATCH_MATMUL runs per-channel weights correctly.
PER_TENSOR_WEIGHT_OPS = frozenset({"BATCH_MATMUL"})


# Recipe precisions with calibrated activation ranges (int4x8: int4 weights, int8 activations).
STATIC_PRECISIONS = frozenset({Precision.INT8, Precision.INT16X8, Precision.INT4X8})

# Activation bits of the static recipe precisions.
_ACTIVATION_BITS = {Precision.INT8: 8, Precision.INT16X8: 16}


def op_config(precision: Precision | str, op: str = "*") -> tuple[str, dict]:
    """(algorithm_key, op_config) for one recipe precision of `op`, in the quantizer's recipe JSON format."""
    base = {"explicit_dequantize": False, "skip_checks": False, "min_weight_elements": 0}
    if precision not in RECIPE_PRECISIONS:
        raise QuantizationError(f"precision {str(precision)!r} is not one of "
                                f"{', '.join(p for p in Precision if p in RECIPE_PRECISIONS)}")
    if precision == Precision.FLOAT:
        return "no_quantize", {}
    if precision == Precision.HYBRID:
        return "min_max_uniform_quantize", {"weight_tensor_config": _WEIGHTS, "compute_precision": "INTEGER",
                                            **base}
    if precision in INT4_PRECISIONS and precision != Precision.INT4X8:
        p = Precision(precision)
        if p is Precision.INT4_WEIGHT_ONLY:  # a DEQUANTIZE of the int4 weight, then the float kernel
            return "min_max_uniform_quantize", {"weight_tensor_config": _int4_weights(p),
                                                "compute_precision": "FLOAT", **base, "explicit_dequantize": True}
        return "min_max_uniform_quantize", {"weight_tensor_config": _int4_weights(p), "compute_precision": "INTEGER",
                                            **base}
    weights = _int4_weights(Precision.INT4X8) if precision == Precision.INT4X8 else _weights_of(op)
    precision = Precision.INT8 if precision == Precision.INT4X8 else precision  # int8 activations
    bits = _ACTIVATION_BITS[Precision(precision)]
    symmetric = bits == 16 or op in SYMMETRIC_INT8_OPS  # int16 kernels are symmetric-only
    act = {"num_bits": bits, "symmetric": symmetric, "granularity": "TENSORWISE", "dtype": "INT"}
    return "min_max_uniform_quantize", {"activation_tensor_config": act, "weight_tensor_config": weights,
                                        "compute_precision": "INTEGER", **base}


def _weights_of(op: str) -> dict:
    return {**_WEIGHTS, "granularity": "TENSORWISE"} if op in PER_TENSOR_WEIGHT_OPS else _WEIGHTS


@functools.lru_cache(maxsize=None)
def quantizer_int8_ops() -> frozenset[str]:
    """Ops the LiteRT quantizer has a static int8 recipe for (its policy's static_wi8_ai8 list); it
    leaves any other op float between int8 ops (PRELU, LOG, CAST, ...; LEAKY_RELU too, which
    int8_islands.fold_islands then runs in int8). TFLite builtin names (the policy's own differ for one op)."""
    return frozenset(_BUILTIN_NAME.get(op, op) for op in _policy_ops("static_wi8_ai8")) - {"INPUT", "OUTPUT"}


# The LiteRT quantizer's op names that are not the TFLite builtin's (its tfl_flatbuffer_utils table):
# a recipe line must use its name, or the line never matches and the op keeps the default precision.
_BUILTIN_NAME = {"CONV_2D_TRANSPOSE": "TRANSPOSE_CONV"}
_QUANTIZER_NAME = {builtin: name for name, builtin in _BUILTIN_NAME.items()}


@functools.lru_cache(maxsize=None)
def quantizer_hybrid_ops() -> frozenset[str]:
    """Ops the LiteRT quantizer has a dynamic-range (hybrid) recipe for (dynamic_wi8_afp32). It
    refuses a hybrid line for any other op ("Unsupported op for INTEGER: GATHER": an accuracy-budget
    probe that moved a text model's embedding GATHER to hybrid ended the conversion)."""
    return frozenset(_BUILTIN_NAME.get(op, op) for op in _policy_ops("dynamic_wi8_afp32"))


def _policy_ops(config: str) -> frozenset[str]:
    """The ops of one entry of the LiteRT quantizer's default policy (its ops_per_config table)."""
    import json

    from litert_quantizer import default_policy

    return frozenset(json.loads(default_policy.DEFAULT_JSON_POLICY)["ops_per_config"][config])


def int4_ops(precision: Precision | str) -> frozenset[str]:
    """Ops the LiteRT quantizer writes at this int4 precision (empty for other precisions)."""
    return quantizer_int4_ops(str(precision))


def effective_precision(precision: Precision | str, op: str) -> Precision:
    """What the quantizer can make of `op` at `precision`: an int4 precision on an op it has no int4
    recipe for becomes the 8-bit fallback (the quantizer would silently leave it float)."""
    p = Precision(precision)
    if p in INT4_PRECISIONS and op not in int4_ops(p):
        p = INT4_FALLBACK[p]
    if p is Precision.HYBRID and (op not in WEIGHT_OPERAND or op not in quantizer_hybrid_ops()):
        p = Precision.FLOAT  # no weight to store as int8, or no hybrid recipe for it in the quantizer
    return p


def _plain_lines(regex: str, op: str, precision: Precision | str) -> list[dict]:
    algo, cfg = op_config(precision, op)
    return [{"regex": regex, "operation": op, "algorithm_key": algo, "op_config": cfg}]


def recipe_lines(regex: str, op: str, precision: Precision | str) -> list[dict]:
    """Recipe line(s) putting ops matching `regex` and `op` ("*" = any) at `precision`. An int8
    line for any op adds the SYMMETRIC_INT8_OPS lines after it, and an int8 or int16x8 line the
    PER_TENSOR_WEIGHT_OPS lines (later lines win). An int4 line for
    any op is the 8-bit fallback for every op, then int4 lines for the ops the quantizer has int4 for
    (later lines win); for one op without int4 it is the fallback line."""
    if precision in INT4_PRECISIONS:
        if op != "*":
            return _plain_lines(regex, op, effective_precision(precision, op))
        lines = recipe_lines(regex, "*", INT4_FALLBACK[Precision(precision)])
        return lines + [line for o in sorted(int4_ops(precision)) for line in _plain_lines(regex, o, precision)]
    lines = _plain_lines(regex, op, precision)
    if op == "*" and precision in (Precision.INT8, Precision.INT16X8):
        own = SYMMETRIC_INT8_OPS | PER_TENSOR_WEIGHT_OPS if precision == Precision.INT8 else PER_TENSOR_WEIGHT_OPS
        lines += [line for o in sorted(own) for line in _plain_lines(regex, o, precision)]
    return lines


@dataclass(frozen=True)
class OpPrecision:
    """One recipe line: the op whose first output is `output` runs at `precision`."""

    op: str
    output: str
    precision: Precision  # a recipe precision: int8 | int16x8 | hybrid | float


def op_scopes(float_model: bytes) -> dict[str, str]:
    """First output name -> the quantizer's op scope ("out1;out2;...;", see get_op_scope)."""
    return {op.outputs[0].name: "".join(t.name + ";" for t in op.outputs if t.name)
            for op in read_model(float_model).ops if op.outputs}


def build_recipe(default: Precision | str, per_op: Sequence[OpPrecision],
                 scopes: dict[str, str] | None = None, hazards: Mapping[str, str] | None = None) -> list[dict]:
    """Default for every op first; later entries win, so per-op lines override it. `hazards`
    ({first output: op}, int8_hazards.divisor_hazards) stay float wherever they would get int8
    activations, whatever the plan says.

    Each line matches its op's whole scope: tensor names may themselves contain ';' (litert-torch
    writes "...SelfAttention_self;1"), so a prefix match would also catch other ops. The ops of one
    kind at one precision share a line (one alternation of their scopes): the quantizer tries every
    line's regex on every op, and Python's regex cache holds 512 patterns, so a plan with a line per
    op recompiled them all for every op (a CRNN with 511 unrolled LSTM layers: one budget probe ran
    for over 15 minutes). A scope belongs to one op, so grouping changes no op's line."""
    recipe = recipe_lines(".*", "*", default)
    last = {p.output: p for p in per_op}  # later entries win
    for output, op in (hazards or {}).items():
        if effective_precision(last[output].precision if output in last else default, op) in INT8_ACTIVATIONS:
            last[output] = OpPrecision(op, output, Precision.FLOAT)
    groups: dict[tuple[str, Precision], list[str]] = {}
    for p in last.values():
        precision = effective_precision(p.precision, p.op)
        if precision == effective_precision(default, p.op):
            continue
        groups.setdefault((p.op, precision), []).append(re.escape((scopes or {}).get(p.output, p.output + ";")))
    for (op, precision), scoped in groups.items():
        algo, cfg = op_config(precision, op)
        regex = "^" + scoped[0] + "$" if len(scoped) == 1 else "^(?:" + "|".join(scoped) + ")$"
        recipe.append({"regex": regex, "operation": _QUANTIZER_NAME.get(op, op), "algorithm_key": algo,
                       "op_config": cfg})
    return recipe


def per_op_from_plan(plan) -> tuple[OpPrecision, ...]:
    """A plan.Plan (or None) as recipe lines ("other" ops are left to the quantizer)."""
    if plan is None:
        return ()
    return tuple(OpPrecision(e.op, e.output, RECIPE_PRECISION[e.precision])
                 for e in plan.entries if e.output and e.precision in RECIPE_PRECISION)


RangeHook = Callable[[dict], dict]


class Reiterable:
    """Samples from a factory of fresh iterators. The quantizer walks its data twice (it counts
    with list() first), so a plain generator would arrive empty; this streams both passes."""

    def __init__(self, factory: Callable[[], Iterable[dict[str, np.ndarray]]]):
        self._factory = factory

    def __iter__(self):
        return iter(self._factory())


class Requantizer:
    """Quantizes any per-op plan of one float model with the LiteRT quantizer, calibrating once.

    `samples` returns a fresh iterator of calibration samples; `adjust_ranges` (range selection)
    is applied once to the calibration result. `ranges`: a calibration result chosen elsewhere (an
    --optimize level's), used as is instead of calibrating; `finish` post-processes every result
    (that level's bias correction, GPTQ). An int4 default also stores large non-weight float32
    constants as float16 (half_constants.py)."""

    def __init__(self, float_model: bytes, default: Precision, samples: Callable[[], Iterable[dict]] | None,
                 count: int = 0, *, keep_float_io: bool = True, adjust_ranges: Callable[[dict], dict] | None = None,
                 progress=None, ranges: dict | None = None, finish: Callable[[bytes], bytes] | None = None):
        from .progress import SILENT

        self.float_model = float_model
        self.default = Precision(default)
        self.keep_float_io = keep_float_io
        self._samples = samples
        self._count = count
        self._adjust = adjust_ranges
        self._progress = progress or SILENT
        self._scopes = op_scopes(float_model)
        self._hazards = divisor_hazards(float_model)
        self._overflow = overflow_candidates(float_model)  # bias_overflow: most models have none
        self._raw: dict | None = None  # the quantizer's min/max result
        self._ranges: dict | None = ranges  # after range selection: what every plan is quantized with
        self._finish = finish
        self.quantizations = 0

    @property
    def static(self) -> bool:
        """The default precision has calibrated activation ranges (else plans need them only for
        the ops they put at int8/int16x8)."""
        return self.default in STATIC_PRECISIONS

    def _recipe(self, per_op, default: Precision | None = None) -> list[dict]:
        recipe = build_recipe(default or self.default, per_op, self._scopes, self._hazards)
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
        # Every op static: ranges for every tensor any plan may need (min/max do not depend on the recipe).
        qt = self._quantizer((), self.default if self.static else Precision.INT8)
        # The quantizer walks the samples twice (it counts them first): the bar counts both passes.
        with self._progress.task("Calibrating", 2 * count or None) as advance, quiet_native():
            def streamed():
                for s in samples():
                    yield s
                    advance(1)
            try:
                base = qt.calibrate({SIGNATURE_KEY: Reiterable(streamed)}, previous_calibration_result=previous,
                                    num_threads=2)
            except (ValueError, KeyError) as e:
                raise QuantizationError(f"calibration failed in the LiteRT quantizer: {first_line(e)}"
                                        f"{control_flow_hint(self.float_model)}") from None
        from .ranges import finite_calibration

        return finite_calibration(self.float_model, Reiterable(samples), base, SIGNATURE_KEY)

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
        qt = self._quantizer(per_op)
        if qt.need_calibration and ranges is None:
            ranges = self.ranges()
        self.quantizations += 1
        with quiet_native():  # the quantizer prints its own reports
            try:
                result = qt.quantize(live_ranges(ranges) if qt.need_calibration else None, enable_progress_report=False)
            except (ValueError, RuntimeError, KeyError, NotImplementedError) as e:
                raise QuantizationError(f"LiteRT quantizer failed: {first_line(e)}{QUANTIZER_WAY_OUT}") from None
        model = finish_quantized(bytes(result.quantized_model), self.float_model, kept_float(per_op), self._overflow)
        if self.default in INT4_PRECISIONS:  # int4 is chosen for size: large float constants at 16 bits
            from .half_constants import halve_float_constants
            model, _ = halve_float_constants(model)
        # After the halving: `finish` sees the layout that is written (its reports are keyed by its output).
        return self._finish(model) if self._finish else model


# After the quantizer's own words, what a user can do: weights-only schemes calibrate no activations.
QUANTIZER_WAY_OUT = "; --scheme dynamic or fp16 quantizes without activation ranges"


def control_flow_hint(float_model: bytes) -> str:
    """What to do when the LiteRT quantizer cannot calibrate a model with WHILE/IF subgraphs: it reads
    no tensor inside them ("Tensor data is null": human-models' handtrack, NMS in a WHILE loop)."""
    from . import tflite_edit as te

    if not te.has_ops(float_model, ("WHILE", "IF")):
        return ""
    return ("; the model has a WHILE/IF loop (an LSTM/GRU not unrolled, post-processing such as NMS, a tf.map_fn) "
            "the LiteRT quantizer cannot calibrate: export a recurrent layer with unroll=True, other steps "
            "outside the model")


def finish_quantized(model: bytes, float_model: bytes, keep_float, overflow: bool) -> bytes:
    """What every LiteRT quantizer result goes through: ops it leaves float that the int8 kernels
    run (LEAKY_RELU) made int8, as the converter writes them (except `keep_float`); unread UNPACK /
    SPLIT outputs typed as their input (their kernels refuse a float one); a detector's
    boxes and scores joined at the output kept float; and, where `overflow` (bias_overflow.candidates
    of float_model), the biases it clipped for all-zero weight channels restored."""
    model, _ = fold_islands(model, keep_float)
    model, _ = typed_unread_outputs(model)
    model, _ = float_joins(model)
    return fix_bias_overflow(model, float_model)[0] if overflow else model


def quantize_per_op(float_model: bytes, default: Precision | str, per_op: Sequence[OpPrecision],
                    samples: Iterable[dict[str, np.ndarray]] | None, *, keep_float_io: bool = True,
                    adjust_ranges: RangeHook | None = None) -> bytes:
    """Quantize `float_model` (bytes with a signature) per the plan; returns the .tflite bytes.
    One plan, one calibration: a `Requantizer` used once. `samples` is walked twice (a list or a
    Reiterable); `adjust_ranges` receives the min/max calibration result and returns the one to use
    (percentile / MSE range selection plugs in here)."""
    factory = (lambda: iter(samples)) if samples is not None else None
    count = len(samples) if hasattr(samples, "__len__") else 0
    return Requantizer(float_model, default, factory, count, keep_float_io=keep_float_io,
                       adjust_ranges=adjust_ranges).quantize(per_op)
