"""Joins at a float model output of tensors at very different int8 scales: written in float.

A detector exported with its decoding (YOLOv5/v8 through ONNX, NudeNet's 320n) ends in one
CONCATENATION of box coordinates in pixels (0..320) and class scores (0..1). In int8 that tensor has
one scale for both, 1.24 a step on NudeNet, so each score, written at 1/256 by its own LOGISTIC, is
requantized to 0 or 1 step: every detection is lost, while the output's cosine to float reads
0.9998 (the boxes carry it). The TFLite converter and the LiteRT quantizer both write it so.

Where such a CONCATENATION's int8 output is read only by the DEQUANTIZE of a float model output
(through RESHAPE / TRANSPOSE / SQUEEZE / EXPAND_DIMS at most), it is written in float: each input
dequantized from its own int8 tensor (from before an int8 -> int8 QUANTIZE that only fed the
join), the join float, writing the output itself. Each input keeps its own scale; the float work
moves from one DEQUANTIZE of the output to one per input.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import tflite_edit as te

# An input whose own int8 step is this many times finer than the join's loses 4+ bits in it.
FINER = 16.0
# Ops that only move values, between the join and the output (a [1, 4 + classes, anchors] head
# transposed or reshaped for its consumer): float along with it.
LAYOUT = frozenset({"RESHAPE", "TRANSPOSE", "SQUEEZE", "EXPAND_DIMS"})
_INT8 = 9  # schema TensorType.INT8


@dataclass(frozen=True)
class FloatJoin:
    output: str  # the model output it writes
    inputs: int
    finer: float  # the largest ratio of the join's step to an input's own


def float_joins(model: bytes) -> tuple[bytes, tuple[FloatJoin, ...]]:
    """(model with each such join written in float, what was changed); `model` itself if none."""
    if not te.has_ops(model, {"CONCATENATION"}):
        return model, ()
    m = te.load(model)
    done: list[FloatJoin] = []
    for sg_i, sg in enumerate(m.subgraphs or []):
        visible = te.visible_outputs(m, sg_i)
        readers, producer = te.consumers(sg), te.producers(sg)
        ops = list(sg.operators or [])
        drop: set[int] = set()
        added: dict[int, list] = {}  # op index -> DEQUANTIZE ops to run before it
        for i, op in enumerate(ops):
            outs = te.ints(op.outputs)
            if te.op_name(m, op) != "CONCATENATION" or len(outs) != 1 or outs[0] in visible:
                continue
            step = _step(sg.tensors[outs[0]])
            tail, t = [], outs[0]  # layout ops between the join and the output's DEQUANTIZE
            while len(after := readers.get(t, [])) == 1 and te.op_name(m, ops[after[0]]) in LAYOUT:
                nxt = te.ints(ops[after[0]].outputs)
                if len(nxt) != 1 or nxt[0] in visible or _step(sg.tensors[nxt[0]]) != step:
                    break
                tail.append(after[0])
                t = nxt[0]
            if len(after) != 1 or te.op_name(m, ops[after[0]]) != "DEQUANTIZE" or step is None:
                continue
            d = after[0]
            final = te.ints(ops[d].outputs)[0]
            if final not in visible:
                continue
            sources, bypass = [], []
            for x in te.ints(op.inputs):
                p = producer.get(x)
                if (p is not None and te.op_name(m, ops[p]) == "QUANTIZE" and readers.get(x) == [i]
                        and x not in visible and _step(sg.tensors[te.ints(ops[p].inputs)[0]]) is not None):
                    bypass.append(p)
                    x = te.ints(ops[p].inputs)[0]  # the input at its own scale, before the requantize
                sources.append(x)
            steps = [_step(sg.tensors[x]) for x in sources]
            if any(s is None for s in steps) or step / min(steps) < FINER:
                continue
            from .tflite_rewrite import _new_tensor

            deq = []
            for x in sources:
                f = _new_tensor(sg, sg.tensors[x], "dequant")
                q = te.schema().OperatorT()
                q.opcodeIndex, q.inputs, q.outputs = ops[d].opcodeIndex, [x], [f]  # the int8 DEQUANTIZE's version
                deq.append(q)
            added[i] = deq
            op.inputs = [te.ints(q.outputs)[0] for q in deq]
            op.opcodeIndex = te.opcode_index(m, "CONCATENATION", 1)  # the float kernels' versions
            for j in tail:  # float too, the last one writing the output
                sg.tensors[te.ints(ops[j].inputs)[0]].type = 0
                sg.tensors[te.ints(ops[j].inputs)[0]].quantization = None
                ops[j].opcodeIndex = te.opcode_index(m, te.op_name(m, ops[j]), 1)
            (ops[tail[-1]] if tail else op).outputs = [final]
            drop |= {d, *bypass}
            done.append(FloatJoin(te.tensor_name(sg.tensors[final]), len(sources), step / min(steps)))
        if added:
            sg.operators = [q for j, op in enumerate(ops) if j not in drop for q in (*added.get(j, ()), op)]
    if not done:
        return model, ()
    from .tflite_rewrite import prune

    prune(m)
    return te.pack(m), tuple(done)


def _step(t) -> float | None:
    """The tensor's int8 step if it is int8 with one scale, else None."""
    q = te.qparams(t)
    if t.type != _INT8 or q is None or len(q[0]) != 1 or not np.isfinite(q[0][0]) or q[0][0] <= 0:
        return None
    return float(q[0][0])


def written(info) -> list:
    """The float joins in a model (a tflite_model.ModelInfo) as float_joins leaves them: a float
    CONCATENATION of DEQUANTIZEd int8 tensors writing a model output, directly or through float
    LAYOUT ops; those ops (OpInfo list, a join and then its layout ops)."""
    producer = {(op.subgraph, t.index): op for op in info.ops for t in op.outputs}
    readers: dict[tuple[int, int], list] = {}
    for op in info.ops:
        for t in op.inputs:
            readers.setdefault((op.subgraph, t.index), []).append(op)
    outputs = {t.index for t in info.outputs}
    found = []
    for op in info.ops:
        if op.name != "CONCATENATION" or op.subgraph != 0 or len(op.outputs) != 1 or op.outputs[0].dtype != "float32":
            continue
        deq = [producer.get((0, t.index)) for t in op.inputs]
        if not deq or not all(p is not None and p.name == "DEQUANTIZE" and p.inputs[0].dtype == "int8" for p in deq):
            continue
        chain, t = [op], op.outputs[0]
        while t.index not in outputs and len(after := readers.get((0, t.index), [])) == 1 and after[0].name in LAYOUT:
            chain.append(after[0])
            t = after[0].outputs[0]
        if t.index in outputs:
            found += chain
    return found


def note(ops) -> str | None:
    """convert's warning for the float joins of the written model (OpInfo list), or None."""
    if not ops:
        return None
    names = ", ".join(f"#{op.index} {op.name}" for op in ops)
    return (f"{len(ops)} op(s) written float at the model output ({names}): a join of int8 tensors whose "
            f"scales differ {FINER:.0f}x or more (a detector's boxes and scores), which one int8 scale would "
            "flatten to a few levels")
