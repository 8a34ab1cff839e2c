"""Float islands the LiteRT quantizer leaves around ops that the int8 kernels run: folded into the op.

The quantizer's policy has no static int8 entry for some ops, so each one stays float between int8
layers: DEQUANTIZE -> op -> QUANTIZE. TFLite's builtin kernels (and XNNPACK for most) run them in
int8, and the bare TFLite converter writes several so:
- LEAKY_RELU, ELU and RELU_0_TO_1 (where int8_activation_model has not split it) compute with
  scales of their own: a Keras CNN with LeakyReLU after every
  convolution (YOLO / Darknet backbones, GAN discriminators) came out of edgeq's default level with
  a float island per layer where the converter's file was all int8. The op reads the int8 tensor the
  DEQUANTIZE read and writes the one the QUANTIZE wrote (its scale and zero point came from
  calibration): the same values up to one rounding.
- SPACE_TO_BATCH_ND / BATCH_TO_SPACE_ND only move values, and their int8 kernels need one scale in
  and out: the converter writes every dilated Keras Conv2D as SPACE_TO_BATCH_ND -> CONV_2D ->
  BATCH_TO_SPACE_ND, so each dilated layer had two islands. TILE too (ESRGAN-slim repeats its
  input image to add it to the upsampled one: two islands where the converter wrote int8). The op
  writes a tensor with its input's scale, and an int8 QUANTIZE requantizes it to the one
  calibration gave, where they differ.

Only when the island is exactly that: an int8 per-tensor input behind a DEQUANTIZE (or a float
tensor, a model input, that an earlier QUANTIZE writes in int8 for other readers), one float output
read by one int8 QUANTIZE and by nothing else (not a model output), any other input a constant.
`keep` names ops a plan put off int8 on purpose.
"""

from __future__ import annotations

from typing import Collection, Sequence

import numpy as np

from . import tflite_edit as te

# op -> its int8 op version (tensorflow/lite/tools/versioning/op_version.cc)
OWN_SCALE = {"LEAKY_RELU": 1, "ELU": 1, "RELU_0_TO_1": 1}
SAME_SCALE = {"SPACE_TO_BATCH_ND": 2, "BATCH_TO_SPACE_ND": 2, "TILE": 3}
FOLDABLE = frozenset(OWN_SCALE) | frozenset(SAME_SCALE)
_INT8 = 9  # schema TensorType.INT8


def fold_islands(model: bytes, keep: Collection[str] = ()) -> tuple[bytes, int]:
    """(model with each foldable float island run in int8, how many); `model` itself if none.
    `keep`: first-output names of ops to leave as they are."""
    if not te.has_ops(model, FOLDABLE):
        return model, 0
    m = te.load(model)
    n = 0
    for sg_i, sg in enumerate(m.subgraphs or []):
        visible = te.visible_outputs(m, sg_i)
        readers, producer = te.consumers(sg), te.producers(sg)
        ops = list(sg.operators or [])
        drop: set[int] = set()
        early: dict[int, list[int]] = {}  # op -> QUANTIZEs moved to run just before it
        for i, op in enumerate(ops):
            name = te.op_name(m, op)
            ins, outs = te.ints(op.inputs), te.ints(op.outputs)
            if name not in FOLDABLE or not ins or len(outs) != 1 or outs[0] in visible:
                continue
            if te.tensor_name(sg.tensors[outs[0]]) in keep or any(te.constant(m, sg, t) is None for t in ins[1:]):
                continue
            d, after = producer.get(ins[0]), readers.get(outs[0], [])
            if len(after) != 1:
                continue
            if d is not None and d not in drop and te.op_name(m, ops[d]) == "DEQUANTIZE":
                source = te.ints(ops[d].inputs)[0]
            else:  # a float tensor (a model input) that a QUANTIZE also writes in int8 for others
                d = None
                qs = [r for r in readers.get(ins[0], []) if r != i and te.op_name(m, ops[r]) == "QUANTIZE"]
                if not qs:
                    continue
                source = te.ints(ops[qs[0]].outputs)[0]
                if qs[0] > i and not any(qs[0] in js for js in early.values()):
                    early.setdefault(i, []).append(qs[0])  # it reads only what this op reads: run it first
            q, mover = after[0], None
            if name in OWN_SCALE and te.op_name(m, ops[q]) in SAME_SCALE and q not in drop:
                # ELU -> SPACE_TO_BATCH_ND -> QUANTIZE (a dilated conv after an ELU): both, at the QUANTIZE's scale
                x_outs = te.ints(ops[q].outputs)
                further = readers.get(x_outs[0], []) if len(x_outs) == 1 else []
                if (len(further) == 1 and x_outs[0] not in visible
                        and all(te.constant(m, sg, t) is not None for t in te.ints(ops[q].inputs)[1:])):
                    mover, q = q, further[0]
            target = te.ints(ops[q].outputs)[0]
            if te.op_name(m, ops[q]) != "QUANTIZE" or not (_per_tensor_int8(sg.tensors[source])
                                                          and _per_tensor_int8(sg.tensors[target])):
                continue
            op.inputs = [source] + ins[1:]
            if mover is not None:  # this op writes int8 at the target's scale, the mover carries it through
                op.outputs = [_int8_like(sg, outs[0], sg.tensors[target])]
                ops[mover].outputs = [target]
                ops[mover].opcodeIndex = te.opcode_index(m, te.op_name(m, ops[mover]),
                                                         SAME_SCALE[te.op_name(m, ops[mover])])
                drop.add(q)
            elif name in SAME_SCALE and not _same_params(sg.tensors[source], sg.tensors[target]):
                # the op keeps its input's scale; the QUANTIZE requantizes int8 -> int8 to calibration's
                moved = _int8_like(sg, outs[0], sg.tensors[source])
                op.outputs = [moved]
                ops[q].inputs = [moved]  # kept: an int8 -> int8 requantize
            else:
                op.outputs = [target]
                drop.add(q)
            op.opcodeIndex = te.opcode_index(m, name, {**OWN_SCALE, **SAME_SCALE}[name])
            if d is not None and readers.get(ins[0]) == [i] and ins[0] not in visible:  # nothing else reads the float copy
                drop.add(d)
            n += 1
        moved = {j for js in early.values() for j in js}
        sg.operators = [ops[j] for i in range(len(ops)) if i not in drop and i not in moved
                        for j in (*early.get(i, ()), i)]
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


def _same_params(a, b) -> bool:
    (sa, za), (sb, zb) = te.qparams(a), te.qparams(b)
    return bool(np.float32(sa[0]) == np.float32(sb[0]) and za[0] == zb[0])


def _int8_like(sg, float_index: int, params_from) -> int:
    """The float tensor `float_index` retyped int8 with `params_from`'s quantization (its index)."""
    t = sg.tensors[float_index]
    t.type = _INT8
    q = te.schema().QuantizationParametersT()
    src = params_from.quantization
    q.scale, q.zeroPoint = list(src.scale), list(src.zeroPoint)
    t.quantization = q
    return float_index
