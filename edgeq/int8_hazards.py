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

import numpy as np

from .precision import Precision

# What the float DIVs cost the user is one line of text; why they are float is this.
REASON = ("their divisor is computed from the input, and LiteRT's int8 DIV stops the model (\"div.cc: "
          "data[i] != zero_point\") on any input whose divisor rounds to zero, e.g. a quiet or constant one")

# Recipe precisions whose activations are int8 (the hazard is the int8 divisor).
INT8_ACTIVATIONS = frozenset({Precision.INT8, Precision.INT4X8})


def divisor_hazards(float_model: bytes) -> dict[str, str]:
    """{first output name: op name} of the DIV ops whose divisor is computed, except a divisor clamped
    by MAXIMUM(x, c > 0): the pooling idiom `sum(mask).clamp(min=eps)`, a token count of at least 1
    in practice (MiniLM's mean pooling: its all-int8 model needs that DIV in int8, and a count of
    1..seq_len stays 8+ steps above zero). BirdNET's `max - min + 1e-6` (an ADD) is what falls to
    zero on a quiet window."""
    from . import tflite_edit as te
    from .tflite_model import read_model

    info = read_model(float_model)
    producer = {(op.subgraph, t.index): op for op in info.ops for t in op.outputs}
    divs = [(op, producer.get((op.subgraph, op.inputs[1].index))) for op in info.ops
            if op.name == "DIV" and len(op.inputs) == 2 and op.outputs and not op.inputs[1].is_constant]
    m = te.load(float_model) if any(p is not None and p.name == "MAXIMUM" for _, p in divs) else None

    def clamped(p) -> bool:
        if m is None or p is None or p.name != "MAXIMUM":
            return False
        values = [te.constant(m, m.subgraphs[p.subgraph], t.index) for t in p.inputs if t.is_constant]
        return any(v is not None and v.size and float(np.min(v)) > 0 for v in values)

    return {op.outputs[0].name: op.name for op, p in divs if not clamped(p)}


def note(ops) -> str | None:
    """convert's warning for the hazard ops left float in the written model (OpInfo list), or None."""
    if not ops:
        return None
    names = ", ".join(f"#{op.index} {op.name}" for op in ops[:8]) + (f" and {len(ops) - 8} more" if len(ops) > 8 else "")
    return f"{len(ops)} op(s) kept float ({names}): {REASON}"
