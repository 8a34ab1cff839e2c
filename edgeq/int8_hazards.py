"""Ops whose int8 kernel can stop the model at run time on some inputs: kept off int8 activations.

LiteRT's quantized DIV checks every divisor element against the divisor's zero point and fails the
invoke when one equals it (`div.cc: data[i] != zero_point was not true ... (DIV) failed to invoke`).
A divisor computed from the input has an int8 range that always contains 0 (TFLite ranges do), so
any input whose divisor falls below half a step of that range rounds to the zero point: BirdNET
V2.4's spectrogram front end divides each window by its own max - min + 1e-6, and a quiet window
stopped the int8 model (edgeq's range trials hit it as a traceback). On a phone that is an app whose
inference fails on silence. A DIV by a constant is safe (its values are known when quantizing).

`divisor_hazards` finds them; `litert_quant.build_recipe` keeps them float wherever they would run
with int8 activations (int8, int4x8, an int4 scheme's 8-bit fallback), on every path that builds a
recipe, and convert says which and why.
"""

from __future__ import annotations

from .precision import Precision

# What the float DIVs cost the user is one line of text; why they are float is this.
REASON = ("their divisor is computed from the input, and LiteRT's int8 DIV stops the model (\"div.cc: "
          "data[i] != zero_point\") on any input whose divisor rounds to zero, e.g. a quiet or constant one")

# Recipe precisions whose activations are int8 (the hazard is the int8 divisor).
INT8_ACTIVATIONS = frozenset({Precision.INT8, Precision.INT4X8})


def divisor_hazards(float_model) -> dict[str, str]:
    """{first output name: op name} of the DIV ops whose divisor is not a constant (bytes or ModelInfo)."""
    from .tflite_model import ModelInfo, read_model

    info = float_model if isinstance(float_model, ModelInfo) else read_model(float_model)
    return {op.outputs[0].name: op.name for op in info.ops
            if op.name == "DIV" and len(op.inputs) == 2 and op.outputs and not op.inputs[1].is_constant}


def note(ops) -> str | None:
    """convert's warning for the hazard ops left float in the written model (OpInfo list), or None."""
    if not ops:
        return None
    names = ", ".join(f"#{op.index} {op.name}" for op in ops[:8]) + (f" and {len(ops) - 8} more" if len(ops) > 8 else "")
    return f"{len(ops)} op(s) kept float ({names}): {REASON}"
