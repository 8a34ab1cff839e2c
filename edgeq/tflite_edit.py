"""Edit a .tflite flatbuffer: LiteRT's object API (schema_py_generated ModelT) in, bytes out.

Graph rewrites (fp16 weight folding, densifying, shared int8 scales) and weight-level accuracy
methods (equalization, bias correction, learned rounding) all read and write constant tensors
through here, so there is one way to unpack, edit and repack a model.
"""

from __future__ import annotations

import numpy as np

# TensorType enum value -> numpy dtype (schema.fbs); types numpy lacks (e.g. INT4) are absent.
_NP = {0: np.float32, 1: np.float16, 2: np.int32, 3: np.uint8, 4: np.int64, 6: np.bool_, 7: np.int16,
       9: np.int8, 10: np.float64, 12: np.uint64, 15: np.uint32, 16: np.uint16}


def schema():
    from ai_edge_litert import schema_py_generated as s
    return s


def load(model: bytes):
    """The whole model as a mutable ModelT."""
    return schema().ModelT.InitFromPackedBuf(bytearray(model), 0)


def pack(m) -> bytes:
    import flatbuffers

    b = flatbuffers.Builder(1 << 20)
    b.Finish(m.Pack(b), file_identifier=b"TFL3")
    return bytes(b.Output())


def op_name(m, op) -> str:
    """Builtin name of an OperatorT (custom ops as CUSTOM:<code>)."""
    s = schema()
    code = m.operatorCodes[op.opcodeIndex]
    num = max(code.builtinCode, code.deprecatedBuiltinCode)
    names = {v: k for k, v in vars(s.BuiltinOperator).items() if not k.startswith("_")}
    name = names.get(num, f"UNKNOWN_{num}")
    if name == "CUSTOM":
        cc = code.customCode
        name = "CUSTOM:" + (cc.decode() if isinstance(cc, bytes) else str(cc or "?"))
    return name


def tensor_name(t) -> str:
    return t.name.decode("utf-8", "replace") if isinstance(t.name, bytes) else str(t.name or "")


def constant(m, sg, index: int) -> np.ndarray | None:
    """The data of constant tensor `index` of subgraph `sg` (a SubGraphT), shaped; None if it has none."""
    t = sg.tensors[index]
    buf = m.buffers[t.buffer] if t.buffer < len(m.buffers) else None
    if buf is None or buf.data is None or len(buf.data) == 0 or t.type not in _NP:
        return None
    arr = np.frombuffer(bytes(np.asarray(buf.data, dtype=np.uint8)), dtype=_NP[t.type])
    shape = [int(d) for d in (t.shape if t.shape is not None else [])]
    return arr.reshape(shape) if shape else arr.reshape(())


def set_constant(m, sg, index: int, value: np.ndarray, *, new_buffer: bool = False) -> None:
    """Store `value` as tensor `index`'s data (dtype and shape follow `value`). With new_buffer, the
    tensor gets a buffer of its own (use when the old buffer is shared with other tensors)."""
    s = schema()
    t = sg.tensors[index]
    inv = {np.dtype(v): k for k, v in _NP.items()}
    value = np.ascontiguousarray(value)
    if new_buffer or t.buffer == 0:
        m.buffers.append(s.BufferT())
        t.buffer = len(m.buffers) - 1
    m.buffers[t.buffer].data = np.frombuffer(value.tobytes(), dtype=np.uint8).copy()
    t.type = inv[value.dtype]
    t.shape = np.asarray(value.shape, dtype=np.int32)
    if t.shapeSignature is not None and len(t.shapeSignature) != value.ndim:
        t.shapeSignature = None


def consumers(sg) -> dict[int, list[int]]:
    """tensor index -> indices of the ops that read it."""
    out: dict[int, list[int]] = {}
    for i, op in enumerate(sg.operators):
        for t in (op.inputs if op.inputs is not None else []):
            if t >= 0:
                out.setdefault(int(t), []).append(i)
    return out


def producers(sg) -> dict[int, int]:
    """tensor index -> index of the op that writes it."""
    return {int(t): i for i, op in enumerate(sg.operators) for t in (op.outputs if op.outputs is not None else [])}
