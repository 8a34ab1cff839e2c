"""SPLIT ops with outputs nothing reads, written as SLICE ops for the outputs that are read.

An unrolled Keras LSTM (unroll=True: the way to a convertible recurrent model) starts from a zero
state, so the converter drops the first step's forget-gate product and leaves one output of that
step's SPLIT unread. XNNPACK allocates no memory for an unread output, and the LiteRT quantizer's
calibrator (XNNPACK on, every named tensor read) then failed on it: "Tensor data is null. Run
allocate_tensors() first" (a traceback from `edgeq convert`, a textgenrnn model). SLICEs of the
same input compute the same values for the outputs that are read.
"""

from __future__ import annotations

import numpy as np

from . import tflite_edit as te


def slice_dead_splits(model: bytes) -> tuple[bytes, int]:
    """(model with each SPLIT that has an unread output written as SLICEs, how many); `model` itself
    if there are none. SPLITs whose axis or input shape is not known stay as they are."""
    if not te.has_ops(model, ("SPLIT",)):
        return model, 0
    m = te.load(model)
    n = 0
    for sg_i, sg in enumerate(m.subgraphs or []):
        read = {t for op in sg.operators or [] for t in te.ints(op.inputs)} | te.visible_outputs(m, sg_i)
        ops = []
        for op in sg.operators or []:
            outs, ins = te.ints(op.outputs), te.ints(op.inputs)
            if te.op_name(m, op) != "SPLIT" or all(t in read for t in outs) or len(ins) != 2:
                ops.append(op)
                continue
            axis, x = te.constant(m, sg, ins[0]), sg.tensors[ins[1]]
            shape = [int(d) for d in (x.shape if x.shape is not None else [])]
            if axis is None or not shape or min(shape) < 1 or shape[int(axis) % len(shape)] % len(outs):
                ops.append(op)
                continue
            ax = int(axis) % len(shape)
            part = shape[ax] // len(outs)
            for k, out in enumerate(outs):
                if out in read:
                    begin = np.zeros(len(shape), np.int32)
                    begin[ax] = k * part
                    size = np.array(shape, np.int32)
                    size[ax] = part
                    ops.append(_slice(m, sg, ins[1], begin, size, out))
            n += 1
        sg.operators = ops
    if not n:
        return model, 0
    from .tflite_rewrite import prune

    prune(m)
    return te.pack(m), n


def _slice(m, sg, x: int, begin: np.ndarray, size: np.ndarray, out: int):
    s = te.schema()
    consts = []
    for name, value in (("begin", begin), ("size", size)):
        t = s.TensorT()
        t.name = f"{te.tensor_name(sg.tensors[out])}/slice_{name}".encode()
        sg.tensors.append(t)
        te.set_constant(m, sg, len(sg.tensors) - 1, value, new_buffer=True)
        consts.append(len(sg.tensors) - 1)
    op = s.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = te.opcode_index(m, "SLICE"), [x] + consts, [out]
    op.builtinOptionsType, op.builtinOptions = s.BuiltinOptions.SliceOptions, s.SliceOptionsT()
    return op
