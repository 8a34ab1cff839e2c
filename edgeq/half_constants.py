"""Large float32 constants of an int4 model stored as float16 behind a DEQUANTIZE.

int4 plans are chosen for size. What the LiteRT quantizer leaves float32 in them is weights kept
float on purpose (a plan's float fallback: left alone) and constants no weight layer reads:
MiniLM's position embeddings (1x128x384, 196 KB: litert-torch folds the position lookup into a
constant added to every sequence) are 1.5 % of its 12.9 MB int4-b128 file, as much as a third of a
384x1536 layer at 8 bits under `--max-size 13MB`.

Each float32 constant of at least INT4_MIN_WEIGHT_ELEMENTS values that is read by no op with a
weight operand (tflite_ops.WEIGHT_OPERAND: its weights, biases and tables stay as the plan made
them), is not a graph output and fits float16's range is stored as float16 and read through a new
DEQUANTIZE (op version 3, as TFLite's float16 export writes it). The runtime expands it once, when
the model loads (dequantize.cc keeps a constant input's result; XNNPACK unpacks static float16
inputs of DEQUANTIZE itself), so the ops reading it still see float32 and run as before; values keep
11 significant bits (relative error <= 2^-11, below int4 weights' by two orders of magnitude).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import tflite_edit as te
from .tflite_ops import INT4_MIN_WEIGHT_ELEMENTS, WEIGHT_OPERAND

FLOAT32 = 0  # schema TensorType
DEQUANTIZE_FP16_VERSION = 3  # tensorflow/lite/tools/versioning/op_version.cc: float16 input
_FP16_MAX = float(np.finfo(np.float16).max)


@dataclass(frozen=True)
class HalvedConstant:
    tensor: str
    shape: tuple[int, ...]
    saved: int  # bytes


def halve_float_constants(model: bytes, min_elements: int = INT4_MIN_WEIGHT_ELEMENTS
                          ) -> tuple[bytes, list[HalvedConstant]]:
    """`model` with its large non-weight float32 constants as float16 behind a DEQUANTIZE (see the
    module doc), and what was halved; the same bytes when nothing qualifies."""
    m = te.load(model)
    halved: list[HalvedConstant] = []
    for sg in m.subgraphs or []:
        readers = te.consumers(sg)
        outputs = set(te.ints(sg.outputs))
        before: dict[int, list] = {}  # op index -> the DEQUANTIZE ops that go right before it
        for index in range(len(sg.tensors)):
            value = _candidate(m, sg, index, readers.get(index, []), outputs, min_elements)
            if value is None:
                continue
            # Just before its first reader: first of all ops, XNNPACK gave the DEQUANTIZE a partition of
            # its own (MiniLM: 2 partitions instead of 1); next to its reader it joins the reader's.
            before.setdefault(min(readers[index]), []).append(_halve(m, sg, index, value))
            halved.append(HalvedConstant(te.tensor_name(sg.tensors[index]), tuple(value.shape), value.nbytes // 2))
        if before:
            sg.operators = [new for i, op in enumerate(sg.operators) for new in before.get(i, []) + [op]]
    return (te.pack(m) if halved else model), halved


def _candidate(m, sg, index: int, readers: list[int], outputs: set[int], min_elements: int) -> np.ndarray | None:
    t = sg.tensors[index]
    if t.type != FLOAT32 or not readers or index in outputs or t.sparsity is not None:
        return None
    if t.quantization is not None and t.quantization.scale is not None and len(t.quantization.scale):
        return None
    if any(te.op_name(m, sg.operators[i]) in WEIGHT_OPERAND for i in readers):
        return None
    value = te.constant(m, sg, index)
    if value is None or value.size < min_elements or not np.all(np.abs(value) <= _FP16_MAX):
        return None
    return value


def _halve(m, sg, index: int, value: np.ndarray):
    """Move tensor `index`'s data into a new float16 tensor; `index` becomes a DEQUANTIZE's output."""
    s = te.schema()
    t = sg.tensors[index]
    half = s.TensorT()
    half.name = f"{te.tensor_name(t)}/fp16".encode()
    half.shape = np.asarray(value.shape, dtype=np.int32)
    sg.tensors.append(half)
    h = len(sg.tensors) - 1
    old_buffer, shared = t.buffer, te.buffer_shared(m, t.buffer)
    if not shared:  # reuse the float32 buffer for the float16 bytes
        half.buffer = old_buffer
    te.set_constant(m, sg, h, value.astype(np.float16), new_buffer=shared)
    t.buffer = 0  # no data: the DEQUANTIZE writes it
    op = s.OperatorT()
    op.opcodeIndex = te.opcode_index(m, "DEQUANTIZE", DEQUANTIZE_FP16_VERSION)
    op.inputs, op.outputs = [h], [index]
    return op
