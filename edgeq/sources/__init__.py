"""Model sources: one module per format, each turning a path into a `SourceModel`.

Registry, not string imports: `SOURCES` maps a format name to its loader; `detect_format` picks one
from what the path is, and a wrong or corrupt file gets a one-line error naming what was expected.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from ..calibration import InputSpec
from ..errors import ModelFormatError
from ..tflite_model import is_tflite

EXPECTED = ("a Keras .keras/.h5 file, a SavedModel directory, a Hugging Face model directory "
            "(config.json + weights + tokenizer), a torch.export .pt2 program or a float .tflite")


@dataclass(frozen=True)
class SourceModel:
    """A float model ready to quantize: its float .tflite (with a signature) and how to reconvert it."""

    format: str
    path: Path
    sha256: str
    float_tflite: bytes
    inputs: tuple[InputSpec, ...]
    outputs: tuple[InputSpec, ...]
    # A fresh tf.lite.TFLiteConverter on the original model (Keras / SavedModel); None for .tflite/HF.
    converter: Callable[[], object] | None = None
    # Builds samples from texts with the model's own tokenizer (HF sources).
    make_text_samples: Callable[[list[str]], list[dict]] | None = None
    notes: tuple[str, ...] = field(default=())  # things the user should know (shown as warnings)
    description: str = ""  # what the source is, e.g. the HF architecture and export settings
    # Runs the source model itself (PyTorch sources) on samples keyed by the float .tflite's input
    # names; returns outputs stacked on axis 0, keyed and ordered as the .tflite's signature outputs
    # (fidelity.compare pairs outputs by order). None: the float .tflite is the only reference.
    reference: Callable[[list[dict[str, np.ndarray]]], dict[str, np.ndarray]] | None = None
    # How the model scales its own image pixels, when it expects 0..255 (pixel_scale.py); Keras sources
    # read it from their layers, which the converter may fold into the first convolution.
    pixel_scaling: str | None = None
    # What for_int8_activations (for_int16_activations) rewrote in float_tflite: it reaches the written
    # model only where the LiteRT quantizer writes it from float_tflite, not where the TFLite converter
    # re-converts the Keras/SavedModel itself (convert reports these notes then only).
    int8_rewrites: tuple[str, ...] = ()
    # The name of the user's model's signature; float_tflite's is always serving_default, and the
    # written model gets this one back.
    signature_key: str = "serving_default"
    # Outputs the source knows are class scores (a Hugging Face sequence classifier's logits): judged by
    # top-1 unless the user names others (--class-output). (Last: callers pass the fields above by position.)
    class_outputs: tuple[str, ...] = ()


def detect_format(path: Path) -> str:
    if not path.exists():
        raise ModelFormatError(f"{path}: no such file or directory; expected {EXPECTED}")
    if path.is_dir():
        if (path / "saved_model.pb").exists() or (path / "saved_model.pbtxt").exists():
            return "saved_model"
        if (path / "config.json").exists():
            return "hf"
        raise ModelFormatError(f"{path}: directory is neither a SavedModel (saved_model.pb) nor a "
                               "Hugging Face model (config.json)")
    suffix = path.suffix.lower()
    if suffix in (".keras", ".h5", ".hdf5"):
        return "keras"
    with open(path, "rb") as f:
        head = f.read(8)
    if suffix == ".tflite" or is_tflite(head):
        return "tflite"
    from .torch_export import check_archive  # zip directory only, no torch import

    if check_archive(path):
        return "torch_export"
    raise ModelFormatError(f"{path}: unrecognised model file; expected {EXPECTED}")


def load_source(path: Path | str, **options) -> SourceModel:
    path = Path(path)
    fmt = detect_format(path)
    source = SOURCES[fmt](path, **options)
    from ..dead_outputs import slice_dead_splits
    from ..tflite_rewrite import flat_biases, outputs_read_inside

    data, n = slice_dead_splits(source.float_tflite)  # unread SPLIT outputs stop the quantizer's calibration
    data, flat = flat_biases(data)  # a [1, 1, 1, C] bias gets C scales on an axis of 1: LiteRT refuses it
    data, inside = outputs_read_inside(data)  # an output read on was dequantized under its int8 reader
    return source if not n and not flat and not inside else replace(source, float_tflite=data)


def for_int8_activations(source: SourceModel, accelerator: bool) -> SourceModel:
    """The source for int8 activations (tflite_rewrite.int8_activation_model; the same function):
    standalone RELU/RELU6 ops as MUL by 1 with the activation fused and HARD_SWISH as ADD/MUL ops,
    which XNNPACK runs in int8, and on an int8 accelerator (plan.int8_accelerator) PRELU ops in ops the LiteRT quantizer and XNNPACK
    run in int8. Any format: Keras' PReLU layers meet the same quantizer."""
    from ..tflite_rewrite import int8_activation_model

    data, report = int8_activation_model(source.float_tflite, accelerator)
    if data is source.float_tflite:
        return source
    return replace(source, float_tflite=data, int8_rewrites=report.notes())


def for_int16_activations(source: SourceModel) -> SourceModel:
    """The source for int16 activations (tflite_rewrite.int16_activation_model): whole-axis reduce
    windows as reductions, the one int8 rewrite the quantizer needs at this width too."""
    from ..tflite_rewrite import int16_activation_model

    data, report = int16_activation_model(source.float_tflite)
    if data is source.float_tflite:
        return source
    return replace(source, float_tflite=data, int8_rewrites=report.notes())


def _keras(path: Path, input_shapes: tuple[tuple[int, ...], ...] = (), trust_model: bool = False,
           **_) -> SourceModel:
    from .keras import load_keras
    return load_keras(path, input_shapes, trust_model)


def _saved_model(path: Path, input_shapes: tuple[tuple[int, ...], ...] = (), **_) -> SourceModel:
    from .keras import load_saved_model
    return load_saved_model(path, input_shapes)


def _tflite(path: Path, scheme: str = "int8", **_) -> SourceModel:
    from .tflite import load_tflite
    return load_tflite(path, scheme=scheme)


def _hf(path: Path, **options) -> SourceModel:
    from .hf_adapter import load_hf_source
    return load_hf_source(path, **options)


def _torch_export(path: Path, input_shapes: tuple[tuple[int, ...], ...] = (), **_) -> SourceModel:
    from .torch_export import load_torch_export
    return load_torch_export(path, input_shapes)


SOURCES: dict[str, Callable[..., SourceModel]] = {
    "keras": _keras, "saved_model": _saved_model, "tflite": _tflite, "hf": _hf, "torch_export": _torch_export,
}
