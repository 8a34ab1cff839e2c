"""Models that scale their own pixels: read from the op that first touches an image input.

keras.applications' EfficientNet (B0-B7, V2), MobileNetV3 and ConvNeXt carry their preprocessing
inside the model (a Rescaling layer, 1/255 or 1/127.5, or a Normalization by ImageNet's mean on
0..255) and expect raw 0..255 pixels. Calibrated on photos scaled to [0, 1], edgeq's default, such a
model is quantized for inputs 255x smaller than the ones it meets on the device, and its held-out
fidelity, judged on the same wrong scale, does not show it. The converter writes those layers as
the input's first op: MUL by a small constant, DIV by a large one, or SUB/ADD of a mean in the tens
or hundreds. Where the converter folded them into the first convolution (EfficientNet exported as
a SavedModel or .tflite) the graph has no trace of them; there the model's response tells: fed [0, 1]
photos, such a network's outputs barely differ from one photo to the next.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from . import tflite_edit as te
from .calibration import CalibrationConfig, Preprocess

# A multiplier at most this (1/255 = 0.0039, 1/127.5 = 0.0078) or a subtracted mean at least this
# means the model's input is on the 0..255 scale; [0, 1] or [-1, 1] inputs are never scaled so.
MAX_PIXEL_MULTIPLIER = 0.02
MIN_PIXEL_MEAN = 20.0
# Outputs that differ between photos by less than FLAT_SPREAD of their size, where 0..255 pixels
# make them differ SPREAD_GAIN times more: the model expects 0..255. Measured on 8 photos: exported
# EfficientNetB0 / V2B0 0.013-0.018 at [0, 1] against 0.83 at 0..255; 30 published and zoo models
# that take scaled input 0.06-0.91 at [0, 1], none of them 10x more at 0..255.
FLAT_SPREAD = 0.03
SPREAD_GAIN = 10.0
RESPONSE_PHOTOS = 8
# ... and whose first weighted layer barely responds either: its output moves from its value on a
# black image by less than this share. A network trained on [0, 1] whose outputs carry a large offset
# (a regression head: 300 +- 5) is flat at the output too, but its first layer responds (~0.5).
FLAT_STEM = 0.05
_WEIGHTED = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV", "CONV_3D")


def own_pixel_scaling(float_model: bytes, input_name: str) -> str | None:
    """How the model scales input `input_name` (signature name) itself, when that says it expects
    0..255 pixels, e.g. "its first op multiplies pixels by 0.003922 (1/255)"; else None."""
    m = te.load(float_model)
    sg = m.subgraphs[0]
    index = None
    for sig in m.signatureDefs or []:
        for t in sig.inputs or []:
            name = t.name.decode() if isinstance(t.name, bytes) else t.name
            if name == input_name:
                index = int(t.tensorIndex)
    if index is None:
        named = [int(i) for i in te.ints(sg.inputs) if te.tensor_name(sg.tensors[i]) == input_name]
        index = named[0] if named else (int(sg.inputs[0]) if len(te.ints(sg.inputs)) == 1 else None)
    if index is None:
        return None
    readers = te.consumers(sg).get(index, [])
    if len(readers) != 1:
        return None
    op = sg.operators[readers[0]]
    name = te.op_name(m, op)
    others = [i for i in te.ints(op.inputs) if i != index]
    if name not in ("MUL", "DIV", "SUB", "ADD") or len(others) != 1:
        return None
    value = _constant(m, sg, others[0])
    if value is None or value.size == 0 or not np.all(np.isfinite(value)):
        return None
    v = value.astype(np.float64).ravel()
    first = te.ints(op.inputs)[0] == index  # SUB/DIV: the input must be the left operand
    if name == "MUL" and np.all((np.abs(v) > 0) & (np.abs(v) <= MAX_PIXEL_MULTIPLIER)):
        return f"its first op multiplies pixels by {_values(v)}{_fraction(v)}"
    if name == "DIV" and first and np.all(np.abs(v) >= 1 / MAX_PIXEL_MULTIPLIER):
        return f"its first op divides pixels by {_values(v)}"
    if name == "SUB" and first and np.all(v >= MIN_PIXEL_MEAN):
        return f"its first op subtracts {_values(v)} from pixels"
    if name == "ADD" and np.all(v <= -MIN_PIXEL_MEAN):
        return f"its first op adds {_values(v)} to pixels"
    return None


def _constant(m, sg, index: int) -> np.ndarray | None:
    value = te.constant(m, sg, index)
    if value is not None:
        return value
    producer = te.producers(sg).get(index)  # fp16 files: DEQUANTIZE of a float16 constant
    if producer is not None and te.op_name(m, sg.operators[producer]) == "DEQUANTIZE":
        return te.constant(m, sg, te.ints(sg.operators[producer].inputs)[0])
    return None


def _values(v: np.ndarray) -> str:
    shown = ", ".join(f"{x:.4g}" for x in v[:3])
    return shown if v.size == 1 else f"[{shown}{', ...' if v.size > 3 else ''}]"


def _fraction(v: np.ndarray) -> str:
    inv = 1 / float(np.abs(v).mean())
    return f" (1/{inv:.4g})" if np.allclose(np.abs(v), np.abs(v[0])) else ""


def keras_pixel_scaling(tf, model) -> str | None:
    """The same, read from a Keras model's layers before its first layer with weights: a Rescaling by
    at most MAX_PIXEL_MULTIPLIER or a Normalization by a mean of at least MIN_PIXEL_MEAN. The
    converter folds these into the first convolution (EfficientNet), leaving no trace in the graph."""
    from .sources.keras import all_layers

    L = tf.keras.layers
    for layer in all_layers(model):
        if isinstance(layer, tf.keras.Model):  # a nested model: its own layers follow it
            continue
        if isinstance(layer, L.Rescaling):
            v = np.abs(np.asarray(layer.scale, np.float64)).ravel()
            if v.size and np.all((v > 0) & (v <= MAX_PIXEL_MULTIPLIER)):
                return f"Rescaling layer {layer.name!r} multiplies pixels by {_values(v)}{_fraction(v)}"
            return None
        if isinstance(layer, L.Normalization):
            mean = getattr(layer, "mean", None)
            if mean is None:
                return None
            v = np.asarray(mean, np.float64).ravel()
            if v.size and np.all(v >= MIN_PIXEL_MEAN):
                return f"Normalization layer {layer.name!r} subtracts {_values(v)} from pixels"
            return None
        if layer.weights and not isinstance(layer, (L.Rescaling, L.Normalization)):
            return None  # a layer with weights came first: the model takes scaled input
    return None


def output_spread(outputs: dict[str, np.ndarray]) -> float:
    """How much a model's outputs (stacked on axis 0, one row a sample) differ between samples, as a
    share of their size: 0 when every sample gets the same output, up to 1. The largest over outputs."""
    spreads = [0.0]
    for y in outputs.values():
        y = y.reshape(len(y), -1).astype(np.float64)
        size = np.sqrt((y ** 2).sum(1).mean())
        if len(y) > 1 and size > 0:
            spreads.append(float(np.sqrt(((y - y.mean(0)) ** 2).sum(1).mean()) / size))
    return max(spreads)


def flat_response(cfg: CalibrationConfig, source) -> tuple[float, float] | None:
    """(spread at cfg's scale, spread at 0..255) of the float model's outputs over a few calibration
    photos, when they say the model expects 0..255 pixels; else None."""
    from .calibration import load_calibration
    from .fidelity import run_model

    def spread(samples) -> float:
        return output_spread(run_model(source.float_tflite, samples))

    def photos(c: CalibrationConfig):
        return load_calibration(replace(c, samples=RESPONSE_PHOTOS, eval_samples=0), source.inputs)

    raw_photos = photos(replace(cfg, preprocess=Preprocess.RAW, mean=None, std=None))
    if raw_photos.total < 4:
        return None  # too few photos to tell
    scaled = list(photos(cfg).calibration())
    at = spread(scaled)
    if at >= FLAT_SPREAD:
        return None
    raw = spread(list(raw_photos.calibration()))
    if raw < SPREAD_GAIN * at:
        return None
    stem = stem_response(source.float_tflite, scaled)
    return (at, raw) if stem is not None and stem < FLAT_STEM else None


def stem_response(float_model: bytes, samples: list[dict[str, np.ndarray]]) -> float | None:
    """How much the first weighted layer's output (a convolution, with its folded BatchNorm) moves
    between a black image and `samples`, as a share of its size: ~0.5 for inputs on the scale the
    network was trained on, ~1/255 of that for 255x smaller ones. None without such a layer."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    from .quiet import quiet_native

    m = te.load(float_model)
    sg = m.subgraphs[0]
    stem = next((op for op in sg.operators if te.op_name(m, op) in _WEIGHTED
                 and len(te.ints(op.inputs)) > 1 and te.constant(m, sg, te.ints(op.inputs)[1]) is not None), None)
    if stem is None or len(te.ints(sg.inputs)) != 1 or not samples:
        return None
    index, out = te.ints(sg.inputs)[0], te.ints(stem.outputs)[0]
    with quiet_native():
        interp = Interpreter(model_content=float_model, experimental_preserve_all_tensors=True,
                             experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
        interp.allocate_tensors()

        def first_layer(x: np.ndarray) -> np.ndarray:
            interp.set_tensor(index, x)
            interp.invoke()
            return interp.get_tensor(out).astype(np.float64)

        x0 = next(iter(samples[0].values()))
        black = first_layer(np.zeros_like(x0))
        moved = np.stack([first_layer(next(iter(s.values()))) - black for s in samples])
    size = np.sqrt(np.mean(black ** 2) + np.mean(moved ** 2))
    return float(np.sqrt(np.mean(moved ** 2)) / size) if size > 0 else None


def photo_scale(cfg: CalibrationConfig, source) -> tuple[CalibrationConfig, str | None]:
    """(CalibrationConfig, note or None) for `source` (a SourceModel): photos for a float image input
    of a model that scales its own pixels, or barely responds to them unless they are 0..255, are fed
    as 0..255 unless the user chose a scale, and a chosen other scale is warned about."""
    if cfg.source == "random" or not Path(cfg.source).is_dir() or len(source.inputs) != 1:
        return cfg, None
    if not str(source.inputs[0].dtype).startswith("float"):
        return cfg, None
    default = cfg.preprocess is None and cfg.mean is None and cfg.std is None
    if cfg.preprocess is Preprocess.RAW and cfg.mean is None and cfg.std is None:
        return cfg, None
    given = ("--mean/--std" if cfg.mean is not None or cfg.std is not None
             else f"--preprocess {Preprocess(cfg.preprocess or Preprocess.UNIT).value}")
    how = source.pixel_scaling or own_pixel_scaling(source.float_tflite, source.inputs[0].name)
    if how is not None:
        why, but = f"the model scales its own pixels ({how})", f", yet {given} scales them first"
    else:
        flat = flat_response(cfg, source)
        if flat is None:
            return cfg, None
        why = (f"the model expects 0..255 pixels: its outputs differ between {RESPONSE_PHOTOS} photos by "
               f"{flat[0]:.1%} at {'[0, 1]' if default else given} and by {flat[1]:.0%} at 0..255")
        but = ""
    if default:
        return replace(cfg, preprocess=Preprocess.RAW), (
            f"{why}: photos are fed as 0..255 (--preprocess raw); pass --preprocess to choose another scale")
    return cfg, f"{why}{but}: if it was trained on 0..255 pixels, --preprocess raw is what it meets on the device"
