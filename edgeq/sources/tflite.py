"""A float .tflite as a source: re-quantized with the LiteRT quantizer (TF cannot re-convert it).

Published files are checked first (fast, flatbuffer only) for what edgeq cannot quantize, so the user
hears it in one line before any slow step; then `tflite_rewrite` turns float16/sparse weights and
old operator codes into the plain float32 graph the quantizer expects, and a SignatureDef is added
where there is none.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ModelFormatError, first_line
from ..files import sha256_file
from ..signature import default_signature, ensure_signature, signature_specs
from ..tflite_model import ModelInfo, read_model
from ..tflite_rewrite import rewrite_float_model
from . import SourceModel

# Ops that run other subgraphs. The quantizer and edgeq's per-op plan work on subgraph 0 only.
CONTROL_FLOW_OPS = frozenset({"IF", "WHILE", "CALL_ONCE", "CALL", "STABLEHLO_WHILE", "STABLEHLO_CASE",
                              "STABLEHLO_COMPOSITE"})
_SHOWN = 4  # op names listed in a refusal


def load_tflite(path: Path, scheme: str = "int8", **_) -> SourceModel:
    """`scheme` (a quantize.Scheme value) decides what can be refused up front: control flow
    quantizes with "dynamic" but not with calibrated int8/int16x8."""
    data = path.read_bytes()
    info = read_model(data, name=str(path))
    check_supported(info, str(path), str(getattr(scheme, "value", scheme)), data)
    try:
        return _load(path, data, info)
    except _INTERNAL as e:  # a damaged file that passed the flatbuffer check breaks a rewrite or the interpreter
        raise ModelFormatError(f"{path}: the model is inconsistent ({type(e).__name__}: {first_line(e)}); the file "
                               "may be damaged: copy or export it again (if it runs elsewhere, report this)") from None


# What the rewrites and the interpreter raise on a graph that does not hold together (a tensor index past
# the end: KeyError in prune; a RESHAPE of 368784 elements to 144: the interpreter's RuntimeError).
_INTERNAL = (KeyError, IndexError, ValueError, RuntimeError, TypeError, AttributeError)


def _load(path: Path, data: bytes, info) -> SourceModel:
    data, report = rewrite_float_model(data)
    notes = list(report.notes())
    custom = sorted({op.name[len("CUSTOM:"):] for op in info.ops if op.is_custom})
    if custom:  # they loaded: XNNPACK provides them (e.g. MediaPipe's Convolution2DTransposeBias)
        notes.append(f"custom op(s) {', '.join(custom)} stay float and run only where the runtime or its "
                     "XNNPACK delegate provides them")
    data, added = ensure_signature(data)
    if added:
        notes.append("the input had no SignatureDef; edgeq added 'serving_default' (graph unchanged)")
    data, key = default_signature(data, str(path))
    ins, outs = signature_specs(data)
    data, description = _batch_one(data, ins)
    if description:
        ins, outs = signature_specs(data)
    return SourceModel("tflite", path, sha256_file(path), data, ins, outs, None, None, tuple(notes),
                       description, signature_key=key)


def _batch_one(data: bytes, ins) -> tuple[bytes, str]:
    """A model whose inputs are dynamic in the batch alone, with ops that compute shapes at run time
    (a Keras Reshape/Flatten converted with a dynamic batch: SHAPE -> STRIDED_SLICE -> PACK ->
    RESHAPE), pinned to batch 1 with those ops folded into constants (shapes.pin_tflite); edgeq runs
    batch 1 everywhere, so no number changes. (model, description) or (data, "")."""
    import numpy as np

    from .shapes import is_dynamic, pin_tflite

    if not any(s.shape and s.shape[0] < 0 for s in ins) or any(is_dynamic(s.shape) for s in ins):
        return data, ""
    before = read_model(data).ops
    if not any(op.name == "SHAPE" for op in before):
        return data, ""
    pinned = pin_tflite(data, {s.name: np.zeros((1, *s.shape[1:]), s.dtype) for s in ins})
    folded = len(before) - len(read_model(pinned).ops)
    if not folded:
        return data, ""
    return pinned, (f"pinned to batch 1: {folded} op(s) that computed shapes of the dynamic batch at run time "
                    "(SHAPE, STRIDED_SLICE, PACK, ...) are constants now; XNNPACK and the Edge TPU do not run them")


def check_supported(info: ModelInfo, name: str, scheme: str = "int8", data: bytes = b"") -> None:
    """Refuse, in one line naming the ops, what edgeq cannot quantize: an already quantized model,
    custom ops (the LiteRT interpreter cannot even load them unless their kernels are registered, so
    the model can be neither calibrated nor run) and, for calibrated schemes, control flow (the LiteRT
    quantizer collects no ranges inside called subgraphs; dynamic-range needs none)."""
    quantized = [op for op in info.ops if op.precision in ("int8", "int16x8", "hybrid")]
    if quantized:
        raise ModelFormatError(f"{name}: already quantized ({len(quantized)} quantized ops: "
                               f"{_names(quantized)}); pass the float model it was made from")
    custom = [op for op in info.ops if op.is_custom]
    if custom and not custom_ops_load(data):
        raise ModelFormatError(
            f"{name}: {len(custom)} custom op(s) ({_names(custom, strip='CUSTOM:')}) that the LiteRT "
            "interpreter cannot load without their kernels, so edgeq can neither calibrate nor run the "
            "model; export it without custom ops (e.g. the variant of the model that stops before them)")
    if scheme not in ("int8", "int16x8"):
        return
    flow = [op for op in info.ops if op.name in CONTROL_FLOW_OPS]
    subgraphs = len({op.subgraph for op in info.ops})
    if not flow and len(info.signature_keys) > 1 and subgraphs > 1:  # one graph per signature
        raise ModelFormatError(
            f"{name}: {len(info.signature_keys)} signatures ({', '.join(info.signature_keys)}), each its own "
            "subgraph; edgeq quantizes one: export it alone (TFLiteConverter.from_saved_model(DIR, "
            "signature_keys=[KEY])), or convert the SavedModel (its serving_default)")
    if flow or subgraphs > 1:
        what = f"control flow ({_names(flow)})" if flow else f"{subgraphs} subgraphs"
        raise ModelFormatError(
            f"{name}: {what}: --scheme {scheme} cannot calibrate ops inside called subgraphs; use "
            "--scheme dynamic (int8 weights, float activations), or convert the original Keras/SavedModel")


def custom_ops_load(data: bytes) -> bool:
    """Does the LiteRT interpreter (with its default XNNPACK delegate) load and prepare this model?
    XNNPACK implements a few custom ops itself; any other needs its kernel registered."""
    from ai_edge_litert.interpreter import Interpreter

    from ..quiet import quiet_native
    try:
        with quiet_native():
            Interpreter(model_content=data, num_threads=1).allocate_tensors()
    except (ValueError, RuntimeError):
        return False
    return True


def _names(ops, strip: str = "") -> str:
    counts: dict[str, int] = {}
    for op in ops:
        name = op.name[len(strip):] if strip and op.name.startswith(strip) else op.name
        counts[name] = counts.get(name, 0) + 1
    shown = [f"{n} x{c}" if c > 1 else n for n, c in list(counts.items())[:_SHOWN]]
    more = len(counts) - _SHOWN
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")
