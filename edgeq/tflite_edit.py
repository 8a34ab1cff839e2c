"""Edit a .tflite flatbuffer: LiteRT's object API (schema_py_generated ModelT) in, bytes out.

Graph rewrites (fp16 weight folding, densifying, shared int8 scales) and weight-level accuracy
methods (equalization, bias correction, learned rounding) all read and write constant tensors
through here, so there is one way to unpack, edit and repack a model.

Buffers may be stored after the flatbuffer (buffer.offset/size into the file: the LiteRT quantizer
writes a model that way once its large buffers pass 256 KB, and TFLite files over 2 GB must). load()
reads them into the ModelT, so constant() sees them and every edit keeps them; pack() writes them
inline, or after the flatbuffer again when inline they would pass the flatbuffer's 2 GB limit.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .errors import ModelFormatError

# TensorType enum value -> numpy dtype (schema.fbs); types numpy lacks (e.g. INT4) are absent.
_NP = {0: np.float32, 1: np.float16, 2: np.int32, 3: np.uint8, 4: np.int64, 6: np.bool_, 7: np.int16,
       9: np.int8, 10: np.float64, 12: np.uint64, 15: np.uint32, 16: np.uint16}


def schema():
    from ai_edge_litert import schema_py_generated as s
    return s


def load(model: bytes):
    """The whole model as a mutable ModelT, every buffer inline (see the module doc)."""
    m = schema().ModelT.InitFromPackedBuf(bytearray(model), 0)
    for b in m.buffers or []:
        # offset 1 (size 1) is the writer's placeholder while it packs, never a real location.
        if b.offset and b.offset > 1 and b.size:
            if b.offset + b.size > len(model):
                raise ModelFormatError(f"a buffer of the .tflite lies past its end (bytes {b.offset}..{b.offset + b.size} "
                                       f"of {len(model)}): the file is truncated; copy or export it again")
            b.data = np.frombuffer(model, np.uint8, count=int(b.size), offset=int(b.offset)).copy()
            b.offset, b.size = 0, 0
    return m


# A flatbuffer cannot pass 2 GB: past this much buffer data pack() stores the large buffers after it.
INLINE_LIMIT = 2**31 - 2**27
_EXTERNAL_MIN = 1024  # smaller buffers stay inline either way (as the LiteRT quantizer does)


def pack(m) -> bytes:
    """The model as .tflite bytes: buffers inline, or, past INLINE_LIMIT bytes of them, the large ones
    after the flatbuffer (buffer.offset/size, 16-byte aligned, as TFLite's writers do). `m` is kept."""
    big = [b for b in m.buffers or [] if b.data is not None and len(b.data) >= _EXTERNAL_MIN]
    if sum(len(b.data) for b in big) <= INLINE_LIMIT:
        return _finish(m)
    data = [np.asarray(b.data, dtype=np.uint8) for b in big]
    try:
        for b in big:  # placeholders first: the real offsets depend on the flatbuffer's length
            b.data, b.offset, b.size = None, 1, 1
        head = len(_finish(m))
        at = _align16(head)
        for b, d in zip(big, data):
            b.offset, b.size = at, d.size
            at = _align16(at + d.size)
        flat = _finish(m)
        if len(flat) != head:  # the same fields with other values must keep the layout
            raise RuntimeError("tflite_edit.pack: the flatbuffer changed length between passes")
        out = bytearray(at)
        out[:head] = flat
        for b, d in zip(big, data):
            out[b.offset:b.offset + b.size] = d.tobytes()
        return bytes(out)
    finally:
        for b, d in zip(big, data):
            b.data, b.offset, b.size = d, 0, 0


def _finish(m) -> bytes:
    import flatbuffers

    b = flatbuffers.Builder(1 << 20)
    b.Finish(m.Pack(b), file_identifier=b"TFL3")
    return bytes(b.Output())


def _align16(n: int) -> int:
    return (n + 15) & ~15


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


# schema.fbs: builtin codes above 127 live only in builtin_code; deprecated_builtin_code says 127.
PLACEHOLDER_FOR_GREATER_OP_CODES = 127


def has_ops(model: bytes, names) -> bool:
    """Whether packed `model` has an operator code for any builtin in `names`: read from its
    operator code table alone, so a rewrite with nothing to do skips load() (its object tree)."""
    s = schema()
    wanted = {getattr(s.BuiltinOperator, n) for n in names}
    root = s.Model.GetRootAs(model, 0)
    for i in range(root.OperatorCodesLength()):
        c = root.OperatorCodes(i)
        if max(c.BuiltinCode(), c.DeprecatedBuiltinCode()) in wanted:
            return True
    return False


def opcode_index(m, name: str, version: int = 1) -> int:
    """Index of builtin `name`'s operator code in model `m`, added if missing; an existing code's
    version is raised to `version` (an op version says what its kernel must support)."""
    s = schema()
    num = getattr(s.BuiltinOperator, name)
    codes = m.operatorCodes
    for i, c in enumerate(codes):
        if max(c.builtinCode, c.deprecatedBuiltinCode) == num:
            c.version = max(int(c.version or 1), version)
            return i
    code = s.OperatorCodeT()
    code.builtinCode, code.deprecatedBuiltinCode = num, min(num, PLACEHOLDER_FOR_GREATER_OP_CODES)
    code.version = version
    codes.append(code)
    return len(codes) - 1


def ints(xs) -> list[int]:
    """An optional index vector of the object API (None, list or numpy array) as a list of ints."""
    return [] if xs is None else [int(x) for x in xs]


def tensor_name(t) -> str:
    return t.name.decode("utf-8", "replace") if isinstance(t.name, bytes) else str(t.name or "")


def qparams(t) -> tuple[np.ndarray, np.ndarray] | None:
    """(scales as float64, zero points as int64, one per scale) of TensorT `t`; None when it has no
    scale. A missing zero point reads as 0, a single one is repeated for per-channel scales."""
    q = t.quantization
    if q is None or q.scale is None or len(q.scale) == 0:
        return None
    scale = np.asarray(q.scale, dtype=np.float64)
    zp = np.asarray(q.zeroPoint if q.zeroPoint is not None and len(q.zeroPoint) else np.zeros(len(scale)),
                    dtype=np.int64)
    if len(zp) == 1 and len(scale) > 1:
        zp = np.repeat(zp, len(scale))
    return scale, zp


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


def overwrite_buffer(model: bytearray, buffer: int, value: np.ndarray) -> bool:
    """Write `value` over buffer `buffer`'s bytes in packed `model`, in place, when it has exactly that
    many bytes (the same dtype and shape as before); False (nothing written) otherwise. Much cheaper
    than load()/pack() for a model edited again and again (sequential weight rounding)."""
    data = np.ascontiguousarray(value).view(np.uint8).reshape(-1)
    root = schema().Model.GetRootAs(model, 0)
    if not 0 < buffer < root.BuffersLength():
        return False
    b = root.Buffers(buffer)
    if b.Offset() > 1 and b.Size() == data.size and b.Offset() + data.size <= len(model):
        model[b.Offset():b.Offset() + data.size] = data.tobytes()
        return True
    view = b.DataAsNumpy()
    if isinstance(view, np.ndarray) and view.size == data.size and view.size:
        view[:] = data  # a view into `model`
        return True
    return False


def buffer_shared(m, buffer: int) -> bool:
    """True when more than one tensor (any subgraph) uses `buffer`, or it is the empty sentinel 0:
    writing a constant there needs set_constant(..., new_buffer=True)."""
    return buffer == 0 or sum(1 for sg in m.subgraphs for t in sg.tensors if t.buffer == buffer) > 1


def numpy_dtype(t) -> type:
    """The numpy dtype of TensorT `t`'s elements (KeyError for types numpy lacks, e.g. INT4)."""
    return _NP[t.type]


def visible_outputs(m, sg_i: int) -> set[int]:
    """Tensors of subgraph `sg_i` a caller reads: its outputs and its signatures' outputs."""
    sg = m.subgraphs[sg_i]
    return set(ints(sg.outputs)) | {int(tm.tensorIndex) for sig in m.signatureDefs or []
                                    if sig.subgraphIndex == sg_i for tm in sig.outputs or []}


def consumers(sg) -> dict[int, list[int]]:
    """tensor index -> indices of the ops that read it."""
    out: dict[int, list[int]] = {}
    for i, op in enumerate(sg.operators):
        for t in ints(op.inputs):
            if t >= 0:
                out.setdefault(t, []).append(i)
    return out


def producers(sg) -> dict[int, int]:
    """tensor index -> index of the op that writes it."""
    return {t: i for i, op in enumerate(sg.operators) for t in ints(op.outputs)}


def ancestors(sg, tensors) -> set[int]:
    """Indices of the ops of subgraph `sg` that computing `tensors` needs (their producers, and
    theirs, back to the inputs and constants)."""
    prod, ops, todo, seen = producers(sg), set(), list(tensors), set()
    while todo:
        t = todo.pop()
        if t in seen or t < 0:
            continue
        seen.add(t)
        i = prod.get(t)
        if i is not None and i not in ops:
            ops.add(i)
            todo.extend(ints(sg.operators[i].inputs))
    return ops


# Ops whose effects reach other ops outside their tensors (resource variables, other subgraphs): a
# model holding one is not cut (prefix() returns None), nor are they replaced by their value.
STATEFUL_OPS = {"VAR_HANDLE", "READ_VARIABLE", "ASSIGN_VARIABLE", "CALL_ONCE", "WHILE", "IF", "CALL",
            "STABLEHLO_COMPOSITE", "HASHTABLE", "HASHTABLE_FIND", "HASHTABLE_IMPORT", "HASHTABLE_SIZE"}


def prefix(m, tensors: Sequence[int]) -> bytes | None:
    """The model cut down to what computing `tensors` (of subgraph 0) needs: those ops, in order,
    with `tensors` as its outputs, the signature's inputs kept and its outputs replaced by them
    (named "t<index>"). Buffers no kept op reads are emptied but keep their indices, so
    overwrite_buffer() of a kept weight still lands. Much cheaper to run than the whole model when
    the tensors lie early in it (sequential weight rounding). None when the model cannot be cut (more
    than one subgraph, no signature, resource variables). `m` (a load()ed ModelT) is kept."""
    s = schema()
    if len(m.subgraphs) != 1 or len(m.signatureDefs or []) != 1:
        return None
    sg = m.subgraphs[0]
    if any(op_name(m, op) in STATEFUL_OPS for op in sg.operators):
        return None
    keep = ancestors(sg, tensors)
    ops = [op for i, op in enumerate(sg.operators) if i in keep]
    used = {t for op in ops for t in (*ints(op.inputs), *ints(op.outputs)) if t >= 0} | set(ints(sg.inputs))
    live = {int(sg.tensors[t].buffer) for t in used} | {int(md.buffer) for md in m.metadata or []}
    sig = m.signatureDefs[0]
    outs = []
    for t in dict.fromkeys(int(t) for t in tensors):
        tm = s.TensorMapT()
        tm.name, tm.tensorIndex = f"t{t}", t
        outs.append(tm)
    saved = sg.operators, sg.outputs, sig.outputs, [(b, b.data, b.offset, b.size) for b in m.buffers or []]
    try:
        sg.operators, sg.outputs, sig.outputs = ops, np.asarray([tm.tensorIndex for tm in outs], np.int32), outs
        for i, b in enumerate(m.buffers or []):
            if i and i not in live:
                b.data, b.offset, b.size = None, 0, 0
        return pack(m)
    finally:
        sg.operators, sg.outputs, sig.outputs = saved[:3]
        for b, data, offset, size in saved[3]:
            b.data, b.offset, b.size = data, offset, size
