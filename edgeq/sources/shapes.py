"""Static input shapes: `--input-shape` parsing and pinning a source's dynamic dimensions.

LiteRT models on devices run static shapes, and the quantizers' calibrators cannot size a
convolution whose height and width are unknown (XNNPACK fails to prepare). Keras, SavedModel and
torch.export sources may declare dynamic dimensions (keras.applications.MobileNetV3 takes any
image size); these helpers check the shapes a user (or the calibration data) gives against them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import ModelFormatError

Shape = tuple  # dimensions, None where the source leaves one dynamic


def parse_shape(text: str) -> tuple[int, ...]:
    """'1,3,224,224' (or 1x3x224x224) -> (1, 3, 224, 224); ValueError naming the expected form."""
    # one separator, every field a size: '1,x,8,8,3' and '1,,8,8,3' were read as 1,8,8,3
    parts = [p.strip() for p in text.strip().split("," if "," in text else "x")]
    if not parts or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"{text!r} is not a shape; give positive sizes like 1,3,224,224")
    return tuple(int(p) for p in parts)


def dims(shape: Shape) -> str:
    return ",".join("?" if d is None or d < 0 else str(d) for d in shape)


def is_dynamic(shape: Shape) -> bool:
    """Dynamic beyond the batch dimension (a dynamic batch is pinned to 1 everywhere)."""
    return any(d is None or d < 0 for d in shape[1:])


def check_given(inputs: Sequence[tuple[str, Shape]], given: Sequence[tuple[int, ...]], path: Path,
                origin: str = "--input-shape") -> list[str]:
    """Check one given shape per input (in order) against the declared ones; the notes say what was
    pinned. Raises ModelFormatError naming the input that does not fit."""
    if len(given) != len(inputs):
        raise ModelFormatError(f"{path}: the model has {len(inputs)} input(s); {origin} was given "
                               f"{len(given)} time(s) (one per input, in order)")
    for (name, declared), shape in zip(inputs, given):
        text = ",".join(map(str, shape))
        if len(shape) != len(declared) or any(d is not None and d >= 0 and d != g for d, g in zip(declared, shape)):
            raise ModelFormatError(f"{path}: {origin} {text} does not fit input {name} "
                                   f"({dims(declared)}, ? = dynamic)")
        if any(g < 1 for g in shape):
            raise ModelFormatError(f"{path}: {origin} {text} has a dimension < 1")
    return [f"dynamic dimensions of {name} ({dims(declared)}) pinned to {','.join(map(str, shape))} by {origin}"
            for (name, declared), shape in zip(inputs, given) if is_dynamic(declared)]


def suggestion(shape: Shape, example: Sequence[int] | None = None) -> str:
    """An --input-shape value for a dynamic input: its example's sizes, else 224 for an image's
    height and width (the common ImageNet size) and 128 for other dimensions."""
    if example is not None:
        return ",".join(map(str, (1, *example[1:])))
    image = len(shape) == 4 and (shape[3] in (1, 3, 4) or shape[1] in (1, 3, 4))
    fill = 224 if image else 128
    return ",".join(["1"] + [str(fill if d is None or d < 0 else d) for d in shape[1:]])


def dynamic_inputs_error(source, path: Path, images: bool, fix: str | None = None) -> str | None:
    """The message for a source whose inputs stay dynamic beyond the batch, or None; `fix` replaces
    the default advice (an --input-shape for that input)."""
    bad = [s for s in source.inputs if is_dynamic(s.shape)]
    if not bad:
        return None
    s = bad[0]
    why = "image calibration resizes photos to the input's size" if images else "devices run static shapes"
    fix = fix or f"pass --input-shape {suggestion(s.shape)} (the size the model is meant to run at)"
    return f"{path}: input {s.name!r} has dynamic dimensions ({dims(s.shape)}) and {why}; {fix}"



def pin_tflite(model: bytes, sample: dict) -> bytes:
    """A .tflite with dynamic dimensions written static at the shapes of `sample` (one input sample,
    batch 1, keyed by signature input name): LiteRT's own shape inference (inputs resized, one run
    for tensors sized at run time) gives every tensor of the main graph its shape, and the file
    stores those in place of its -1s. The ops that computed shapes at run time (SHAPE and what
    derives a value from it alone: STRIDED_SLICE, PACK, ... feeding a RESHAPE) are then replaced by
    the constants they computed (fold_shape_ops): XNNPACK runs none of them, nor a RESHAPE whose
    target is not a constant, and the Edge TPU has no SHAPE op."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    from .. import tflite_edit as te
    from ..quiet import quiet_native

    m = te.load(model)
    sg = m.subgraphs[0]
    by_name = {te.tensor_name(sg.tensors[i]): int(i) for i in sg.inputs}
    if m.signatureDefs:
        by_name.update({(t.name.decode() if isinstance(t.name, bytes) else t.name): int(t.tensorIndex)
                        for t in m.signatureDefs[0].inputs})
    feed = {by_name[name]: np.asarray(x) for name, x in sample.items() if name in by_name}
    with quiet_native():  # XNNPACK cannot prepare some resized graphs: the builtin kernels infer shapes
        interp = Interpreter(model_content=model, experimental_preserve_all_tensors=True,
                             experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
        for index, x in feed.items():
            interp.resize_tensor_input(index, list(x.shape), strict=False)
        interp.allocate_tensors()
        for d in interp.get_input_details():
            if d["index"] in feed:
                interp.set_tensor(d["index"], feed[d["index"]].astype(d["dtype"], copy=False))
        interp.invoke()
        runtime = {d["index"]: [int(v) for v in d["shape"]] for d in interp.get_tensor_details()}
        for i, t in enumerate(sg.tensors):
            if t.shapeSignature is not None and i in runtime and len(runtime[i]) == len(t.shapeSignature):
                t.shape = runtime[i]
                t.shapeSignature = None
        fold_shape_ops(m, interp.get_tensor)
    return te.pack(m)


# Ops whose output shape follows from their inputs' values, not only their shapes: a SHAPE of what
# they write is data, not a constant.
_DATA_SHAPED = {"WHERE", "NON_MAX_SUPPRESSION_V4", "NON_MAX_SUPPRESSION_V5", "UNIQUE", "SPARSE_TO_DENSE",
                "RANGE"}
# Inputs (by position) that give an op its output shape: where one is neither a constant nor computed
# from shapes, the output's shape depends on data.
_SHAPE_ARGS = {"RESHAPE": (1,), "FILL": (0,), "BROADCAST_TO": (1,), "SLICE": (1, 2), "STRIDED_SLICE": (1, 2, 3),
               "TILE": (1,), "PAD": (1,), "PADV2": (1,), "MIRROR_PAD": (1,), "RESIZE_BILINEAR": (1,),
               "RESIZE_NEAREST_NEIGHBOR": (1,), "EXPAND_DIMS": (1,), "TRANSPOSE": (1,), "SPLIT": (0,),
               "SPLIT_V": (1, 2), "SUM": (1,), "MEAN": (1,), "REDUCE_MAX": (1,), "REDUCE_MIN": (1,),
               "REDUCE_PROD": (1,), "REDUCE_ANY": (1,), "ONE_HOT": (1,), "TRANSPOSE_CONV": (0,), "ARG_MAX": (1,),
               "ARG_MIN": (1,), "TOPK_V2": (1,), "SPACE_TO_BATCH_ND": (1, 2), "BATCH_TO_SPACE_ND": (1, 2)}
# Random ops are never replaced by their value (nor tflite_edit.STATEFUL_OPS).
_RANDOM = {"RANDOM_STANDARD_NORMAL", "RANDOM_UNIFORM", "MULTINOMIAL"}
# A computed value larger than this stays computed (a FILL of a shape would bloat the file).
_MAX_FOLDED = 1024


def fold_shape_ops(m, value) -> int:
    """Replace the ops of subgraph 0 that compute values from static shapes alone (SHAPE of a tensor
    whose shape no data decides, and ops of such values and constants) by constants read with
    value(tensor index) from a run; the ops removed (dead tensors pruned). `m` is changed in place."""
    from .. import tflite_edit as te
    from ..tflite_rewrite import prune

    sg = m.subgraphs[0]
    const = {i for i, t in enumerate(sg.tensors) if te.constant(m, sg, i) is not None}
    outputs = set(te.ints(sg.outputs))
    known: set[int] = set()  # values computed from shapes alone
    data_shaped: set[int] = set()  # tensors whose shape depends on data
    folded: list[int] = []
    for k, op in enumerate(sg.operators):
        name = te.op_name(m, op)
        ins = te.ints(op.inputs)
        outs = te.ints(op.outputs)
        small = all(int(np.prod(te.ints(sg.tensors[o].shape))) <= _MAX_FOLDED
                    and sg.tensors[o].shapeSignature is None for o in outs)
        if name == "SHAPE":
            static = sg.tensors[ins[0]].shapeSignature is None and ins[0] not in data_shaped
            if static and small and not set(outs) & outputs:
                known.update(outs)
                folded.append(k)
            continue
        used = [i for i in ins if i >= 0]
        if (used and all(i in known or i in const for i in used) and any(i in known for i in used) and small
                and not set(outs) & outputs and not name.startswith("CUSTOM")
                and name not in _DATA_SHAPED and name not in _RANDOM and name not in te.STATEFUL_OPS):
            known.update(outs)
            folded.append(k)
            continue
        shape_args = [ins[j] for j in _SHAPE_ARGS.get(name, ()) if j < len(ins) and ins[j] >= 0]
        if (name in _DATA_SHAPED or name.startswith("CUSTOM") or any(i in data_shaped for i in used)
                or any(i not in known and i not in const for i in shape_args)):
            data_shaped.update(outs)
    if not folded:
        return 0
    drop = set(folded)
    read = {i for k, op in enumerate(sg.operators) if k not in drop for i in te.ints(op.inputs)}
    for t in known & read:  # the values the remaining ops read become constants
        te.set_constant(m, sg, t, np.asarray(value(t)), new_buffer=True)
    sg.operators = [op for k, op in enumerate(sg.operators) if k not in drop]
    prune(m)
    return len(folded)
