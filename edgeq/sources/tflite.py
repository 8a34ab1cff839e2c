"""A float .tflite as a source: re-quantized with the LiteRT quantizer (TF cannot re-convert it)."""

from __future__ import annotations

from pathlib import Path

from ..errors import ModelFormatError
from ..signature import ensure_signature, signature_specs
from ..tflite_model import read_model
from ..files import sha256_file
from . import SourceModel


def load_tflite(path: Path) -> SourceModel:
    data = path.read_bytes()
    info = read_model(data, name=str(path))
    quantized = [op for op in info.ops if op.precision in ("int8", "int16x8", "hybrid")]
    if quantized:
        raise ModelFormatError(f"{path}: already quantized ({len(quantized)} quantized ops, e.g. "
                               f"{quantized[0].name}); pass the float model")
    notes = []
    data, added = ensure_signature(data)
    if added:
        notes.append("the input had no SignatureDef; edgeq added 'serving_default' (graph unchanged)")
    custom = sorted({op.name for op in info.ops if op.is_custom})
    if custom:
        notes.append(f"custom ops {', '.join(custom)} stay float and must be registered on the device")
    ins, outs = signature_specs(data)
    return SourceModel("tflite", path, sha256_file(path), data, ins, outs, None, None, tuple(notes))
