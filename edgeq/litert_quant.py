"""Per-op quantization with the LiteRT quantizer: a recipe built from an op → precision plan.

The TFLite converter can only keep ops float (QuantizationDebugger denylists); the LiteRT quantizer
also does per-op dynamic-range ("hybrid"), so every mixed plan goes through here. It needs a float
.tflite with a SignatureDef (see `signature.ensure_signature`).
"""

from __future__ import annotations

import contextlib
import io
import re
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .errors import QuantizationError
from .tflite_ops import WEIGHT_OPERAND

_WEIGHTS = {"num_bits": 8, "symmetric": True, "granularity": "CHANNELWISE", "dtype": "INT"}


def _config(precision: str) -> tuple[str, dict]:
    """(algorithm_key, op_config) for one precision, in the quantizer's recipe JSON format."""
    base = {"explicit_dequantize": False, "skip_checks": False, "min_weight_elements": 0}
    if precision == "float":
        return "no_quantize", {}
    if precision == "hybrid":
        return "min_max_uniform_quantize", {"weight_tensor_config": _WEIGHTS, "compute_precision": "INTEGER",
                                            **base}
    bits = {"int8": 8, "int16x8": 16}.get(precision)
    if bits is None:
        raise QuantizationError(f"precision {precision!r} is not one of int8, int16x8, hybrid, float")
    act = {"num_bits": bits, "symmetric": bits == 16, "granularity": "TENSORWISE", "dtype": "INT"}
    return "min_max_uniform_quantize", {"activation_tensor_config": act, "weight_tensor_config": _WEIGHTS,
                                        "compute_precision": "INTEGER", **base}


@dataclass(frozen=True)
class OpPrecision:
    """One recipe line: the op whose first output is `output` runs at `precision`."""

    op: str
    output: str
    precision: str


def build_recipe(default: str, per_op: Sequence[OpPrecision]) -> list[dict]:
    """Default for every op first; later entries win, so per-op lines override it."""
    algo, cfg = _config(default)
    recipe = [{"regex": ".*", "operation": "*", "algorithm_key": algo, "op_config": cfg}]
    for p in per_op:
        precision = p.precision
        if precision == "hybrid" and p.op not in WEIGHT_OPERAND:
            precision = "float"  # no weight to store as int8: the quantizer has no hybrid kernel for it
        if precision == default:
            continue
        algo, cfg = _config(precision)
        # The quantizer's op scope is "out1;out2;...;" (see get_op_scope): anchor on the first output.
        recipe.append({"regex": "^" + re.escape(p.output) + ";", "operation": p.op,
                       "algorithm_key": algo, "op_config": cfg})
    return recipe


RangeHook = Callable[[dict], dict]


def quantize_per_op(float_model: bytes, default: str, per_op: Sequence[OpPrecision],
                    samples: Sequence[dict[str, np.ndarray]] | None, *, signature_key: str = "serving_default",
                    keep_float_io: bool = True, adjust_ranges: RangeHook | None = None) -> bytes:
    """Quantize `float_model` (bytes with a signature) per the plan; returns the .tflite bytes.

    `adjust_ranges` receives the min/max calibration result and returns the one to use
    (percentile / MSE range selection plugs in here).
    """
    from litert_quantizer import quantizer

    qt = quantizer.Quantizer(bytearray(float_model))
    recipe = build_recipe(default, per_op)
    if keep_float_io:  # model inputs/outputs stay float32 (a QUANTIZE/DEQUANTIZE at the edges)
        recipe += [{"regex": ".*", "operation": io, "algorithm_key": "no_quantize", "op_config": {}}
                   for io in ("INPUT", "OUTPUT")]
    try:
        qt.load_quantization_recipe(recipe)
    except ValueError as e:
        raise QuantizationError(f"the LiteRT quantizer refused the plan: {_first_line(e)}") from None
    calibration = None
    # The quantizer prints its own reports and tqdm bars; edgeq shows its own progress instead.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        if qt.need_calibration:
            if not samples:
                raise QuantizationError("this plan has static int8 ops and needs calibration samples; "
                                        "pass --calib DATA (or --calib random for an uncalibrated model)")
            try:
                calibration = qt.calibrate({signature_key: list(samples)}, num_threads=2)
            except (ValueError, KeyError) as e:
                raise QuantizationError(f"calibration failed in the LiteRT quantizer: {_first_line(e)}") from None
            if adjust_ranges is not None:
                calibration = adjust_ranges(calibration)
        try:
            result = qt.quantize(calibration, enable_progress_report=False)
        except (ValueError, RuntimeError, KeyError, NotImplementedError) as e:
            raise QuantizationError(f"LiteRT quantizer failed: {_first_line(e)}") from None
    return bytes(result.quantized_model)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
