"""Quantized MAXIMUM / MINIMUM against a constant at the end of the integer range: no-ops, removed.

TFLite's int8 (and int16) MAXIMUM and MINIMUM compare the stored integers: input and output share
one scale and zero point. XNNPACK takes neither in int8, so each one ends a delegated partition.
Where the constant quantizes to the type's lowest value (MAXIMUM) or highest (MINIMUM), the op
changes nothing: calibration put the clamp's bound at the end of the shared range, where the
integers already stop. openWakeWord's embedding model clamps with `tf.maximum(x, -0.4)` after each
LeakyReLU: 19 such ops, whose constant is -128 at the scale they share, cut its int8 graph into 20
XNNPACK partitions. The op goes and its readers read its input: the same integers, bit for bit.
"""

from __future__ import annotations

import numpy as np

from . import tflite_edit as te

CLAMPS = ("MAXIMUM", "MINIMUM")
_LIMITS = {9: (-128, 127), 7: (-32768, 32767)}  # schema TensorType INT8, INT16


def drop_noop_clamps(model: bytes) -> tuple[bytes, int]:
    """(model without the MAXIMUM / MINIMUM ops that cannot change a value, how many); `model`
    itself if none."""
    if not te.has_ops(model, CLAMPS):
        return model, 0
    m = te.load(model)
    n = 0
    for sg_i, sg in enumerate(m.subgraphs or []):
        visible = te.visible_outputs(m, sg_i)
        ops = list(sg.operators or [])
        drop = set()
        for i, op in enumerate(ops):
            name = te.op_name(m, op)
            if name not in CLAMPS:
                continue
            source = _noop_source(m, sg, op, name)
            out = te.ints(op.outputs)[0]
            if source is None or out in visible:
                continue
            for reader in ops:
                if out in te.ints(reader.inputs):
                    reader.inputs = [source if t == out else t for t in te.ints(reader.inputs)]
            drop.add(i)
        if drop:
            sg.operators = [op for i, op in enumerate(ops) if i not in drop]
            n += len(drop)
    if not n:
        return model, 0
    from .tflite_rewrite import prune

    prune(m)
    return te.pack(m), n


def _noop_source(m, sg, op, name: str) -> int | None:
    """The input `op` passes through unchanged, or None: one non-constant input and one constant,
    all three tensors of one integer type and one per-tensor scale and zero point, the output shaped
    as that input, and every constant value at the end of the range the op clamps towards."""
    ins, outs = te.ints(op.inputs), te.ints(op.outputs)
    if len(ins) != 2 or len(outs) != 1:
        return None
    consts = [te.constant(m, sg, t) for t in ins]
    if sum(c is not None for c in consts) != 1:
        return None
    k = 0 if consts[0] is not None else 1
    x, c, y = sg.tensors[ins[1 - k]], consts[k], sg.tensors[outs[0]]
    limits = _LIMITS.get(y.type)
    if limits is None or not (x.type == sg.tensors[ins[k]].type == y.type) or c.size == 0:
        return None
    params = [te.qparams(t) for t in (x, sg.tensors[ins[k]], y)]
    if any(p is None or len(p[0]) != 1 for p in params):
        return None
    if any(np.float32(p[0][0]) != np.float32(params[2][0][0]) or p[1][0] != params[2][1][0] for p in params):
        return None
    if list(te.ints(x.shape)) != list(te.ints(y.shape)):
        return None
    end = limits[0] if name == "MAXIMUM" else limits[1]
    return ins[1 - k] if bool(np.all(c == end)) else None
