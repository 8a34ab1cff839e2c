"""What integer model inputs and outputs lose by themselves, and the refusal when that alone misses
the accuracy target.

`io_rounding`: the float model fed the held-out samples rounded to the quantized model's input
levels, its outputs rounded to the output levels, compared with float as convert's fidelity is. No op
precision wins that loss back, so the budget loop cannot either: resemblyzer's speaker encoder for
rpi4 (int8 I/O) reads mel energies of 0 to 3.4 whose median is 7e-6; its I/O rounding alone reads
cosine 0.8386, and the loop had moved 7678 ops to float in 23 s (after a 105 s level) to reach 0.8388
before refusing with advice about --max-drop."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Sequence

import numpy as np

from .errors import QuantizationError
from .fidelity import Fidelity, compare, dequantize_output, fed_back, join_parts, quantize_input, run_model


@dataclass(frozen=True)
class IoRounding:
    inputs: tuple[str, ...]  # integer inputs (signature names) the samples were rounded for
    outputs: tuple[str, ...]  # integer outputs the float outputs were rounded to
    dtypes: tuple[str, ...]  # their dtypes, e.g. ("int8",)
    fidelity: Fidelity

    def what(self) -> str:
        """e.g. 'the int8 input', 'the int8 inputs and output'."""
        parts = [("inputs" if len(self.inputs) > 1 else "input") if self.inputs else "",
                 ("outputs" if len(self.outputs) > 1 else "output") if self.outputs else ""]
        return f"the {'/'.join(self.dtypes)} " + " and ".join(p for p in parts if p)


def _integer(d: dict) -> bool:
    scale, _ = d.get("quantization", (0.0, 0))
    return np.dtype(d["dtype"]).kind in "iu" and bool(scale)


def io_rounding(float_model: bytes, quant_model: bytes, samples: Sequence[dict], reference: dict,
                class_outputs: Collection[str] = ()) -> IoRounding | None:
    """The float model's fidelity with only the quantized model's integer I/O rounding, or None where
    its inputs and outputs are float (or integer without a scale: token ids)."""
    from .signature import signature_runner

    runner = signature_runner(quant_model)
    ins = {n: d for n, d in runner.get_input_details().items() if _integer(d)}
    outs = {n: d for n, d in runner.get_output_details().items() if _integer(d)}
    if not ins and not outs:
        return None
    if ins:
        rounded = [{n: dequantize_output(quantize_input(np.asarray(x), ins[n]), ins[n])
                    if n in ins and np.asarray(x).dtype.kind == "f" else x for n, x in s.items()} for s in samples]
        got = run_model(float_model, rounded)
    else:
        got = dict(reference)
    got = {n: dequantize_output(quantize_input(y, outs[n]), outs[n]) if n in outs else y for n, y in got.items()}
    fid = compare(reference, got, class_outputs, join_parts(float_model), len(samples), fed_back(float_model))
    dtypes = tuple(sorted({np.dtype(d["dtype"]).name for d in (*ins.values(), *outs.values())}))
    return IoRounding(tuple(ins), tuple(outs), dtypes, fid)


def refuse_lost_in_io(target, float_model: bytes, quant_model: bytes, samples: Sequence[dict], reference: dict,
                      class_outputs: Collection[str] = ()) -> None:
    """Raise where the integer I/O rounding alone misses `target` (accuracy_target.Target): before the
    budget loop, which moves ops and cannot reach it."""
    io = io_rounding(float_model, quant_model, samples, reference, class_outputs)
    if io is None or target.met(io.fidelity):
        return
    what = "fidelity floor" if target.floor else "accuracy budget"
    ends = "first" if io.inputs else "last"
    silence = target.silence(io.fidelity)  # the data, not the model, may be what to change first
    raise QuantizationError(
        f"{what} not met, nothing written: rounding {io.what()} alone loses it (the float model so rounded "
        f"reaches {target.reached(io.fidelity)}), which no op precision wins back; "
        + (f"{silence}; " if silence else "")
        + f"pass --io float32 (the budget loop can then keep the {ends} ops float)"
        + ("; or turn the floor off with --no-floor" if target.floor else "; or accept less with --max-drop"))
