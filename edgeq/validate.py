"""Fidelity: run the float and the quantized model on the same held-out samples and compare."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .signature import signature_runner
from .tfimport import quiet_native


@dataclass(frozen=True)
class OutputFidelity:
    name: str
    cosine: float
    rel_l2: float
    max_abs: float
    top1_agreement: float | None  # only when the output looks like class scores

    def to_json(self) -> dict:
        return {"name": self.name, "cosine": self.cosine, "rel_l2": self.rel_l2, "max_abs": self.max_abs,
                "top1_agreement": self.top1_agreement}


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

    def to_json(self) -> dict:
        return {"samples": self.samples, "outputs": [o.to_json() for o in self.outputs]}


def run_model(model: bytes, samples: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Outputs (float, dequantized) for every sample, stacked on axis 0, keyed by signature output."""
    runner = signature_runner(model)
    in_details = runner.get_input_details()
    out_details = runner.get_output_details()
    collected: dict[str, list[np.ndarray]] = {name: [] for name in out_details}
    with quiet_native():  # the first invoke announces the XNNPACK delegate on stderr
        for s in samples:
            feed = {}
            for name, d in in_details.items():
                x = np.asarray(s[name])
                feed[name] = quantize_input(x, d) if x.dtype.kind == "f" else x.astype(d["dtype"])
            outs = runner(**feed)
            for name, d in out_details.items():
                collected[name].append(dequantize_output(np.asarray(outs[name]), d))
    return {k: np.concatenate(v, axis=0) if v else np.zeros(0) for k, v in collected.items()}


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


def compare(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray]) -> Fidelity:
    """Per output: cosine, relative L2, max abs error, and top-1 agreement for class scores."""
    outs = []
    n = 0
    # Output names can differ between converters (keras float vs int8); pair them by order.
    for (name, ref), cand in zip(reference.items(), candidate.values()):
        ref = ref.reshape(ref.shape[0], -1).astype(np.float64)
        cand = cand.reshape(cand.shape[0], -1).astype(np.float64)
        n = ref.shape[0]
        num = (ref * cand).sum(axis=1)
        den = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
        cos = np.where(den > 0, num / np.maximum(den, 1e-30), np.where(np.linalg.norm(ref - cand, axis=1) == 0, 1.0, 0.0))
        rel = np.linalg.norm(ref - cand) / max(np.linalg.norm(ref), 1e-12)
        top1 = float((ref.argmax(axis=1) == cand.argmax(axis=1)).mean()) if looks_like_class_scores(name, ref) else None
        outs.append(OutputFidelity(name, float(cos.mean()), float(rel), float(np.abs(ref - cand).max()), top1))
    return Fidelity(n, tuple(outs))


def looks_like_class_scores(name: str, ref: np.ndarray) -> bool:
    """Probabilities (non-negative rows summing to 1), or a short logit vector that is not an embedding."""
    if ref.ndim != 2 or ref.shape[1] < 2:
        return False
    if (ref >= 0).all() and np.allclose(ref.sum(axis=1), 1.0, atol=1e-3):
        return True
    return ref.shape[1] <= 100 and not any(w in name.lower() for w in ("embed", "hidden", "pool", "feature"))


def fidelity(float_model: bytes, quant_model: bytes, samples: Sequence[dict[str, np.ndarray]],
             reference: dict[str, np.ndarray] | None = None) -> Fidelity:
    ref = reference if reference is not None else run_model(float_model, samples)
    return compare(ref, run_model(quant_model, samples))
