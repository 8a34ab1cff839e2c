"""Per-layer quantization error: float and quantized model run side by side, every op output compared.

Both models come from the same float .tflite through the LiteRT quantizer, which keeps op output
tensor names, so tensors pair up by name. An op's *damage* is the error of its output minus the
worst error of its inputs: the error it adds, not the error it inherits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .tfimport import quiet_native
from .tflite_model import ModelInfo
from .validate import dequantize_output, quantize_input


@dataclass(frozen=True)
class LayerError:
    index: int
    op: str
    output: str
    rel_error: float  # per-channel relative error, averaged over channels (channel_error)
    damage: float  # rel_error minus the worst input's rel_error

    def to_json(self) -> dict:
        return {"index": self.index, "op": self.op, "tensor": self.output, "rel_error": self.rel_error,
                "damage": self.damage}


def _capture(model: bytes, samples: Sequence[dict[str, np.ndarray]], names: set[str]) -> dict[str, list[np.ndarray]]:
    from ai_edge_litert.interpreter import Interpreter

    with quiet_native():  # preserve_all_tensors warns that it is a debugging aid: it is, here
        interp = Interpreter(model_content=model, experimental_preserve_all_tensors=True, num_threads=2)
    runner = interp.get_signature_runner()
    details = {d["name"]: d for d in interp.get_tensor_details()}
    wanted = {n: details[n] for n in names if n in details}
    ins = runner.get_input_details()
    out: dict[str, list[np.ndarray]] = {n: [] for n in wanted}
    with quiet_native():
        for s in samples:
            runner(**{n: quantize_input(np.asarray(s[n]), d) if np.asarray(s[n]).dtype.kind == "f" else s[n]
                      for n, d in ins.items()})
            for n, d in wanted.items():
                try:
                    t = interp.get_tensor(d["index"])
                except ValueError:
                    continue  # tensors without data (e.g. scratch) cannot be read
                t = dequantize_output(np.asarray(t), d).astype(np.float64)
                out[n].append(t.reshape(-1, t.shape[-1]) if t.ndim else t.reshape(1, 1))
    return out


def channel_error(ref: np.ndarray, got: np.ndarray) -> float:
    """Mean over channels (last axis) of each channel's relative error, capped at 1.

    Per channel, because transformer activations carry a few huge channels (MiniLM: ~190 where
    the rest stay < 1.5): a whole-tensor norm is dominated by them and hides that int8 rounded
    every normal channel away. The floor keeps near-zero channels (e.g. a mean) from exploding."""
    num = np.sqrt(((ref - got) ** 2).sum(axis=0))
    den = np.sqrt((ref ** 2).sum(axis=0))
    floor = 1e-3 * max(float(den.max()), 1e-12)
    return float(np.minimum(num / np.maximum(den, floor), 1.0).mean())


def layer_errors(float_model: bytes, quant_model: bytes, float_info: ModelInfo,
                 samples: Sequence[dict[str, np.ndarray]]) -> list[LayerError]:
    """Errors for every float-model op whose output exists in both models, most damaging first."""
    ops = [op for op in float_info.ops if op.subgraph == 0 and op.outputs]
    names = {op.outputs[0].name for op in ops} | {t.name for op in ops for t in op.inputs if not t.is_constant}
    f = _capture(float_model, samples, names)
    q = _capture(quant_model, samples, names)
    rel: dict[str, float] = {}
    for n in names:
        if f.get(n) and q.get(n) and len(f[n]) == len(q[n]):
            a, b = np.concatenate(f[n]), np.concatenate(q[n])
            if a.shape == b.shape:
                rel[n] = channel_error(a, b)
    result = []
    for op in ops:
        out = op.outputs[0].name
        if out not in rel:
            continue
        inherited = max((rel.get(t.name, 0.0) for t in op.inputs if not t.is_constant), default=0.0)
        result.append(LayerError(op.index, op.name, out, rel[out], rel[out] - inherited))
    return sorted(result, key=lambda e: e.damage, reverse=True)
