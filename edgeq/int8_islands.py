"""Float islands the LiteRT quantizer leaves around ops that the int8 kernels run: folded into the op.

The quantizer's policy has no static int8 entry for LEAKY_RELU, so each one stays float between int8
layers: DEQUANTIZE -> LEAKY_RELU -> QUANTIZE. TFLite's builtin kernels and XNNPACK run LEAKY_RELU in
int8 (input and output scales of their own), and the bare TFLite converter writes it so: a Keras
CNN with LeakyReLU after every convolution (YOLO / Darknet backbones, GAN discriminators) came out of
edgeq's default level with a float island per layer where the converter's file was all int8. Here
the op reads the int8 tensor the DEQUANTIZE read and writes the one the QUANTIZE wrote (its scale and
zero point came from calibration), and the two converts go: the same values up to one rounding.

Only when the island is exactly that: an int8 per-tensor input behind a DEQUANTIZE, one float output
read by one int8 QUANTIZE and by nothing else (not a model output). `keep` names ops a plan put
off int8 on purpose.
"""

from __future__ import annotations

from typing import Collection, Sequence

from . import tflite_edit as te

FOLDABLE = frozenset({"LEAKY_RELU"})
_INT8 = 9  # schema TensorType.INT8


def fold_islands(model: bytes, keep: Collection[str] = ()) -> tuple[bytes, int]:
    """(model with each foldable float island run in int8, how many); `model` itself if none.
    `keep`: first-output names of ops to leave as they are."""
    m = te.load(model)
    n = 0
    for sg_i, sg in enumerate(m.subgraphs or []):
        visible = set(te.ints(sg.outputs)) | {int(tm.tensorIndex) for sig in m.signatureDefs or []
                                            if sig.subgraphIndex == sg_i for tm in sig.outputs or []}
        readers, producer = te.consumers(sg), te.producers(sg)
        ops = list(sg.operators or [])
        drop: set[int] = set()
        for i, op in enumerate(ops):
            ins, outs = te.ints(op.inputs), te.ints(op.outputs)
            if te.op_name(m, op) not in FOLDABLE or len(ins) != 1 or len(outs) != 1:
                continue
            if te.tensor_name(sg.tensors[outs[0]]) in keep or outs[0] in visible:
                continue
            d, after = producer.get(ins[0]), readers.get(outs[0], [])
            if d is None or d in drop or te.op_name(m, ops[d]) != "DEQUANTIZE" or len(after) != 1:
                continue
            q = after[0]
            source, target = te.ints(ops[d].inputs)[0], te.ints(ops[q].outputs)[0]
            if te.op_name(m, ops[q]) != "QUANTIZE" or not (_per_tensor_int8(sg.tensors[source])
                                                          and _per_tensor_int8(sg.tensors[target])):
                continue
            op.inputs, op.outputs = [source], [target]
            drop.add(q)
            if readers.get(ins[0]) == [i] and ins[0] not in visible:  # nothing else reads the float copy
                drop.add(d)
            n += 1
        sg.operators = [op for i, op in enumerate(ops) if i not in drop]
    if not n:
        return model, 0
    from .tflite_rewrite import prune

    prune(m)
    return te.pack(m), n


def kept_float(per_op: Sequence) -> frozenset[str]:
    """Outputs a plan (litert_quant.OpPrecision lines) puts anywhere but int8 activations: not folded."""
    from .int8_hazards import INT8_ACTIVATIONS

    return frozenset(p.output for p in per_op if p.op in FOLDABLE and p.precision not in INT8_ACTIVATIONS)


def _per_tensor_int8(t) -> bool:
    q = te.qparams(t)
    return t.type == _INT8 and q is not None and len(q[0]) == 1
