"""Per-tensor quantization error, measured on real samples.

Two measurements, both per channel (last axis):
- `rounding_noise`: the error each activation tensor of the FLOAT model gets when rounded to its
  calibrated int8/int16 range on its own (its inputs exact). Needs one float run and the
  calibration ranges, no quantized model: what the accuracy-budget loop ranks moves by.
- `layer_errors`: float and quantized model run side by side, every op output compared. Both
  models come from the same float .tflite through the LiteRT quantizer, which keeps op output
  tensor names, so tensors pair up by name. An op's *damage* is the error of its output minus the
  worst error of its inputs: the error it adds, not the error it inherits. Used for schemes without
  static activation ranges (dynamic), where weights are what loses accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Mapping, Sequence

import numpy as np

from .quiet import quiet_native
from .tflite_model import ModelInfo
from .fidelity import dequantize_output, quantize_input


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


def _rows(model: bytes, samples: Sequence[dict[str, np.ndarray]], names: Collection[str]):
    """Per sample, {name: the named tensor's values as float64 rows (-1, channels)} (tensors without
    data, e.g. scratch, left out). One sample's values at a time: every activation of a 512x512
    detector over 8 samples, stacked, took 8 GB (CenterNet's budget analysis, 10.7 GB peak)."""
    from ai_edge_litert.interpreter import Interpreter

    with quiet_native():  # preserve_all_tensors warns that it is a debugging aid: it is, here
        interp = Interpreter(model_content=model, experimental_preserve_all_tensors=True, num_threads=2)
    runner = interp.get_signature_runner()
    details = {d["name"]: d for d in interp.get_tensor_details()}
    wanted = {n: details[n] for n in names if n in details}
    ins = runner.get_input_details()
    for s in samples:
        with quiet_native():
            runner(**{n: quantize_input(np.asarray(s[n]), d) if np.asarray(s[n]).dtype.kind == "f" else s[n]
                      for n, d in ins.items()})
        row = {}
        for n, d in wanted.items():
            try:
                t = interp.get_tensor(d["index"])
            except ValueError:
                continue  # tensors without data (e.g. scratch) cannot be read
            t = dequantize_output(np.asarray(t), d).astype(np.float64)
            row[n] = t.reshape(-1, t.shape[-1]) if t.ndim else t.reshape(1, 1)
        yield row


def capture(model: bytes, samples: Sequence[dict[str, np.ndarray]], names: Collection[str]) -> dict[str, np.ndarray]:
    """Values of the named tensors for every sample, as float64 rows (-1, channels), stacked."""
    out: dict[str, list[np.ndarray]] = {}
    for row in _rows(model, samples, names):
        for n, v in row.items():
            out.setdefault(n, []).append(v)
    return {n: np.concatenate(v) for n, v in out.items() if v and len(v) == len(samples)
            and len({a.shape[1] for a in v}) == 1}


class _ChannelSums:
    """channel_error accumulated a sample at a time, per tensor: its per-channel sums of squares."""

    def __init__(self):
        self.num: dict[str, np.ndarray] = {}
        self.den: dict[str, np.ndarray] = {}
        self.count: dict[str, int] = {}

    def add(self, name: str, ref: np.ndarray, got: np.ndarray) -> None:
        if name in self.num and self.num[name].shape != ref.shape[1:]:
            self.count[name] = -1 << 30  # channels that change from one sample to the next: not compared
            return
        self.num[name] = self.num.get(name, 0.0) + ((ref - got) ** 2).sum(axis=0)
        self.den[name] = self.den.get(name, 0.0) + (ref ** 2).sum(axis=0)
        self.count[name] = self.count.get(name, 0) + 1

    def errors(self, samples: int) -> dict[str, float]:
        return {n: _channel_error(np.sqrt(self.num[n]), np.sqrt(self.den[n]))
                for n in self.num if self.count[n] == samples}


def channel_error(ref: np.ndarray, got: np.ndarray) -> float:
    """Mean over channels (last axis) of each channel's relative error, capped at 1.

    Per channel, because transformer activations carry a few huge channels (MiniLM: ~190 where
    the rest stay < 1.5): a whole-tensor norm is dominated by them and hides that int8 rounded
    every normal channel away. The floor keeps near-zero channels (e.g. a mean) from exploding."""
    return _channel_error(np.sqrt(((ref - got) ** 2).sum(axis=0)), np.sqrt((ref ** 2).sum(axis=0)))


def _channel_error(num: np.ndarray, den: np.ndarray) -> float:
    """channel_error from each channel's error norm and value norm."""
    floor = 1e-3 * max(float(den.max()), 1e-12)
    return float(np.minimum(num / np.maximum(den, floor), 1.0).mean())


def fake_quantize(x: np.ndarray, lo: float, hi: float, bits: int = 8, symmetric: bool = False) -> np.ndarray:
    """`x` rounded to the integer grid the quantizer derives from the range [lo, hi] (per tensor)."""
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = max(abs(lo), abs(hi)) / qmax
        return x if scale == 0 else np.clip(np.round(x / scale), -qmax, qmax) * scale
    lo, hi = min(lo, 0.0), max(hi, 0.0)  # the grid holds 0 exactly
    qmin, qmax = -2 ** (bits - 1), 2 ** (bits - 1) - 1
    scale = (hi - lo) / (qmax - qmin)
    if scale == 0:
        return x
    zero = np.round(qmin - lo / scale)
    return (np.clip(np.round(x / scale + zero), qmin, qmax) - zero) * scale


def rounding_noise(float_model: bytes, samples: Sequence[dict[str, np.ndarray]], ranges: Mapping[str, Mapping],
                   bits: int = 8, symmetric: Collection[str] = ()) -> dict[str, float]:
    """Per activation tensor with a calibrated range (the LiteRT quantizer's calibration result:
    name -> {"min", "max"}): channel_error of its float values against themselves rounded to that
    range. `symmetric`: tensors quantized with zero point 0 (half the grid for one-sided values)."""
    names = [n for n, r in ranges.items() if isinstance(r, Mapping) and "min" in r and "max" in r]
    sums = _ChannelSums()
    for row in _rows(float_model, samples, names):
        for n, x in row.items():
            lo, hi = float(np.min(ranges[n]["min"])), float(np.max(ranges[n]["max"]))
            sums.add(n, x, fake_quantize(x, lo, hi, bits, n in symmetric))
    return sums.errors(len(samples))


def layer_errors(float_model: bytes, quant_model: bytes, float_info: ModelInfo,
                 samples: Sequence[dict[str, np.ndarray]]) -> list[LayerError]:
    """Errors for every float-model op whose output exists in both models, most damaging first."""
    ops = [op for op in float_info.ops if op.subgraph == 0 and op.outputs]
    names = {op.outputs[0].name for op in ops} | {t.name for op in ops for t in op.inputs if not t.is_constant}
    sums = _ChannelSums()
    for f, q in zip(_rows(float_model, samples, names), _rows(quant_model, samples, names)):
        for n in f.keys() & q.keys():
            if f[n].shape == q[n].shape:
                sums.add(n, f[n], q[n])
    rel = sums.errors(len(samples))
    result = []
    for op in ops:
        out = op.outputs[0].name
        if out not in rel:
            continue
        inherited = max((rel.get(t.name, 0.0) for t in op.inputs if not t.is_constant), default=0.0)
        result.append(LayerError(op.index, op.name, out, rel[out], rel[out] - inherited))
    return sorted(result, key=lambda e: e.damage, reverse=True)
